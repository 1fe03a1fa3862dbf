"""BERT encoders, and the sentence-embedding models built on them (MiniLM, BGE, E5, GTE, ...).

Unlike the decoders next door, an encoder attends in both directions and keeps no KV cache: a
padded batch goes through once and the last hidden states come out, for llmasos/runtime/embedder.py to
pool into one vector per text. Post-LN layers (LayerNorm after each residual add), learned
absolute positions, token types (always type 0: one text per sequence). Q/K/V are packed into
one matmul as in llama.py; `map_weight` reads the checkpoint's names with or without the "bert."
prefix of masked-LM checkpoints, and drops the pooler and the masked-LM head, which no sentence
embedding uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from llmasos.errors import UnsupportedModelError
from llmasos.ops.embedding import empty_embedding

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}


@dataclass
class BertConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @classmethod
    def from_hf(cls, hf: dict) -> BertConfig:
        position_type = hf.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise UnsupportedModelError(
                f"BERT with {position_type!r} positions is not supported (only absolute)"
            )
        if hf.get("hidden_act", "gelu") not in ACTIVATIONS:
            raise UnsupportedModelError(
                f"BERT activation {hf['hidden_act']!r} is not supported; supported: {', '.join(ACTIVATIONS)}"
            )
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            max_position_embeddings=hf["max_position_embeddings"],
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_act=hf.get("hidden_act", "gelu"),
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class Attention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: [B, S, hidden], mask: [B, 1, 1, S] bool, False on padding (no query attends to it)."""
        batch, length, hidden = x.shape
        qkv = self.qkv_proj(x).view(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, S, head_dim]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(o.transpose(1, 2).reshape(batch, length, hidden))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attn = Attention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.mlp_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(x + self.attn(x, mask))
        return self.mlp_norm(x + self.down_proj(self.act(self.up_proj(x))))


class BertModel(nn.Module):
    # checkpoint name (after the "encoder.layer." -> "layers." rename) -> our name, in this order:
    # ".attention.output.dense." must be renamed before the MLP's ".output.dense."
    renames = (
        ("embeddings.word_embeddings.", "embed_tokens."),
        ("embeddings.position_embeddings.", "embed_positions."),
        ("embeddings.token_type_embeddings.", "embed_token_types."),
        ("embeddings.LayerNorm.", "embed_norm."),
        ("encoder.layer.", "layers."),
        (".attention.output.dense.", ".attn.o_proj."),
        (".attention.output.LayerNorm.", ".attn_norm."),
        (".intermediate.dense.", ".up_proj."),
        (".output.dense.", ".down_proj."),
        (".output.LayerNorm.", ".mlp_norm."),
    )
    # checkpoint name -> shard of the packed qkv_proj
    packed_modules = {".attention.self.query.": 0, ".attention.self.key.": 1, ".attention.self.value.": 2}
    # checkpoints converted from TensorFlow (bert-base-uncased's) name LayerNorm's scale and shift so
    tensorflow_leaves = {"gamma": "weight", "beta": "bias"}

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = empty_embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_positions = empty_embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.embed_token_types = empty_embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.embed_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Right-padded ids [B, S] and mask [B, S] (True on real tokens) -> last hidden states [B, S, H]."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed_tokens(input_ids) + self.embed_positions(positions) + self.embed_token_types.weight[0]
        x = self.embed_norm(x)
        mask = attention_mask[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def shard_sizes(self, param_name: str) -> list[int] | None:
        """Output sizes of the shards packed into a parameter, or None if it is not packed."""
        if ".qkv_proj." in param_name:
            return [self.config.hidden_size] * 3
        return None

    def map_weight(self, name: str, tensor: torch.Tensor) -> tuple[str, int | None, torch.Tensor] | None:
        """Checkpoint tensor -> (parameter name, shard index or None, tensor); None skips it."""
        name = name.removeprefix("bert.")
        if name.startswith(("pooler.", "cls.")) or name.endswith(".position_ids"):
            return None  # pooler and masked-LM head: unused by embeddings; position_ids: an old buffer
        stem, _, leaf = name.rpartition(".")
        name = f"{stem}.{self.tensorflow_leaves.get(leaf, leaf)}"
        for old, new in self.renames:
            name = name.replace(old, new)
        for ckpt, shard in self.packed_modules.items():
            if ckpt in name:
                return name.replace(ckpt, ".attn.qkv_proj."), shard, tensor
        return name, None, tensor
