"""The compiled CPU kernels (C++ in `csrc/`: x86 AVX2 or VNNI, ARM NEON), built once by torch's
extension loader and cached, one build per instruction set.

`gguf_linear.cpp` holds the matmul over GGUF blocks; `cpu_ops.cpp` the small per-layer ops of a
decode step fused into one call each (norm, rotary, K/V store, decode attention, SiLU-and-mul);
`decode_stack.cpp` runs a decode step's layers in one call over those same kernels; `lora.cpp` adds
each row's LoRA update through its own adapter (BGMV).
Every op that uses them keeps its plain-PyTorch code for other devices and dtypes, and for
machines where the kernels cannot be built; the tests compare the two.

The build is chosen at run time for the CPU at hand (`cpu_isa`): AVX-512 VNNI (`vpdpbusd`, on
512-bit registers from 4 rows: Intel since Cascade Lake, AMD since Zen 4), AVX-VNNI (Intel Alder Lake and
later), else AVX2; on ARM, NEON with the dot-product instructions (`sdot`: Apple silicon, Graviton 2
and later, Ampere Altra; Linux reports them as `asimddp`). The VNNI builds differ only in the integer
dot products of `gguf_linear.cpp`, and the ARM build is that file's block kernel alone
(`gguf_neon.h`): all give the AVX2 build's numbers bit for bit (tests/ops/test_neon.py runs the NEON
code under qemu where there is no ARM CPU). On ARM the fused ops, the decode stack and LoRA's BGMV
(x86 code) keep their PyTorch paths: `cpu_kernels` is None there.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import platform
import sys
from pathlib import Path

import torch

log = logging.getLogger("llmasos")


# compiler flags per instruction set, best first; on x86 256-bit vectors everywhere (the kernels are
# written for them, and wider auto-vectorized loops would only lower the clock on some Intel parts)
ISA_FLAGS = {
    "avx512-vnni": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mprefer-vector-width=256"],
    "avx-vnni": ["-mavxvnni"],
    "avx2": [],
    # no multiply and add fused into an FMA where the x86 code has two roundings (the builds agree)
    "neon-dotprod": ["-march=armv8.2-a+dotprod", "-ffp-contract=off"],
}
VNNI_ISAS = ("avx512-vnni", "avx-vnni")
ARM_ISAS = ("neon-dotprod",)
_X86_FLAGS = ["-mavx2", "-mfma", "-mf16c"]  # every x86 build's
# the sources of each build: on ARM the block kernel alone (the others are x86 code)
_X86_SOURCES = ("gguf_linear.cpp", "cpu_ops.cpp", "decode_stack.cpp", "lora.cpp")
_ARM_SOURCES = ("gguf_linear.cpp",)
# the CPU flags each needs (x86: beyond AVX2, which torch reports itself)
_ISA_CPU_FLAGS = {
    "avx512-vnni": {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"},
    "avx-vnni": {"avx_vnni"},
    "neon-dotprod": {"asimddp"},
}


def _arm() -> bool:
    return platform.machine().lower() in ("aarch64", "arm64")


def _cpu_flags() -> set[str]:
    """The CPU's feature flags: Linux's /proc/cpuinfo `flags` (x86) or `Features` (ARM) line."""
    if sys.platform == "darwin":  # every Apple silicon core has the dot product (FEAT_DotProd)
        return {"asimddp"} if _arm() else set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: x86 AVX2 only, which torch reports itself
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return set(line.partition(":")[2].split())


@functools.cache
def supported_isas() -> tuple[str, ...]:
    """The kernel builds this CPU can run, best first (empty: none, e.g. x86 without AVX2, ARM without
    the dot product)."""
    arm = _arm()
    if not arm and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return ()
    flags = _cpu_flags()
    return tuple(
        isa for isa in ISA_FLAGS if (isa in ARM_ISAS) == arm and _ISA_CPU_FLAGS.get(isa, set()) <= flags
    )


def cpu_isa() -> str | None:
    """The build to use: the best this CPU runs, or LLMASOS_CPU_ISA (to compare builds, or to fall back)."""
    isas = supported_isas()
    wanted = os.environ.get("LLMASOS_CPU_ISA")
    if wanted and wanted not in ISA_FLAGS:
        raise ValueError(
            f"LLMASOS_CPU_ISA={wanted!r} is not a kernel build; use one of {', '.join(ISA_FLAGS)}"
        )
    if wanted and wanted not in isas:
        log.warning(
            "LLMASOS_CPU_ISA=%s: this CPU cannot run it; using %s", wanted, isas[0] if isas else "PyTorch"
        )
        wanted = None
    return wanted or (isas[0] if isas else None)


@functools.cache
def kernels():
    """The compiled kernels for this CPU, or None where they cannot run (no AVX2 or dot product, no
    compiler); the choice is made once a process (every matmul asks)."""
    isa = cpu_isa()
    return None if isa is None else build(isa)


@functools.cache
def build(isa: str):
    """The kernels compiled for one instruction set of ISA_FLAGS, or None if they cannot be built.

    torch's extension loader imports setuptools and runs ninja to find the build current: 0.1 s on a
    quiet machine, 0.8 s on a busy one, at every start. So once it has loaded a build, a stamp records
    what went into it (sources, flags, torch and Python versions) and the library file it made; a later
    process whose inputs match and whose library is that same file (size and modification time: another
    checkout sharing TORCH_EXTENSIONS_DIR may have rebuilt it) imports the library directly."""
    try:
        csrc = Path(__file__).parent / "csrc"
        # torch rebuilds when the sources or flags change, and never looks at included headers: the
        # headers' digest goes into the flags so that editing one rebuilds too
        headers = b"".join(path.read_bytes() for path in sorted(csrc.glob("*.h")))
        header = hashlib.sha256(headers).hexdigest()[:16]
        arm = isa in ARM_ISAS
        flags = [
            "-O3",
            *([] if arm else _X86_FLAGS),
            "-fopenmp",
            *ISA_FLAGS[isa],
            f"-DLLMASOS_KERNELS_H={header}",
        ]
        name = "llmasos_cpu_kernels" + ("" if isa == "avx2" else "_" + isa.replace("-", "_"))
        sources = [csrc / file for file in (_ARM_SOURCES if arm else _X86_SOURCES)]
        inputs = hashlib.sha256(
            json.dumps([name, flags, torch.__version__, sys.version]).encode()
            + b"".join(path.read_bytes() for path in sources)
        ).hexdigest()
        stamp = _extensions_root() / f"{name}.llmasos-stamp.json"
        module = _load_stamped(stamp, name, inputs)
        if module is None:
            from torch.utils.cpp_extension import load

            # torch's own folder for a CPU build (its default, named here so that the lock can be held)
            build_dir = _extensions_root() / f"py{sys.version_info.major}{sys.version_info.minor}_cpu" / name
            with _exclusive_build(build_dir):
                module = load(
                    name=name,
                    sources=[str(path) for path in sources],
                    extra_cflags=flags,
                    extra_ldflags=["-fopenmp"],
                    build_directory=str(build_dir),
                    verbose=False,
                )
            _write_stamp(stamp, inputs, Path(module.__file__))
        return module
    except Exception as exc:  # a missing compiler must not stop the model from running
        log.warning("CPU kernels (%s) unavailable (%s); using the PyTorch reference", isa, exc)
        return None


def _extensions_root() -> Path:
    """Where builds and their stamps live: torch's TORCH_EXTENSIONS_DIR, or its default folder."""
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")


