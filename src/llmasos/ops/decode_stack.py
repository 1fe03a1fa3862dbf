"""A decode-only step's decoder layers in one C++ call (CPU, float32, Llama family; csrc/decode_stack.cpp).

The C++ stack runs the kernels the Python layers call, in the same order, so it changes no number;
it only saves the ~20 us each of ~10 ops a layer spends going through Python and the dispatcher,
which on 2 cores is a third of a small model's decode step. The Python layers stay the reference
and the path for everything else: prefill, other devices and dtypes, biases, q/k norms. LoRA
projections (models/lora.py) run too: their base weights as any, and each row's adapter update by
the same BGMV kernel their Python forward calls (csrc/lora.cpp), every shard of a projection in one
call, over rows grouped by slot once a step. The model
runner decides, step by step, whether a decode-only step goes through it (EngineConfig.decode_stack).
"""

from __future__ import annotations

import torch
from torch import nn

from llmasos.ops.attention import AttentionMetadata
from llmasos.ops.kernels import kernels
from llmasos.ops.lora import LoraContext, LoraShard, kernel_shards
from llmasos.ops.quant import LAYOUTS, QuantLinear, kernel_row_limit


def is_decode_only(md: AttentionMetadata) -> bool:
    return md.triton is None and not md.prefills and md.decode_rows is not None


class DecodeStep:
    """A Llama-family model's decode-only step: embedding and rope in Python, then every layer and
    the final norm in one C++ call. Called as the model is: (input_ids, positions, md) -> hidden."""

    def __init__(self, model: nn.Module, stack, lora: LoraContext | None = None):
        self.model, self.stack, self.lora = model, stack, lora

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata
    ) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary(positions)
        batch = self.lora.batch if self.lora is not None else None
        lora_slots = batch.slots if batch is not None else None
        return self.stack.forward(x, cos, sin, md.slot_mapping, md.decode_rows, md.decode_kv_slots,
                                  md.decode_mask, lora_slots)  # fmt: skip


def build_decode_stack(model: nn.Module) -> DecodeStep | None:
    """The C++ stack over a Llama-family model's layers, or None where it does not apply (other
    families, biases, q/k norms, shapes the kernels don't take): then the Python layers run."""
    cfg, ops = model.config, kernels()
    # a config without the Llama family's flags (GPT-2's) is not the layout the stack runs
    plain = all(getattr(cfg, flag, True) is False for flag in ("qkv_bias", "o_bias", "mlp_bias", "qk_norm"))
    if not hasattr(ops, "DecodeStack") or not plain:  # (ops None: no attribute either)
        return None
    layers = model.layers
    shapes_fit = cfg.hidden_size % 8 == 0 and cfg.head_dim % 16 == 0 and cfg.intermediate_size % 8 == 0
    if not shapes_fit:
        return None
    if any(t.dtype != torch.float32 for t in [model.norm.weight, *(la.self_attn.k_cache for la in layers)]):
        return None
    tensors, qtypes, lora, lora_ctx = [], [], [], None
    # the loader gives every QuantLinear of a model the same precision
    activation_bits = next((m.activation_bits for m in model.modules() if isinstance(m, QuantLinear)), 16)
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        wrapped = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        # a LoRA projection (models/lora.py): its base weights here, its adapter slots beside them
        shards: list[list[LoraShard]] = [getattr(p, "shards", []) for p in wrapped]
        lora.append([kernel_shards(part) for part in shards])
        lora_ctx = next((p.ctx for p in wrapped if hasattr(p, "ctx")), lora_ctx)
        projections = [getattr(p, "base", p) for p in wrapped]
        if not all(type(p) in (nn.Linear, QuantLinear) for p in projections):
            return None
        weights = [p.packed if isinstance(p, QuantLinear) else p.weight for p in projections]
        qtypes.append([LAYOUTS[p.qtype][0] if isinstance(p, QuantLinear) else -1 for p in projections])
        norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        tensors.append([norms[0], weights[0], weights[1], norms[1], *weights[2:], attn.k_cache, attn.v_cache])
    stack = ops.DecodeStack(
        tensors, qtypes, model.norm.weight, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
        cfg.intermediate_size, cfg.rms_norm_eps, cfg.head_dim**-0.5, kernel_row_limit(activation_bits),
        activation_bits,
    )  # fmt: skip
    if lora_ctx is not None:
        stack.set_lora(lora)
    return DecodeStep(model, stack, lora_ctx)
