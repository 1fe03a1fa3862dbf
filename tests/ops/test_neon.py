"""The ARM NEON (dot-product) block kernel, gguf_neon.h: bit for bit the plain-PyTorch definition of
the kernel's arithmetic (and so the x86 builds), run natively on an ARM CPU with the dot product, or
cross-compiled and run under qemu-aarch64 (`-cpu max` emulates sdot) on any other machine that has
aarch64-linux-gnu-g++ and qemu-aarch64 (.ci/run installs them). Emulated, it proves the numbers, not
the speed. And the choice of that build on ARM, from the CPU's flags."""

import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from test_quant import kernel_reference, make_blocks

from llmasos.ops import kernels as cpu
from llmasos.ops.quant import LAYOUTS, dequantize_reference, pack_blocks

CSRC = Path(cpu.__file__).parent / "csrc"
HARNESS = Path(__file__).parent / "csrc" / "neon_harness.cpp"
FLAGS = ["-std=c++17", "-O2", "-march=armv8.2-a+dotprod", "-ffp-contract=off", f"-I{CSRC}"]
IN, OUT = 160, 37  # 5 blocks; 37 outputs: 4 groups of 8 and a padded one of 5


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """The command that runs the compiled harness: natively, or under qemu."""
    binary = tmp_path_factory.mktemp("neon") / "neon_harness"
    if platform.machine().lower() in ("aarch64", "arm64") and "neon-dotprod" in cpu.supported_isas():
        compiler, extra, runner = shutil.which("c++") or "g++", [], []
    elif shutil.which("aarch64-linux-gnu-g++") and shutil.which("qemu-aarch64"):
        compiler, extra, runner = "aarch64-linux-gnu-g++", ["-static"], ["qemu-aarch64", "-cpu", "max"]
    else:
        pytest.skip(
            "no ARM CPU with the dot product here, nor aarch64-linux-gnu-g++ and qemu-aarch64 to emulate "
            "one (apt-get install g++-aarch64-linux-gnu qemu-user)"
        )
    subprocess.run([compiler, *FLAGS, *extra, str(HARNESS), "-o", str(binary)], check=True)
    return [*runner, str(binary)]


def run_harness(command, cases):
    """Each case (layout, x, packed, bits) through the harness: its (y, dequantized W), float32."""
    stdin = b"".join(
        np.array([LAYOUTS[layout][0], IN, OUT, x.shape[0], bits], dtype=np.int64).tobytes()
        + x.numpy().tobytes()
        + packed.numpy().tobytes()
        for layout, x, packed, bits in cases
    )
    done = subprocess.run(command, input=stdin, capture_output=True, check=True)
    out = np.frombuffer(done.stdout, np.float32)
    results, at = [], 0
    for _, x, _, _ in cases:
        y = torch.from_numpy(out[at : at + x.shape[0] * OUT].copy()).view(-1, OUT)
        at += y.numel()
        results.append((y, torch.from_numpy(out[at : at + OUT * IN].copy()).view(OUT, IN)))
        at += OUT * IN
    assert at == out.size
    return results


