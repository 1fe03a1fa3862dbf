"""The driver contract: what the kernel needs of a decoder model family.

A driver is one file (llama.py, gpt2.py), a plain `torch.nn.Module` in LitGPT style, registered by
its checkpoint's `architectures` name in `models/__init__.py`. Adding a family is adding one file
that satisfies `DecoderDriver`:

- `Config.from_hf(config_json) -> Config`: a dataclass with at least `vocab_size`, `num_layers`,
  `num_kv_heads`, `head_dim` (the runner sizes the KV cache from them), `max_position_embeddings`
  and `tie_word_embeddings`. Architectures of one family differ by its fields, not by subclasses.
- `forward(input_ids, positions, attn_metadata) -> hidden`: one flat batch of new tokens
  ([T] ids and positions, prefill chunks and decodes mixed) to the final hidden states [T, hidden].
  Attention goes through `ops.attention.paged_attention` with the shared `AttentionMetadata`.
- `compute_logits(hidden) -> logits`: hidden states [N, hidden] to next-token logits [N, vocab]; the
  runner calls it only for the rows that sample or score, then samples itself.
- `attention_layers() -> list[nn.Module]`: the modules that own `k_cache` and `v_cache`, in layer
  order; the runner binds each to its slice of the one KV cache tensor.
- `map_weight(checkpoint_name, tensor) -> (parameter_name, shard, tensor) | None` and
  `shard_sizes(parameter_name) -> list[int] | None`: the weight-name mapping the loader uses to
  fill the parameters from Hugging Face checkpoints (None skips a tensor; `shard` indexes a packed
  parameter such as q/k/v in one matrix, whose parts `shard_sizes` gives).
- `embed_tokens` and `lm_head`: the input embedding and output head under these names (the loader
  ties them, and swaps in GGUF-block modules, by name).

A driver holds no engine state: which path a step takes (e.g. the CPU decode stack of
ops/decode_stack.py) is the runner's choice, not the model file's.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from llmasos.ops.attention import AttentionMetadata


@runtime_checkable
class DecoderDriver(Protocol):
    config: Any  # the family's Config dataclass (see above for the fields the kernel reads)
    embed_tokens: nn.Module
    lm_head: nn.Module

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def attention_layers(self) -> list[nn.Module]: ...

    def map_weight(self, name: str, tensor: torch.Tensor) -> tuple[str, int | None, torch.Tensor] | None: ...

    def shard_sizes(self, param_name: str) -> list[int] | None: ...
