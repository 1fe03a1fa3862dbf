"""Rotary position embedding (the rotate-half form HF Llama uses), with llama3 and linear scaling.

The cos/sin table is built on first use on the device of the positions, so the module can be
created on the meta device (fast loading) without a buffer to restore.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llmasos.errors import UnsupportedModelError
from llmasos.ops.kernels import cpu_kernels


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling: long wavelengths scaled, short kept, smooth between."""
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float, scaling: dict | None = None):
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        self.base = base
        self.scaling = scaling
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if rope_type not in ("default", "llama3", "linear"):
            raise UnsupportedModelError(
                f"rope scaling type {rope_type!r} is not supported; supported: default, llama3, linear"
            )
        self.rope_type = rope_type
        self._cos_sin: torch.Tensor | None = None

    def _build(self, device: torch.device) -> torch.Tensor:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        inv_freq = 1.0 / (self.base**exponent)
        if self.rope_type == "llama3":
            inv_freq = llama3_inv_freq(inv_freq, self.scaling)
        elif self.rope_type == "linear":
            inv_freq = inv_freq / self.scaling["factor"]
        positions = torch.arange(self.max_position, device=device).float()
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return torch.stack((emb.cos(), emb.sin()))  # [2, max_position, head_dim]

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for the positions, [T, 1, D] each: computed once per step, used by every layer."""
        if self._cos_sin is None or self._cos_sin.device != positions.device:
            self._cos_sin = self._build(positions.device)
        cos, sin = self._cos_sin[:, positions].unsqueeze(-2)
        return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D] -> x cos + rotate_half(x) sin."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.addcmul(x * cos.to(x.dtype), rotated, sin.to(x.dtype))


def apply_rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rotary` in place (x may be a strided view, e.g. the q/k part of a packed qkv); returns x.

    On CPU in float32 one fused call instead of seven ops."""
    ops = cpu_kernels(x) if x.stride(-1) == 1 and x.shape[-1] % 16 == 0 else None
    if ops is not None and cos.dtype == torch.float32 and cos.is_contiguous() and sin.is_contiguous():
        ops.rotary_(x, cos, sin)
        return x
    return x.copy_(apply_rotary(x, cos, sin))
