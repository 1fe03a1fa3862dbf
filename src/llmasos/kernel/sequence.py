"""Sequence: the state of one generated sequence as the kernel sees it (token ids, never text).

A request with n > 1 fans out into n sequences. Like vLLM v1, progress is one number,
`num_computed_tokens`: how many of `token_ids` already have their KV in the cache. The scheduler
grants each sequence a number of new tokens per step; prefill, chunked prefill, prefix-cache hits,
decode and recompute after preemption are all the same move of that number.
"""

from __future__ import annotations

import enum
import itertools
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llmasos.sampling_params import SamplingParams

if TYPE_CHECKING:
    from llguidance import LLMatcher

    from llmasos.kernel.lookup import DraftRecord


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SequenceEvents:
    """Timestamps of the sequence's life, from which metrics are computed off the hot path."""

    queued: float = field(default_factory=time.monotonic)
    scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    preemptions: int = 0


_seq_ids = itertools.count()


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    index: int = 0  # which of the request's n outputs
    priority: int = 0  # lower runs first, as in vLLM
    seed: int | None = None  # None: the request's seed + index, or a random one for unseeded requests
    pooling: bool = False  # an embedding request: its prompt's last hidden state, and no tokens
    embedding: list[float] | None = None
    cache_salt: bytes = b""  # starts the prefix-cache hash chain: tenants with different salts share nothing
    agent: str | None = None  # the agent (kernel process) it is a turn of: its quota, pins and service
    lora_slot: int = -1  # the slot of its LoRA adapter while it holds one (kernel/lora.py); -1: none
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache when first scheduled
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of its full blocks
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: str | int | None = None  # the stop string or token that ended it
    logprobs: list[dict[int, float]] = field(default_factory=list)
    # per prompt position: the token's logprob given those before it and the top alternatives (None for
    # the first, and for those before params.prompt_logprobs_start)
    prompt_logprobs: list[dict[int, float] | None] = field(init=False)
    cumulative_logprob: float = 0.0
    events: SequenceEvents = field(default_factory=SequenceEvents)
    # speculative decoding (kernel/speculative.py): this step's drafted next tokens, verified by the step
    # after the last token; never part of token_ids, so nothing unverified is hashed, cached or emitted
    draft_token_ids: list[int] = field(default_factory=list)
    # of token_ids, how many have their KV in a draft model's cache (kernel/draft.py)
    num_draft_computed_tokens: int = 0
    draft_record: DraftRecord | None = field(default=None, repr=False)  # what its lookups were worth lately
    # structured output: the grammar's state after the output so far (None: unconstrained, or finished)
    matcher: LLMatcher | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        self.prompt_logprobs = [None] * min(self.params.prompt_logprobs_start, len(self.prompt_token_ids))
        if self.seed is None:
            seed = self.params.seed
            self.seed = seed + self.index if seed is not None else random.getrandbits(31)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
