"""The process scheduler: which sequences run this step, and how many tokens each.

vLLM v1's single idea: one token budget per step, handed out to sequences. A running sequence
asks for what it lacks (1 token when decoding, a chunk when its prefill is still going); a
waiting one asks for its uncached prompt. Running sequences go first (decode first, so streams
keep flowing), then waiting ones in (priority, arrival) order, each prefill cut to what is left
of the budget (chunked prefill). A sequence's blocks enter the prefix cache as soon as they are
scheduled to be filled, so two equal prompts arriving together share one prefill, as in vLLM v1.
When the KV cache runs out, the lowest-precedence running
sequence is preempted: its blocks are freed and it waits to be recomputed.

Pure Python over Sequence objects and block ids; tested without a model.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field

from llmasos.kernel.memory import BlockManager
from llmasos.kernel.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # parallel to seqs
    # parallel to seqs: the tokens each had in the cache when scheduled, so its chunk is
    # token_ids[start : start + num_new] whether or not `Scheduler.update` has run yet
    num_computed_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    published: list[int] = field(default_factory=list)  # prefix-cache blocks this step fills, published

    def add(self, seq: Sequence, num_new: int, block_manager: BlockManager) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new)
        self.num_computed_tokens.append(seq.num_computed_tokens)
        before = seq.num_computed_tokens
        self.published += block_manager.cache_full_blocks(seq, before, before + num_new)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[tuple[int, int, Sequence]] = []  # heap of (priority, seq_id, seq)
        self.running: list[Sequence] = []  # in precedence order: the last one is preempted first
        self.num_preemptions = 0
        self.prefix_queried_tokens = 0  # prefix-cache hit rate, in tokens as vLLM counts it
        self.prefix_hit_tokens = 0

    def has_unfinished(self) -> bool:
        return bool(self.running) or self._peek_waiting() is not None

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        heapq.heappush(self.waiting, (seq.priority, seq.seq_id, seq))

    def _peek_waiting(self) -> Sequence | None:
        while self.waiting and self.waiting[0][2].is_finished:  # aborted while waiting
            heapq.heappop(self.waiting)
        return self.waiting[0][2] if self.waiting else None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.events.preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = min(len(seq) - seq.num_computed_tokens, budget)
            while not bm.allocate(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.add(seq, num_new, bm)
                budget -= num_new
                index += 1

        if not out.preempted:  # under memory pressure, let the running ones finish first
            while budget > 0 and len(self.running) < self.max_num_seqs:
                seq = self._peek_waiting()
                if seq is None:
                    break
                cached = bm.find_cached_prefix(seq)
                if seq.params.prompt_logprobs is not None:  # positions it scores need their logits
                    cached = cached[: (seq.params.prompt_logprobs_start - 1) // bm.block_size]
                num_cached = len(cached) * bm.block_size
                num_new = min(len(seq) - num_cached, budget)
                if not bm.allocate(seq, num_new, cached):
                    break
                heapq.heappop(self.waiting)
                self.prefix_queried_tokens += len(seq)
                self.prefix_hit_tokens += num_cached
                seq.num_computed_tokens = num_cached
                seq.status = SequenceStatus.RUNNING
                if seq.events.scheduled is None:
                    seq.events.scheduled = time.monotonic()
                    seq.num_cached_tokens = num_cached
                self.running.append(seq)
                out.add(seq, num_new, bm)
                budget -= num_new
        return out

    def update(self, out: SchedulerOutput) -> None:
        """Account for a step: the scheduled tokens have their KV in the cache. It reads and writes only
        the positions fixed in `out`, so it may run before or after the runner has read them."""
        for seq, num_new, before in zip(out.seqs, out.num_new_tokens, out.num_computed_tokens):
            seq.num_computed_tokens = before + num_new

    def retract(self, out: SchedulerOutput) -> None:
        """The step failed before its KV was written: the blocks it published hold nothing."""
        self.block_manager.uncache(out.published)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End seq (stop, length or abort) and free its blocks at once."""
        if seq.is_finished:
            return
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        seq.events.finished = time.monotonic()
        if seq in self.running:
            self.running.remove(seq)
        self.block_manager.free(seq)
