"""The engine core: scheduler + runner, one step at a time, over token ids only.

It never sees text or HTTP, nor logits. Each `step()` schedules, has the runner run the flat batch
and sample, applies the token-level stop rules (EOS, stop token ids, max_tokens, context length)
and reports what happened to each sequence that produced a token or finished.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from pathlib import Path

from llmasos.config import EngineConfig
from llmasos.kernel.disk_cache import DiskPrefixCache, default_folder, model_digest
from llmasos.kernel.draft import DraftProposer
from llmasos.kernel.executor import TensorParallelExecutor
from llmasos.kernel.memory import BlockManager
from llmasos.kernel.runner import ModelRunner
from llmasos.kernel.sampler import SampledToken
from llmasos.kernel.scheduler import Scheduler
from llmasos.kernel.sequence import Sequence
from llmasos.kernel.speculative import VERIFY_COST_PER_DRAFT, NgramProposer, SpeculativeStats, can_speculate
from llmasos.kernel.structured import accept_token


@dataclass
class AgentStats:
    """One agent (kernel process) as `ps` shows it: KV blocks it references (pinned ones included),
    pinned, swapped to CPU memory; its finished turns and attained service (tokens computed)."""

    blocks: int
    pinned: int
    swapped: int
    turns: int
    attained_service: int
    running: int
    waiting: int


@dataclass
class EngineStats:
    """What a monitor reads between steps (counters are totals since start)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of blocks in use
    num_preemptions: int
    prefix_queried_tokens: int
    prefix_hit_tokens: int
    num_blocks: int = 0  # KV-cache blocks in all
    num_free_blocks: int = 0  # held by no sequence
    num_cached_free_blocks: int = 0  # of the free ones, those still holding a reusable prefix
    prefix_disk_hit_tokens: int = 0  # of prefix_hit_tokens, those read back from the disk cache
    kv_disk_cache_bytes: int | None = None  # the disk cache's folder now (None: no disk cache)
    agents: dict[str, AgentStats] = field(default_factory=dict)  # by agent id
    speculative: SpeculativeStats | None = None  # drafts and acceptances (None: the engine does not draft)


@dataclass
class StepEvent:
    seq: Sequence
    token: SampledToken | None  # None: a pooling sequence got its embedding