def activations(rows=20, seed=0):
    """Blocks of every magnitude: 1e-3 to 1e3, one all zeros, one of 1e4, exact zeros inside blocks,
    and one of 8-bit ties (x * 127 / 127 = k + 0.5, rounded to even)."""
    gen = torch.Generator().manual_seed(seed)
    magnitude = 10 ** (torch.rand(rows, IN // 32, 1, generator=gen) * 6 - 3)
    x = torch.randn(rows, IN // 32, 32, generator=gen) * magnitude
    x[x.abs() < 0.05 * x.abs().amax(-1, keepdim=True)] = 0
    x[0, 1] = 0
    x[1, 2] *= 1e4
    x[2, 3] = torch.arange(32) - 15.5
    x[2, 3, 0] = 127
    return x.reshape(rows, IN)


def test_neon_kernel_gives_the_reference_floats_bit_for_bit(harness):
    """Every layout, 8- and 16-bit activations, 1 to 20 rows (tiles of 4 and 2 and their remainders),
    37 outputs; and dequantizing gives gguf-py's floats. Where an x86 (or native ARM) build runs, it
    gives the same bits."""
    x = activations()
    built = cpu.kernels()
    cases, expected = [], []
    for layout in LAYOUTS:
        blocks, weight = make_blocks(layout, rows=OUT, cols=IN)
        if layout == "Q8_0":  # quants of -128, which gguf-py never writes and a file may
            blocks.view(OUT, -1, 34)[:3, :, 2:] = torch.tensor(-128, dtype=torch.int8).view(torch.uint8)
            weight = dequantize_reference(blocks, layout, IN)
        packed = pack_blocks(blocks, layout)
        for bits in (8, 16):
            for rows in range(1, 21):
                cases.append((layout, x[:rows], packed, bits))
                expected.append((kernel_reference(x[:rows], blocks, layout, bits), weight))
    for (layout, xs, packed, bits), (y, w), (want_y, want_w) in zip(
        cases, run_harness(harness, cases), expected
    ):
        assert torch.equal(y, want_y), (layout, xs.shape[0], bits)
        assert torch.equal(w, want_w), layout
        if built is not None:
            assert torch.equal(y, built.gguf_linear(xs, packed, LAYOUTS[layout][0], IN, OUT, bits))


def test_neon_kernel_outputs_nan_for_a_nan_or_infinite_activation(harness):
    blocks, _ = make_blocks("Q4_1", rows=OUT, cols=IN)
    x = torch.randn(3, IN)
    x[1, 40], x[2, 150] = float("nan"), float("inf")
    results = run_harness(harness, [("Q4_1", x, pack_blocks(blocks, "Q4_1"), bits) for bits in (8, 16)])
    for y, _ in results:
        assert y[0].isfinite().all() and y[1:].isnan().all()


# ---- the choice of build on ARM ----------------------------------------------------------------


def cpuinfo(features):
    """/proc/cpuinfo of an ARM Linux machine whose cores have these features."""
    return f"processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"


GRAVITON2 = cpuinfo(
    "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
)
CORTEX_A72 = cpuinfo("fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid")


@pytest.fixture
def arm_linux(monkeypatch):
    """This process as if on an ARM Linux machine whose /proc/cpuinfo the test sets."""
    cpuinfo = {}
    real_read_text = Path.read_text

    def read_text(path, *args, **kwargs):
        return cpuinfo["text"] if str(path) == "/proc/cpuinfo" else real_read_text(path, *args, **kwargs)

    monkeypatch.setattr(cpu.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(cpu.sys, "platform", "linux")
    monkeypatch.setattr(Path, "read_text", read_text)
    monkeypatch.delenv("LLMASOS_CPU_ISA", raising=False)
    cpu.supported_isas.cache_clear()
    yield cpuinfo
    cpu.supported_isas.cache_clear()


def test_arm_with_the_dot_product_gets_the_neon_build(arm_linux):
    arm_linux["text"] = GRAVITON2
    assert cpu.supported_isas() == ("neon-dotprod",) and cpu.cpu_isa() == "neon-dotprod"


def test_arm_without_the_dot_product_keeps_pytorch(arm_linux):
    arm_linux["text"] = CORTEX_A72
    assert cpu.supported_isas() == () and cpu.cpu_isa() is None


def test_an_x86_build_asked_for_on_arm_falls_back_to_neon(arm_linux, monkeypatch):
    arm_linux["text"] = GRAVITON2
    monkeypatch.setenv("LLMASOS_CPU_ISA", "avx2")
    assert cpu.cpu_isa() == "neon-dotprod"


def test_apple_silicon_gets_the_neon_build(monkeypatch):
    monkeypatch.setattr(cpu.platform, "machine", lambda: "arm64")
    monkeypatch.setattr(cpu.sys, "platform", "darwin")
    monkeypatch.delenv("LLMASOS_CPU_ISA", raising=False)
    cpu.supported_isas.cache_clear()
    try:
        assert cpu.cpu_isa() == "neon-dotprod"
    finally:
        cpu.supported_isas.cache_clear()


def test_x86_never_gets_the_arm_build(monkeypatch):
    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: {"avx2", "asimddp"})
    monkeypatch.setattr(cpu.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    cpu.supported_isas.cache_clear()
    try:
        assert cpu.supported_isas() == ("avx2",)
    finally:
        cpu.supported_isas.cache_clear()


def test_a_build_with_the_block_kernel_alone_leaves_the_fused_ops_to_pytorch(monkeypatch):
    """The ARM build has gguf_linear and gguf_dequantize only: the norms, rotary, attention and LoRA
    ops find no fused kernel (cpu_kernels is None) and run their PyTorch code."""
    from types import SimpleNamespace

    from llmasos.ops.norm import RMSNorm

    arm_build = SimpleNamespace(gguf_linear=None, gguf_dequantize=None)
    monkeypatch.setattr(cpu, "kernels", lambda: arm_build)
    cpu._fused_kernels.cache_clear()
    try:
        x = torch.randn(3, 64)
        assert cpu.cpu_kernels(x) is None
        norm = RMSNorm(64, 1e-5)
        assert torch.equal(norm(x), norm.reference(x))  # (the build's missing rms_norm: AttributeError)
    finally:
        cpu._fused_kernels.cache_clear()
