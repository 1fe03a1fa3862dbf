"""The compiled CPU kernels (C++/AVX2 in `csrc/`), built once by torch's extension loader and cached.

`gguf_linear.cpp` holds the matmul over GGUF blocks; `cpu_ops.cpp` the small per-layer ops of a
decode step fused into one call each (norm, rotary, K/V store, decode attention, SiLU-and-mul);
`decode_stack.cpp` runs a decode step's layers in one call over those same kernels.
Every op that uses them keeps its plain-PyTorch code for other devices and dtypes, and for
machines where the kernels cannot be built; the tests compare the two.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

import torch

log = logging.getLogger("llmasos")


@functools.cache
def kernels():
    """The compiled kernels, or None where they cannot run (no AVX2, no compiler)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    try:
        from torch.utils.cpp_extension import load

        csrc = Path(__file__).parent / "csrc"
        # torch rebuilds when the sources or flags change, and never looks at included headers: the
        # shared header's digest goes into the flags so that editing it rebuilds too
        header = hashlib.sha256((csrc / "kernels.h").read_bytes()).hexdigest()[:16]
        return load(
            name="llmasos_cpu_kernels",
            sources=[str(csrc / name) for name in ("gguf_linear.cpp", "cpu_ops.cpp", "decode_stack.cpp")],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", f"-DLLMASOS_KERNELS_H={header}"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # a missing compiler must not stop the model from running
        log.warning("CPU kernels unavailable (%s); using the PyTorch reference", exc)
        return None


def cpu_kernels(x: torch.Tensor):
    """The kernels if they apply to x (a float32 CPU tensor), else None."""
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    return kernels()