class EngineCore:
    def __init__(self, model_dir: Path, config: EngineConfig, eos_token_ids: list[int], max_model_len: int):
        self.config = config
        # what runs the steps: the runner itself, or with tensor_parallel_size > 1 the executor that
        # drives the worker processes (`runner` is then rank 0's, which samples)
        self.executor: ModelRunner | TensorParallelExecutor
        if config.tensor_parallel_size > 1:
            self.executor = TensorParallelExecutor(model_dir, config)
            self.runner = self.executor.runner
        else:
            self.runner = self.executor = ModelRunner(model_dir, config)
        self.block_manager = BlockManager(
            self.runner.num_blocks,
            config.block_size,
            config.enable_prefix_caching,
            quota=config.agent_kv_quota_blocks,
            num_swap_slots=self.runner.num_swap_blocks,
        )
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            policy=config.scheduling_policy,
            context_policy=config.context_policy,
            pin_seconds=config.pin_seconds,
            disk=self._disk_cache(model_dir) if config.kv_disk_cache_gb is not None else None,
        )
        self.eos_token_ids = set(eos_token_ids)
        self.max_model_len = max_model_len
        self.num_steps = 0
        self.proposer: NgramProposer | DraftProposer | None = None
        if config.speculative == "ngram":
            # a verify step's extra rows cost a CPU nearly what a plain step does; a GPU step is bound
            # by reading the weights, whatever the rows: there every draft found is worth verifying
            cost_per_draft = VERIFY_COST_PER_DRAFT if self.runner.device.type == "cpu" else 0.0
            self.proposer = NgramProposer(config.num_speculative_tokens, max_model_len, cost_per_draft)
        elif config.speculative == "draft":
            self.proposer = DraftProposer(model_dir, config, self.runner, max_model_len)
        self.spec_stats = SpeculativeStats()
        # sequences whose LoRA adapter waits for a slot that running sequences hold (kernel/lora.py)
        self.lora_waiting: deque[Sequence] = deque()

    def _disk_cache(self, model_dir: Path) -> DiskPrefixCache:
        """The disk cache, keyed by the model's files and the runner's KV layout (kernel/disk_cache.py)."""
        layout = json.dumps(self.runner.kv_layout(), sort_keys=True)
        key = hashlib.sha256(f"{model_digest(model_dir)}\n{layout}".encode()).digest()
        folder = self.config.kv_disk_cache_dir or default_folder()
        max_bytes = int(self.config.kv_disk_cache_gb * 1e9)
        return DiskPrefixCache(Path(folder), max_bytes, key, self.runner.bytes_per_block)

    def _save_to_disk(self, published: list[int]) -> None:
        """Queue the blocks this step computed for the disk cache (those not on disk already)."""
        disk, blocks = self.scheduler.disk, self.block_manager.blocks
        new = [b for b in published if blocks[b].hash is not None and not disk.has(blocks[b].hash)]
        if new:
            for block_id, payload in zip(new, self.runner.read_blocks(new)):
                disk.save(blocks[block_id].hash, blocks[block_id].token_ids, payload)

    @property
    def memory_bytes(self) -> int:
        """The runner's model and KV cache, and a draft model's."""
        draft = self.proposer.runner.memory_bytes if isinstance(self.proposer, DraftProposer) else 0
        return self.runner.memory_bytes + draft

    @property
    def kv_capacity_tokens(self) -> int:
        return self.block_manager.num_blocks * self.config.block_size

    def add(self, seq: Sequence) -> None:
        """Queue a sequence that `LLMEngine.check_context` accepted (the core does not check it again);
        one with a LoRA adapter first gets its adapter's slot, or waits for one."""
        if seq.params.lora is not None and not self._hold_adapter(seq):
            self.lora_waiting.append(seq)
            return
        self.scheduler.add(seq)

    def _hold_adapter(self, seq: Sequence) -> bool:
        slot = self.runner.lora.acquire(seq.params.lora)
        if slot is None:
            return False
        seq.lora_slot = slot
        return True

    def finish(self, seqs: list[Sequence], reason: str = "abort") -> None:
        """End sequences now and free their blocks (abort, or a stop string found in the text)."""
        for seq in seqs:
            if not seq.is_finished:
                self._finish(seq, reason)
            elif reason == "stop":  # a stop string found in the text of a sequence that just hit its length
                seq.finish_reason = reason

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.lora_waiting)

    def stats(self) -> EngineStats:
        s, bm = self.scheduler, self.block_manager
        return EngineStats(
            num_running=len(s.running),
            num_waiting=sum(1 for *_, seq in s.waiting if not seq.is_finished) + len(self.lora_waiting),
            kv_cache_usage=1 - bm.num_free_blocks / bm.num_blocks,
            num_preemptions=s.num_preemptions,
            prefix_queried_tokens=s.prefix_queried_tokens,
            prefix_hit_tokens=s.prefix_hit_tokens,
            num_blocks=bm.num_blocks,
            num_free_blocks=bm.num_free_blocks,
            num_cached_free_blocks=bm.num_cached_free_blocks,
            prefix_disk_hit_tokens=s.prefix_disk_hit_tokens,
            kv_disk_cache_bytes=s.disk.total_bytes if s.disk is not None else None,
            agents=self._agent_stats(),
            speculative=replace(self.spec_stats) if self.proposer is not None else None,
        )

    def _agent_stats(self) -> dict[str, AgentStats]:
        s, bm = self.scheduler, self.block_manager
        running = Counter(seq.agent for seq in s.running if seq.agent is not None)
        waiting = Counter(seq.agent for *_, seq in s.waiting if seq.agent is not None and not seq.is_finished)
        agents = set(s.attained) | set(s.turns) | set(bm.agent_blocks) | set(running) | set(waiting)
        return {
            agent: AgentStats(
                blocks=bm.agent_usage(agent),
                pinned=bm.pinned_blocks(agent),
                swapped=bm.swapped_blocks(agent),
                turns=s.turns.get(agent, 0),
                attained_service=s.attained.get(agent, 0),
                running=running[agent],
                waiting=waiting[agent],
            )
            for agent in sorted(agents)
        }

    def _propose(self) -> None:
        """Draft the next tokens of each running sequence that decodes (speculative decoding)."""
        for seq in self.scheduler.running:
            decoding = seq.num_computed_tokens == len(seq) - 1 and can_speculate(seq)
            seq.draft_token_ids = self.proposer.propose(seq) if decoding else []

    def step(self) -> list[StepEvent]:
        if self.proposer is not None:
            self._propose()
        out = self.scheduler.schedule()
        if out.copies:  # before any forward pass can overwrite a block swapped out
            self.executor.swap(out.copies)
        if out.disk_loads:  # after the swap copies: a block may have been swapped out, then reused
            self.runner.write_blocks([(d.block_id, d.payload) for d in out.disk_loads])
        if not out:
            return []
        try:
            if isinstance(self.proposer, DraftProposer):  # its drafts need the slots just allocated
                self.proposer.draft(out)
            result = self.executor.execute(out)
        except BaseException:
            self.scheduler.retract(out)
            raise
        self.scheduler.update(out)  # (either order: both read the positions fixed in `out`)
        if self.scheduler.disk is not None:
            self._save_to_disk(out.published)
        self.num_steps += 1
        seqs = {seq.seq_id: seq for seq in out.seqs}
        now = time.monotonic()
        events = []
        for seq_id, entries in result.prompt_logprobs.items():
            seqs[seq_id].prompt_logprobs.extend(entries)
        for seq_id, embedding in result.pooled.items():
            seq = seqs[seq_id]
            seq.embedding = embedding
            seq.events.first_token = seq.events.last_token = now
            self._finish(seq, "stop")
            events.append(StepEvent(seq, None))
        for seq_id, token in result.sampled.items():
            self._append(seqs[seq_id], token, now, events)
        for seq_id, tokens in result.verified.items():
            seq = seqs[seq_id]
            drafted = len(seq.draft_token_ids)
            self.spec_stats.num_drafts += 1
            self.spec_stats.num_draft_tokens += drafted
            self.spec_stats.num_accepted_tokens += len(tokens) - 1
            # the KV of the rejected drafts is not the sequence's: the step computed len(seq) + drafted
            self.scheduler.roll_back(seq, len(seq) + len(tokens) - 1)
            seq.draft_token_ids = []
            for token_id in tokens:
                if not seq.is_finished:  # a stop among the kept drafts ends it there
                    self._append(seq, SampledToken(token_id), now, events)
        return events

    def _append(self, seq: Sequence, token: SampledToken, now: float, events: list[StepEvent]) -> None:
        """Append a sampled token to seq, apply the stop rules and the grammar, record the event."""
        seq.append_token(token.token_id)
        if seq.events.first_token is None:
            seq.events.first_token = now
        seq.events.last_token = now
        if token.logprob is not None:
            seq.cumulative_logprob += token.logprob
            seq.logprobs.append(token.top_logprobs)
        reason = self._stop_reason(seq, token.token_id)
        if seq.matcher is not None:
            reason = accept_token(seq, token.token_id) or reason
        if reason:
            self._finish(seq, reason)
        events.append(StepEvent(seq, token))

    def shutdown(self) -> None:
        """Stop the worker processes of a split model, and finish writing the disk cache's blocks."""
        if self.scheduler.disk is not None:
            self.scheduler.disk.flush()
        if isinstance(self.executor, TensorParallelExecutor):
            self.executor.shutdown()

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        seq.matcher = None  # its grammar state is large; a finished sequence is kept by its request
        if seq in self.lora_waiting:
            self.lora_waiting.remove(seq)
        if seq.lora_slot >= 0:
            self.runner.lora.release(seq.lora_slot)
            seq.lora_slot = -1
            for waiting in list(self.lora_waiting):  # a slot may be free now
                if self._hold_adapter(waiting):
                    self.lora_waiting.remove(waiting)
                    self.scheduler.add(waiting)

    def _stop_reason(self, seq: Sequence, token_id: int) -> str | None:
        p = seq.params
        if token_id in p.stop_token_ids or (not p.ignore_eos and token_id in self.eos_token_ids):
            seq.stop_reason = token_id if token_id in p.stop_token_ids else None
            return "stop"
        if seq.num_output_tokens >= p.max_tokens or len(seq) >= self.max_model_len:
            return "length"
        return None
