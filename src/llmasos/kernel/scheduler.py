"""The process scheduler: which sequences run this step, and how many tokens each.

vLLM v1's single idea: one token budget per step, handed out to sequences. A running sequence
asks for what it lacks (1 token when decoding, a chunk when its prefill is still going); a
waiting one asks for its uncached prompt. Running sequences go first (decode first, so streams
keep flowing), then waiting ones in (priority, arrival) order, each prefill cut to what is left
of the budget (chunked prefill). A sequence's blocks enter the prefix cache as soon as they are
scheduled to be filled, so two equal prompts arriving together share one prefill, as in vLLM v1.
When the KV cache runs out, pinned context is given up first (swapped to CPU memory where there
is swap space), then the lowest-precedence running sequence is preempted: its blocks are freed and
it waits to be recomputed.

Agents (kernel/memory.py): an agent at its KV-block quota gives up its own pins, then preempts its
own latest sequence; it never makes another agent's sequence wait for it. A waiting sequence whose
agent is at its quota is passed over, so it holds up nobody else. Policy "las" orders the waiting
queue by (priority, the agent's attained service: tokens computed for it so far, arrival), as
Autellix does for programs, so one long agent cannot starve many short ones; "fcfs" by (priority,
arrival). The context policy says what happens to a finished turn of an agent: "none" frees its
blocks (they stay in the prefix cache until evicted), "pin" keeps them for the agent for
`pin_seconds`, "swap" pins them and, under memory pressure, copies them to CPU memory first.

With a disk cache (kernel/disk_cache.py), a waiting sequence's prefix blocks that follow its cached
ones and are on disk are read back at admission into free blocks (`BlockManager.hold_cached`), which
then count as prefix-cache hits; the step's `disk_loads` copy their KV in before the forward pass.

Pure Python over Sequence objects and block ids; tested without a model.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field

from llmasos.kernel.disk_cache import DiskPrefixCache
from llmasos.kernel.memory import BlockManager, SwapCopies
from llmasos.kernel.sequence import Sequence, SequenceStatus


@dataclass
class DiskLoad:
    """A block's KV read from the disk cache, for the runner to copy into `block_id` before the step."""

    block_id: int
    block_hash: bytes
    payload: bytes


