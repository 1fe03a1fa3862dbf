"""The CPU kernel builds per instruction set: each VNNI build this CPU runs gives the AVX2 build's
numbers bit for bit (the integer dot products are exact in both; the AVX-512 build's 512-bit pairs of
groups included), and the choice of build is made
from the CPU's flags, overridable by LLMASOS_CPU_ISA."""

import os
import shutil
from pathlib import Path

import pytest
import torch
from test_quant import make_blocks

from llmasos.ops import kernels as cpu
from llmasos.ops.quant import LAYOUTS, pack_blocks

pytestmark = pytest.mark.skipif(
    "avx2" not in cpu.supported_isas(), reason="the CPU kernels need x86 AVX2 and a C++ compiler"
)


@pytest.mark.slow  # each build compiles the extension once (about a minute on 2 cores), then caches
@pytest.mark.parametrize("isa", [isa for isa in cpu.ISA_FLAGS if isa not in ("avx2", *cpu.ARM_ISAS)])
def test_vnni_builds_match_the_avx2_build_bit_for_bit(isa):
    if isa not in cpu.supported_isas():
        pytest.skip(f"this CPU has no {isa} (its /proc/cpuinfo flags lack it)")
    fast, plain = cpu.build(isa), cpu.build("avx2")
    assert fast is not None and plain is not None and fast is not plain
    for layout in LAYOUTS:
        blocks, _ = make_blocks(layout, rows=97)
        if layout == "Q8_0":  # quants of -128: |w| = 128 must stay unsigned in vpdpbusd too
            blocks.view(97, -1, 34)[:3, :, 2:] = torch.tensor(-128, dtype=torch.int8).view(torch.uint8)
        packed, qtype = pack_blocks(blocks, layout), LAYOUTS[layout][0]
        for rows in (1, 2, 3, 4, 5, 9, 16):  # 512-bit pairs of groups from 4 rows, tiles of 4 or 8 rows
            x = torch.randn(rows, 320, generator=torch.Generator().manual_seed(rows)) * 3
            x[0, :32] *= 50
            for bits in (8, 16):
                got = fast.gguf_linear(x, packed, qtype, 320, 97, bits)
                assert torch.equal(got, plain.gguf_linear(x, packed, qtype, 320, 97, bits)), (
                    layout,
                    rows,
                    bits,
                )


@pytest.mark.slow  # builds as above
@pytest.mark.parametrize("dim", [64, 40])  # the AVX-512 build: 512-bit at 64, its 256-bit path at 40
def test_every_build_attends_as_the_avx2_build_up_to_rounding(dim):
    """Decode attention sums in another order on 512-bit registers: the same up to float32 rounding."""
    generator = torch.Generator().manual_seed(dim)
    k_cache, v_cache = torch.randn(2, 8, 16, 3, dim, generator=generator)
    q = torch.randn(4, 9, dim, generator=generator)
    slots = torch.randperm(128, generator=generator)[:75].repeat(4, 1)
    mask = torch.arange(75) < torch.tensor([[75], [60], [9], [33]])
    outputs = {}
    for isa in cpu.supported_isas():
        out = torch.empty_like(q)
        cpu.build(isa).decode_attention(q, k_cache, v_cache, torch.arange(4), slots, mask, 0.125, out)
        outputs[isa] = out
    assert outputs["avx2"].isfinite().all()
    for isa, out in outputs.items():
        torch.testing.assert_close(out, outputs["avx2"], msg=isa)


def test_the_best_build_the_cpu_runs_is_chosen_unless_overridden(monkeypatch):
    monkeypatch.delenv("LLMASOS_CPU_ISA", raising=False)
    assert cpu.cpu_isa() == cpu.supported_isas()[0]
    monkeypatch.setenv("LLMASOS_CPU_ISA", "avx2")
    assert cpu.cpu_isa() == "avx2"


def test_an_unknown_build_name_is_refused_with_the_known_ones(monkeypatch):
    monkeypatch.setenv("LLMASOS_CPU_ISA", "avx9000")
    with pytest.raises(ValueError, match="avx512-vnni, avx-vnni, avx2, neon-dotprod"):
        cpu.cpu_isa()


def test_a_build_the_cpu_cannot_run_falls_back_to_the_best_it_can(monkeypatch):
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: {"avx2"})
    cpu.supported_isas.cache_clear()
    try:
        monkeypatch.setenv("LLMASOS_CPU_ISA", "avx512-vnni")
        assert cpu.supported_isas() == ("avx2",) and cpu.cpu_isa() == "avx2"
    finally:
        cpu.supported_isas.cache_clear()


def test_a_build_is_imported_directly_only_while_its_stamp_matches(tmp_path):
    """The stamp that lets a start skip torch's extension loader: its library is imported when the
    inputs and the file are the ones recorded, never after either changed (a rebuild by another
    checkout sharing TORCH_EXTENSIONS_DIR, an edited source)."""
    built = cpu.kernels()
    if built is None:
        pytest.skip("no kernel build on this machine")
    library = tmp_path / Path(built.__file__).name
    shutil.copyfile(built.__file__, library)
    stamp = tmp_path / "build.llmasos-stamp.json"
    cpu._write_stamp(stamp, "inputs", library)
    name = library.name.partition(".")[0]
    loaded = cpu._load_stamped(stamp, name, "inputs")
    assert loaded is not None and hasattr(loaded, "gguf_linear")
    assert cpu._load_stamped(stamp, name, "other inputs") is None
    os.utime(library, ns=(0, 0))  # the library was rebuilt since the stamp
    assert cpu._load_stamped(stamp, name, "inputs") is None
    assert cpu._load_stamped(tmp_path / "missing.json", name, "inputs") is None


@pytest.mark.slow  # builds as above
@pytest.mark.parametrize("dim", [64, 128, 40])  # 128: two passes of 64 columns in the AVX-512 build
@pytest.mark.parametrize("heads", [9, 15])  # GQA groups of 3 and 5 (the 512-bit path takes 4 heads at a time)
def test_masked_padding_is_never_read_even_if_it_holds_nan(dim, heads):
    """The runner pads a row's context with slots it masks out; what they hold (here NaN) must not reach
    the output: every build gives what it gives with those rows zeroed."""
    generator = torch.Generator().manual_seed(dim + heads)
    k_cache, v_cache = torch.randn(2, 8, 16, 3, dim, generator=generator)
    q = torch.randn(2, heads, dim, generator=generator)
    slots = torch.arange(80).repeat(2, 1)
    slots[0, 50:] = 127  # row 0's padding: one slot no row attends to
    mask = torch.arange(80) < torch.tensor([[50], [80]])
    for isa in cpu.supported_isas():
        outputs = []
        for pad in (float("nan"), 0.0):
            v_cache.view(-1, 3, dim)[127], k_cache.view(-1, 3, dim)[127] = pad, pad
            out = torch.empty_like(q)
            cpu.build(isa).decode_attention(q, k_cache, v_cache, torch.arange(2), slots, mask, 0.125, out)
            outputs.append(out)
        assert outputs[0].isfinite().all(), isa
        torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0, msg=isa)
