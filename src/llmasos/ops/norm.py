"""RMSNorm, computed in float32 as the reference implementations (HF, llama.cpp) do.

With a residual it is the pre-norm decoder's "add, then normalize": the residual stream becomes
x + residual and its norm is returned with it, so a layer needs no separate add. On CPU in float32
it is one call of the fused kernel (which adds into the residual in place); elsewhere torch's ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmasos.ops.kernels import cpu_kernels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x), or with a residual: (norm(x + residual), x + residual)."""
        ops = cpu_kernels(x) if x.dim() == 2 and x.shape[-1] % 8 == 0 else None
        if ops is not None and (residual is None or residual.is_contiguous()):
            y = ops.rms_norm(x, self.weight, self.eps, residual)  # residual += x in place
            return y if residual is None else (y, residual)
        if residual is not None:
            residual = x + residual
            return self.reference(residual), residual
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