@dataclass
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # parallel to seqs
    # parallel to seqs: the tokens each had in the cache when scheduled, so its chunk is
    # token_ids[start : start + num_new] whether or not `Scheduler.update` has run yet
    num_computed_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    published: list[int] = field(default_factory=list)  # prefix-cache blocks this step fills, published
    copies: SwapCopies = field(default_factory=SwapCopies)  # KV copies to and from CPU, before the step
    disk_loads: list[DiskLoad] = field(default_factory=list)  # KV read from disk, copied in after `copies`

    def add(self, seq: Sequence, num_new: int, block_manager: BlockManager) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new)
        self.num_computed_tokens.append(seq.num_computed_tokens)
        before = seq.num_computed_tokens
        # drafted tokens are not the sequence's until verified: only its own tokens' blocks are published
        own = min(num_new, len(seq) - before)
        self.published += block_manager.cache_full_blocks(seq, before, before + own)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        policy: str = "fcfs",
        context_policy: str = "none",
        pin_seconds: float = 30.0,
        clock=time.monotonic,
        disk: DiskPrefixCache | None = None,
    ):
        """policy and context_policy: EngineConfig's scheduling_policy and context_policy (checked there)."""
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy
        self.context_policy = context_policy
        self.pin_seconds = pin_seconds
        self.clock = clock
        self.disk = disk
        self.prefix_disk_hit_tokens = 0  # of the hits, tokens read back from the disk cache
        self.waiting: list[tuple[int, int, int, Sequence]] = []  # heap of (priority, service, seq_id, seq)
        self.running: list[Sequence] = []  # in precedence order: the last one is preempted first
        self.num_preemptions = 0
        self.prefix_queried_tokens = 0  # prefix-cache hit rate, in tokens as vLLM counts it
        self.prefix_hit_tokens = 0
        self.attained: dict[str, int] = {}  # agent -> tokens computed for it (its attained service)
        self.turns: dict[str, int] = {}  # agent -> sequences of it that finished

    def has_unfinished(self) -> bool:
        return bool(self.running) or self._peek_waiting() is not None

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        heapq.heappush(self.waiting, self._entry(seq))

    def _entry(self, seq: Sequence) -> tuple[int, int, int, Sequence]:
        service = self.attained.get(seq.agent, 0) if self.policy == "las" and seq.agent is not None else 0
        return seq.priority, service, seq.seq_id, seq

    def _peek_waiting(self) -> Sequence | None:
        while self.waiting and self.waiting[0][-1].is_finished:  # aborted while waiting
            heapq.heappop(self.waiting)
        return self.waiting[0][-1] if self.waiting else None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.draft_token_ids.clear()
        seq.events.preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    def _make_room(
        self, seq: Sequence, num_new: int, cached: list[int] = (), swapped: list[bytes] = ()
    ) -> bool:
        """Give up pinned context so seq can take num_new more tokens after its prefix (cached, then
        swapped): its agent's own pins when it is at its quota, else anyone's (oldest first; swapped
        out under "swap"). False: no pin to give."""
        bm = self.block_manager
        swap = self.context_policy == "swap"
        if bm.quota_lack_tokens(seq, num_new, cached, swapped) > 0:
            return bm.reclaim_pins(seq.agent, cached, swap)
        return bm.blocks_lacking(seq, num_new, cached, swapped) > 0 and bm.reclaim_pins(None, cached, swap)

    def _prefix(self, seq: Sequence) -> tuple[list[int], list[bytes]]:
        """seq's leading blocks computed already: cached on the GPU, then swapped out to CPU memory."""
        bm = self.block_manager
        cached = bm.find_cached_prefix(seq)
        if seq.params.prompt_logprobs is not None:  # positions it scores need their logits
            return cached[: (seq.params.prompt_logprobs_start - 1) // bm.block_size], []
        return cached, bm.find_swapped(seq, len(cached))

    def _read_from_disk(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Restore the run of seq's prefix blocks that follow its cached ones and are on disk."""
        bm = self.block_manager
        keep = set(bm.find_cached_prefix(seq))  # (which hashes seq's full blocks)
        bs = bm.block_size
        for i in range(len(keep), (len(seq) - 1) // bs):
            block_hash, tokens = seq.block_hashes[i], tuple(seq.token_ids[i * bs : (i + 1) * bs])
            payload = self.disk.load(block_hash, tokens)
            if payload is None:
                return
            block_id = bm.hold_cached(block_hash, tokens, keep)
            if block_id is None:
                return
            keep.add(block_id)
            out.disk_loads.append(DiskLoad(block_id, block_hash, payload))
            self.prefix_disk_hit_tokens += bs

    def _victim(self, seq: Sequence, num_new: int) -> Sequence:
        """Whom to preempt for seq: when its agent is at its quota, the agent's own latest sequence."""
        if self.block_manager.quota_lack_tokens(seq, num_new) > 0:
            return next(s for s in reversed(self.running) if s.agent == seq.agent)
        return self.running[-1]

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.block_manager
        bm.release_expired(self.clock())
        if self.policy == "las":  # attained service changed since the entries were made
            self.waiting = [self._entry(entry[-1]) for entry in self.waiting]
            heapq.heapify(self.waiting)

        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            lacking = len(seq) - seq.num_computed_tokens
            num_new = min(lacking + len(seq.draft_token_ids), budget)
            del seq.draft_token_ids[max(num_new - lacking, 0) :]  # drafts past the budget wait
            while not bm.allocate(seq, num_new):
                if seq.draft_token_ids:  # drafts never cost a pin or a preemption: drop them first
                    num_new -= len(seq.draft_token_ids)
                    seq.draft_token_ids.clear()
                    continue
                if self._make_room(seq, num_new):
                    continue
                victim = self._victim(seq, num_new)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.add(seq, num_new, bm)
                budget -= num_new
                index += 1

        if not out.preempted:  # under memory pressure, let the running ones finish first
            self._admit(out, budget)
        out.copies = bm.take_copies()
        # a block read from disk and then taken by a later allocation or swap-in of this step holds
        # another block's KV by now: its read is dropped (the new owner writes or copies in its own)
        out.disk_loads = [d for d in out.disk_loads if bm.blocks[d.block_id].hash == d.block_hash]
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        """Waiting sequences in queue order while the budget, max_num_seqs and memory allow; one
        whose agent is at its quota is passed over, not waited for."""
        bm = self.block_manager
        passed_over = []
        while budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self._peek_waiting()
            if seq is None:
                break
            if self.disk is not None and bm.enable_prefix_caching:
                self._read_from_disk(seq, out)
            while True:  # the whole prefix comes back or the turn waits; giving up pins may shorten it
                cached, swapped = self._prefix(seq)
                num_cached = (len(cached) + len(swapped)) * bm.block_size
                num_new = min(len(seq) - num_cached, budget)
                allocated = bm.allocate(seq, num_new, cached, swapped)
                if allocated or not self._make_room(seq, num_new, cached, swapped):
                    break
            if not allocated:
                if bm.quota_lack_tokens(seq, num_new, cached, swapped) > 0:
                    passed_over.append(heapq.heappop(self.waiting))
                    continue
                break
            heapq.heappop(self.waiting)
            if seq.agent is not None:
                bm.release_pins_hit(seq.agent, cached)
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
        for entry in passed_over:
            heapq.heappush(self.waiting, entry)

    def update(self, out: SchedulerOutput) -> None:
        """Account for a step: the scheduled tokens have their KV in the cache. It reads and writes only
        the positions fixed in `out`, so it may run before or after the runner has read them."""
        for seq, num_new, before in zip(out.seqs, out.num_new_tokens, out.num_computed_tokens):
            seq.num_computed_tokens = before + num_new
            if seq.agent is not None:
                self.attained[seq.agent] = self.attained.get(seq.agent, 0) + num_new

    def roll_back(self, seq: Sequence, num_computed: int) -> None:
        """A verify step kept fewer drafts than it computed: seq's KV is valid for its first num_computed
        tokens only. The rejected positions are written again by the next step; blocks past them go."""
        if seq.agent is not None:
            self.attained[seq.agent] -= seq.num_computed_tokens - num_computed
        seq.num_computed_tokens = num_computed
        self.block_manager.truncate(seq, num_computed)

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
        keep = self.context_policy != "none" and reason != "abort" and seq.agent is not None
        self.block_manager.free(seq, self.clock() + self.pin_seconds if keep else None)
        if seq.agent is not None:
            self.turns[seq.agent] = self.turns.get(seq.agent, 0) + 1
