"""Engine configuration: one dataclass, defaults that work on a laptop CPU.

Every field maps to one CLI flag of `llmasos run` / `llmasos serve`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmasos.errors import LLMasOSError

SCHEDULING_POLICIES = ("fcfs", "las")
CONTEXT_POLICIES = ("none", "pin", "swap")
DISTRIBUTED_EXECUTORS = ("mp", "ray")
RAY_PLACEMENTS = ("PACK", "STRICT_SPREAD", "SPREAD", "STRICT_PACK")
SPECULATIVE_METHODS = (None, "ngram", "draft")
# most drafted tokens per sequence and step, by method, where num_speculative_tokens is not given: prompt
# lookup's drafts cost nothing to find and a CPU verifies only as many as pay (kernel/speculative.py), so
# it looks as far ahead as llama.cpp's lookup decoding (16; docs/benchmarks.md C5: edit 2.7x -> 4.2x
# its plain decode, summarize 1.64x -> 1.71x, against 4); each of a draft model's costs one of its forwards
SPECULATIVE_TOKENS = {"ngram": 16, "draft": 4}


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
    # what runs ranks 1..N-1: "mp" (processes on this machine) or "ray" (Ray actors placed on the
    # machines of a Ray cluster by a placement group, kernel/ray_executor.py; needs llmasos[ray])
    distributed_executor: str = "mp"
    ray_address: str | None = None  # the cluster to join ("HOST:6379"); None: RAY_ADDRESS, else a local one
    # how the placement group spreads the ranks: "PACK" (fill a machine first), "STRICT_SPREAD" (one
    # rank per machine), "SPREAD" or "STRICT_PACK" (Ray's placement strategies)
    ray_placement: str = "PACK"
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
    # a prefix cache that survives restarts (kernel/disk_cache.py): full KV blocks written to disk, at most
    # this many GB (least recently used evicted), read back when a prompt's prefix matches; None: off
    kv_disk_cache_gb: float | None = None
    kv_disk_cache_dir: str | None = None  # None: $LLMASOS_HOME/cache/kv
    # Multi-LoRA (kernel/lora.py): requests name an adapter of this model (SamplingParams.lora), applied
    # per row, never merged; max_loras adapters are loaded at once (the least recently used idle one
    # is unloaded for a new one), each of rank up to max_lora_rank
    enable_lora: bool = False
    max_loras: int = 8
    max_lora_rank: int = 16
    # speculative decoding (kernel/speculative.py): "ngram" drafts by prompt lookup (the last few tokens
    # found earlier in the sequence propose what followed them), verified k + 1 tokens per forward;
    # None: off. Greedy output is the same as without it; sampled output follows the same distribution.
    # "draft": a smaller model with the same tokenizer, speculative_model, drafts greedily (kernel/draft.py)
    speculative: str | None = None
    num_speculative_tokens: int | None = None  # most drafted tokens per sequence and step (None: by method)
    speculative_model: str | None = None  # the draft model for "draft": a store name or a model folder

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
        if self.distributed_executor not in DISTRIBUTED_EXECUTORS:
            raise LLMasOSError(
                f"unknown distributed_executor {self.distributed_executor!r}; "
                f"choose one of {', '.join(DISTRIBUTED_EXECUTORS)}"
            )
        if self.ray_placement not in RAY_PLACEMENTS:
            raise LLMasOSError(
                f"unknown ray_placement {self.ray_placement!r}; choose one of {', '.join(RAY_PLACEMENTS)}"
            )
        if self.kv_disk_cache_gb is not None and self.kv_disk_cache_gb <= 0:
            raise LLMasOSError(
                f"kv_disk_cache_gb must be positive, not {self.kv_disk_cache_gb}; leave it unset to turn "
                "the disk cache off"
            )
        if self.kv_disk_cache_gb is not None and self.tensor_parallel_size > 1:
            raise LLMasOSError(
                "kv_disk_cache_gb works with one process per model; use tensor_parallel_size 1 with it"
            )
        if self.kv_disk_cache_gb is not None and not self.enable_prefix_caching:
            raise LLMasOSError("kv_disk_cache_gb extends the prefix cache; it needs enable_prefix_caching")
        if self.enable_lora and (self.max_loras < 1 or self.max_lora_rank < 1):
            raise LLMasOSError(
                f"max_loras and max_lora_rank must be at least 1, "
                f"not {self.max_loras} and {self.max_lora_rank}"
            )
        if self.enable_lora and self.tensor_parallel_size > 1:
            raise LLMasOSError("enable_lora runs on one process: set tensor_parallel_size to 1")
        if self.speculative not in SPECULATIVE_METHODS:
            raise LLMasOSError(
                f"unknown speculative method {self.speculative!r}; "
                "choose ngram (prompt lookup), draft (a smaller model, speculative_model) or leave it off"
            )
        if (self.speculative == "draft") != (self.speculative_model is not None):
            raise LLMasOSError(
                "speculative='draft' and speculative_model go together: name the draft model with "
                "speculative_model (--draft-model), or leave both unset"
            )
        if self.speculative == "draft" and self.tensor_parallel_size > 1:
            raise LLMasOSError("speculative='draft' runs on one process: set tensor_parallel_size to 1")
        if self.num_speculative_tokens is None:
            self.num_speculative_tokens = SPECULATIVE_TOKENS[self.speculative or "ngram"]
        if self.num_speculative_tokens < 1:
            raise LLMasOSError(
                f"num_speculative_tokens must be at least 1, not {self.num_speculative_tokens}"
            )
        if self.speculative is not None and self.enable_lora:
            raise LLMasOSError(
                "speculative decoding and enable_lora do not run together yet; turn one of them off"
            )
        if self.agent_kv_quota_blocks is not None and self.agent_kv_quota_blocks < 1:
            raise LLMasOSError(f"agent_kv_quota_blocks must be at least 1, not {self.agent_kv_quota_blocks}")