@contextlib.contextmanager
def _exclusive_build(build_dir: Path):
    """Hold a build folder for this process while torch builds in it.

    torch's loader guards a build with a bare `lock` file and waits for it to go, forever: a process
    killed mid-build (a stopped test run, Ctrl-C during the compile) leaves it behind and every later
    start hangs. An flock, which the OS drops with the process that held it, serializes the builds
    instead; whoever holds it knows that a `lock` file in the folder is stale, and removes it."""
    import fcntl  # POSIX; elsewhere the ImportError falls back to the PyTorch reference

    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir.with_name(f"{build_dir.name}.llmasos-lock"), "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        stale = build_dir / "lock"
        if stale.exists():
            log.warning("removing %s, left by a build that was stopped", stale)
            stale.unlink()
        yield


def _load_stamped(stamp: Path, name: str, inputs: str):
    """The library the stamp records, imported, if the stamp is for these inputs and the file is
    unchanged since; else None."""
    try:
        recorded = json.loads(stamp.read_text())
        library = Path(recorded["library"])
        status = library.stat()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if recorded.get("inputs") != inputs or recorded.get("file") != [status.st_size, status.st_mtime_ns]:
        return None
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_stamp(stamp: Path, inputs: str, library: Path) -> None:
    status = library.stat()
    record = {"inputs": inputs, "library": str(library), "file": [status.st_size, status.st_mtime_ns]}
    stamp.parent.mkdir(parents=True, exist_ok=True)
    staged = stamp.with_name(f"{stamp.name}.{os.getpid()}.tmp")
    staged.write_text(json.dumps(record))
    staged.replace(stamp)  # atomic: a process reading it sees the old stamp or the new one


def cpu_kernels(x: torch.Tensor):
    """The fused per-layer kernels if they apply to x (a float32 CPU tensor) and this CPU's build has
    them (not the ARM one), else None."""
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    return _fused_kernels()


@functools.cache
def _fused_kernels():
    ops = kernels()
    return ops if hasattr(ops, "rms_norm") else None
