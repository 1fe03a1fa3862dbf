"""GPT-2: learned positions, LayerNorm, GELU (tanh), fused QKV, tied embeddings.

HF checkpoints store GPT-2's projections as Conv1D ([in, out]); `map_weight` transposes them into
the [out, in] of nn.Linear so the model runs the same matmuls as every other driver. The driver
contract it satisfies is written in models/base.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmasos.models.parallel import (
    SINGLE,
    TensorParallel,
    column_linear,
    column_part,
    head_part,
    lm_head,
    row_linear,
    vocab_embedding,
)
from llmasos.ops.attention import AttentionMetadata, paged_attention
from llmasos.ops.embedding import empty_embedding


@dataclass
class GPT2Config:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    intermediate_size: int
    layer_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True

    @classmethod
    def from_hf(cls, hf: dict) -> GPT2Config:
        hidden = hf["n_embd"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            num_layers=hf["n_layer"],
            num_heads=hf["n_head"],
            max_position_embeddings=hf["n_positions"],
            intermediate_size=hf.get("n_inner") or 4 * hidden,
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
        )

    # the kernel sizes the KV cache from these
    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class Attention(nn.Module):
    """Over this rank's heads (all of them on one rank; models/parallel.py)."""

    def __init__(self, cfg: GPT2Config, tp: TensorParallel):
        super().__init__()
        heads = head_part(cfg.num_heads, cfg.head_dim, tp)
        self.num_heads, self.head_dim = heads.size // cfg.head_dim, cfg.head_dim
        self.c_attn = column_linear(cfg.hidden_size, [heads] * 3, True, tp)
        self.c_proj = row_linear(heads, cfg.hidden_size, True, tp)
        self.scale = self.head_dim**-0.5
        self.k_cache = self.v_cache = torch.empty(0)  # bound by the runner

    def forward(self, x: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.c_attn(x).view(-1, 3, self.num_heads, self.head_dim).unbind(1)
        o = paged_attention(q, k, v, self.k_cache, self.v_cache, md, self.scale)
        return self.c_proj(o.reshape(-1, self.num_heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config, tp: TensorParallel):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg, tp)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        part = column_part(cfg.intermediate_size, tp, "MLP features")
        self.c_fc = column_linear(cfg.hidden_size, [part], True, tp)
        self.c_proj = row_linear(part, cfg.hidden_size, True, tp)

    def forward(self, x: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), md)
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2LMHeadModel(nn.Module):
    def __init__(self, cfg: GPT2Config, tp: TensorParallel = SINGLE):
        """`tp`: this rank's place when the model is split over several (tensor parallelism)."""
        super().__init__()
        self.config = cfg
        self.embed_tokens = vocab_embedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.embed_positions = empty_embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, tp) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.lm_head = lm_head(self.embed_tokens, cfg.hidden_size, cfg.vocab_size, cfg.tie_word_embeddings)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids) + self.embed_positions(positions)
        for layer in self.layers:
            x = layer(x, md)
        return self.ln_f(x)

    def attention_layers(self) -> list[Attention]:
        return [layer.attn for layer in self.layers]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The logits (on a rank other than 0 of a split model: None, rank 0 has them)."""
        return self.lm_head(hidden)

    def shard_sizes(self, param_name: str) -> None:
        return None  # c_attn is already packed in the checkpoint

    def map_weight(self, name: str, tensor: torch.Tensor) -> tuple[str, None, torch.Tensor] | None:
        name = name.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")) or (
            name == "lm_head.weight" and self.config.tie_word_embeddings
        ):
            return None  # causal-mask buffers of old checkpoints
        name = (
            name.replace("wte.", "embed_tokens.")
            .replace("wpe.", "embed_positions.")
            .replace("h.", "layers.", 1)
        )
        name = name.replace(".mlp.c_fc.", ".c_fc.").replace(".mlp.c_proj.", ".c_proj.")
        if name.endswith(".weight") and any(p in name for p in ("c_attn", "c_proj", "c_fc")):
            tensor = tensor.t()  # Conv1D [in, out] -> Linear [out, in]
        return name, None, tensor
