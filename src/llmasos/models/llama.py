"""The Llama family in one file: Llama 2/3 (incl. llama3 rope scaling), Mistral, Qwen2, Qwen3, SmolLM.

They differ only by fields of `LlamaConfig`: Qwen2 adds q/k/v biases, Qwen3 adds RMSNorm on q
and k per head, Llama 3.1 rescales rope frequencies. Q/K/V and gate/up are packed into one
matmul each (fewer, larger kernels); `load_weights` maps the checkpoint's separate tensors into
the packed ones, so checkpoints load under their Hugging Face names unchanged. The driver contract
it satisfies is written in models/base.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
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
from llmasos.ops.activation import silu_and_mul
from llmasos.ops.attention import AttentionMetadata, paged_attention
from llmasos.ops.norm import RMSNorm
from llmasos.ops.rotary import RotaryEmbedding, apply_rotary_


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False

    @classmethod
    def from_hf(cls, hf: dict) -> LlamaConfig:
        model_type = hf.get("model_type", "llama")
        num_heads = hf["num_attention_heads"]
        attention_bias = hf.get("attention_bias", False)
        rope_params = hf.get("rope_parameters") or {}  # transformers 5 keeps theta and scaling here
        rope_scaling = hf.get("rope_scaling") or (rope_params if rope_params.get("rope_type") else None)
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
            rope_scaling = None
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=hf.get("rope_theta") or rope_params.get("rope_theta", 10000.0),
            rope_scaling=rope_scaling,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias,
            mlp_bias=hf.get("mlp_bias", False),
            qk_norm=model_type == "qwen3",
        )


class Attention(nn.Module):
    """Over this rank's heads (all of them on one rank; models/parallel.py)."""

    def __init__(self, cfg: LlamaConfig, tp: TensorParallel):
        super().__init__()
        q = head_part(cfg.num_heads, cfg.head_dim, tp)
        kv = head_part(cfg.num_kv_heads, cfg.head_dim, tp, kv=True)
        self.q_size, self.kv_size, self.head_dim = q.size, kv.size, cfg.head_dim
        self.num_heads, self.num_kv_heads = q.size // cfg.head_dim, kv.size // cfg.head_dim
        self.qkv_proj = column_linear(cfg.hidden_size, [q, kv, kv], cfg.qkv_bias, tp)
        self.o_proj = row_linear(q, cfg.hidden_size, cfg.o_bias, tp)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.scale = cfg.head_dim**-0.5
        self.k_cache = self.v_cache = torch.empty(0)  # bound by the runner

    def forward(
        self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, md: AttentionMetadata
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        heads = self.num_heads + self.num_kv_heads
        qk = qkv[:, : self.q_size + self.kv_size].view(-1, heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=1)
        # q and k in one go, in place in the qkv output (no copies)
        q, k = apply_rotary_(qk, *rope).split([self.num_heads, self.num_kv_heads], dim=1)
        o = paged_attention(q, k, v, self.k_cache, self.v_cache, md, self.scale)
        return self.o_proj(o.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig, tp: TensorParallel):
        super().__init__()
        part = column_part(cfg.intermediate_size, tp, "MLP features")
        self.gate_up_proj = column_linear(cfg.hidden_size, [part, part], cfg.mlp_bias, tp)
        self.down_proj = row_linear(part, cfg.hidden_size, cfg.mlp_bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, tp: TensorParallel):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, tp)

    def forward(
        self,
        rope: tuple[torch.Tensor, torch.Tensor],
        x: torch.Tensor,
        residual: torch.Tensor | None,
        md: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it): the next norm adds the two, so
        each residual add is fused into a norm (vLLM's layout); the first layer gets residual None."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(rope, h, md)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    # checkpoint name -> (packed parameter, shard index)
    packed_modules = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: LlamaConfig, tp: TensorParallel = SINGLE):
        """`tp`: this rank's place when the model is split over several (tensor parallelism)."""
        super().__init__()
        self.config = cfg
        self.rotary = RotaryEmbedding(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling
        )
        self.embed_tokens = vocab_embedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, tp) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = lm_head(self.embed_tokens, cfg.hidden_size, cfg.vocab_size, cfg.tie_word_embeddings)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata
    ) -> torch.Tensor:
        """Flat batch of new tokens -> final hidden states [T, hidden]."""
        x, residual = self.embed_tokens(input_ids), None
        rope = self.rotary(positions)
        for layer in self.layers:
            x, residual = layer(rope, x, residual, md)
        return self.norm(x, residual)[0]

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn for layer in self.layers]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The logits (on a rank other than 0 of a split model: None, rank 0 has them)."""
        return self.lm_head(hidden)

    def shard_sizes(self, param_name: str) -> list[int] | None:
        """This rank's output sizes of the shards packed into a parameter, or None if it is not packed."""
        if ".qkv_proj." in param_name:
            attn = self.layers[0].self_attn
            return [attn.q_size, attn.kv_size, attn.kv_size]
        if ".gate_up_proj." in param_name:
            size = self.layers[0].mlp.down_proj.in_features
            return [size, size]
        return None

    def map_weight(self, name: str, tensor: torch.Tensor) -> tuple[str, int | None, torch.Tensor] | None:
        """Checkpoint tensor -> (parameter name, shard index or None, tensor); None skips it."""
        name = name.removeprefix("model.")
        if "rotary_emb" in name or (name == "lm_head.weight" and self.config.tie_word_embeddings):
            return None
        for ckpt, (packed, shard) in self.packed_modules.items():
            if f".{ckpt}." in name:
                return name.replace(f".{ckpt}.", f".{packed}."), shard, tensor
        return name, None, tensor
