"""SiLU-and-multiply, the gated MLP's activation: silu(gate) * up over a packed [gate | up] row."""

import torch
import torch.nn.functional as F

from llmasos.ops.kernels import cpu_kernels


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2I] holding gate then up -> [..., I]; on CPU in float32 one fused call."""
    ops = cpu_kernels(x) if x.dim() == 2 and x.stride(-1) == 1 and x.shape[-1] % 16 == 0 else None
    if ops is not None:
        return ops.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
