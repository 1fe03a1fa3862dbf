"""Engine configuration: one dataclass, defaults that work on a laptop CPU.

Every field maps to one CLI flag of `llmasos run` / `llmasos serve`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmasos.errors import LLMasOSError

SCHEDULING_POLICIES = ("fcfs", "las")
CONTEXT_POLICIES = ("none", "pin", "swap")
SPECULATIVE_METHODS = (None, "ngram")


@dataclass
class EngineConfig:
    max_model_len: int | None = None  # None: the model's own context length
    max_num_seqs: int = 64  # most sequences in one step
    max_num_batched_tokens: int = 2048  # the scheduler's token budget per step (chunked prefill)
    block_size: int = 16  # tokens per KV cache block
    kv_cache_gib: float | None = None  # None: sized from the device's memory
    num_kv_blocks: int | None = None  # overrides kv_cache_gib (tests use it to force preemption)
    enable_prefix_caching: bool = True
    device: str | None = None  # None: cuda if available, else cpu
    dtype: str | None = None  # None: bfloat16 on cuda, float32 on cpu
    # CPU: run GGUF-quantized matrices in their blocks (integer dot products, as llama.cpp) instead
    # of their float32 copies, when the model has them and the kernels build; False keeps float32
    gguf_blocks: bool = True
    # the integers the block kernels round activations to, per block of 32: 16 (greedy tokens as the
    # float model's but at near-ties) or 8 (llama.cpp's; about twice the batched rows a second)
    activation_bits: int = 16
    # "torch" (the PyTorch reference, with fused C++ ops on CPU) or "triton" (the Triton kernels of
    # ops/triton_attention.py); None: torch. Triton on CUDA is measured on a GPU before it is the default.
    attention_backend: str | None = None
    # CPU, float32: run a decode-only step's layers in one C++ call (ops/decode_stack.py; same numbers)
    # where the model's layout allows; False keeps the layer-by-layer Python path
    decode_stack: bool = True
    # split the model over this many processes on this machine (tensor parallelism, kernel/executor.py):
    # each holds 1/N of every matrix and of the KV cache; the driver process is rank 0 and samples
    tensor_parallel_size: int = 1
    seed: int = 0  # seeds requests that give no seed of their own, so runs are reproducible
    # Agents (kernel processes; see kernel/scheduler.py). The waiting queue's order after priority:
    # "fcfs" (arrival) or "las" (least attained service per agent, then arrival)
    scheduling_policy: str = "fcfs"
    # a finished turn of an agent: "none" frees its blocks (cached until evicted), "pin" keeps them for
    # its agent for pin_seconds, "swap" pins them and copies them to CPU memory under memory pressure
    context_policy: str = "none"
    pin_seconds: float = 30.0
    agent_kv_quota_blocks: int | None = None  # most KV blocks one agent holds (None: no limit)
    agent_priority: dict[str, int] = field(default_factory=dict)  # agent -> priority class (lower first)
    swap_blocks: int | None = None  # CPU blocks for "swap" (None: as many as the KV cache has)
    # speculative decoding (kernel/speculative.py): "ngram" drafts by prompt lookup (the last few tokens
    # found earlier in the sequence propose what followed them), verified k + 1 tokens per forward;
    # None: off. Greedy output is the same as without it; sampled output follows the same distribution.
    speculative: str | None = None
    num_speculative_tokens: int = 4  # most drafted tokens per sequence and step

    def __post_init__(self) -> None:
        if self.activation_bits not in (8, 16):  # here, so `serve` refuses it before loading any model
            raise LLMasOSError(f"activation_bits must be 8 or 16, not {self.activation_bits}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise LLMasOSError(
                f"unknown scheduling_policy {self.scheduling_policy!r}; "
                f"choose one of {', '.join(SCHEDULING_POLICIES)}"
            )
        if self.context_policy not in CONTEXT_POLICIES:
            raise LLMasOSError(
                f"unknown context_policy {self.context_policy!r}; choose one of {', '.join(CONTEXT_POLICIES)}"
            )
        if self.tensor_parallel_size < 1:
            raise LLMasOSError(f"tensor_parallel_size must be at least 1, not {self.tensor_parallel_size}")
        if self.speculative not in SPECULATIVE_METHODS:
            raise LLMasOSError(
                f"unknown speculative method {self.speculative!r}; "
                "choose ngram (prompt lookup) or leave it off"
            )
        if self.num_speculative_tokens < 1:
            raise LLMasOSError(
                f"num_speculative_tokens must be at least 1, not {self.num_speculative_tokens}"
            )
        if self.agent_kv_quota_blocks is not None and self.agent_kv_quota_blocks < 1:
            raise LLMasOSError(f"agent_kv_quota_blocks must be at least 1, not {self.agent_kv_quota_blocks}")
