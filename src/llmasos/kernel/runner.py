"""The model runner: owns the model and the KV cache tensors; turns a scheduled step into one
flat batch, runs the forward pass and samples (kernel/sampler.py), and returns token ids, never
logits: only the sampled tokens, the logprobs asked for and pooled embeddings cross its boundary,
so a runner could live in another process.

Block tables become cache slots here (slot = block_id * block_size + offset), once per step,
in an `AttentionMetadata` that every layer shares.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmasos.config import EngineConfig
from llmasos.errors import LLMasOSError
from llmasos.kernel.lora import LoraSlots
from llmasos.kernel.memory import SwapCopies
from llmasos.kernel.rejection import verify
from llmasos.kernel.sampler import SampledToken, sample
from llmasos.kernel.scheduler import SchedulerOutput
from llmasos.kernel.sequence import Sequence
from llmasos.models.loader import load_model
from llmasos.models.parallel import SINGLE, TensorParallel, kv_heads_per_rank
from llmasos.ops.attention import AttentionMetadata, PrefillChunk, TritonBatch
from llmasos.ops.decode_stack import DecodeStep, build_decode_stack, is_decode_only
from llmasos.ops.lora import LoraBatch


@dataclass
class RunnerOutput:
    """What one step gives the engine core, by seq_id, in the order the sequences were scheduled."""

    # the next token of each sequence whose step reached its end (with its logprobs if it asked)
    sampled: dict[int, SampledToken] = field(default_factory=dict)
    pooled: dict[int, list[float]] = field(default_factory=dict)  # embeddings of finished pooling prompts
    prompt_logprobs: dict[int, list[dict[int, float]]] = field(default_factory=dict)  # this step's new ones
    # sequences that verified drafts: the drafts kept, then the model's next token (kernel/rejection.py)
    verified: dict[int, list[int]] = field(default_factory=dict)


@dataclass
class PromptScoring:
    """Rows of the flat batch whose logits score the prompt tokens that follow them."""

    seq: Sequence
    rows: range
    targets: list[int]  # the prompt token each row predicts


@dataclass
class StepSeq:
    """One scheduled sequence as plain data: its new tokens, from position `start`, and its block table."""

    token_ids: list[int]
    start: int
    block_table: list[int]
    lora_slot: int = -1  # the slot of its LoRA adapter (kernel/lora.py), -1: none
    num_draft: int = 0  # of token_ids, the last ones drafted by speculative decoding (to be verified)


@dataclass
class Step:
    """The scheduler's decision as plain data (no Sequence objects), which is all a tensor-parallel
    worker needs to run the same step as rank 0: the batch, and the rows whose logits are computed."""

    seqs: list[StepSeq]
    logit_rows: list[int]  # the last row of each sequence that reaches its end and samples (and its drafts')
    scoring: list[range]  # rows whose logits score prompt tokens (prompt logprobs), per sequence


@dataclass
class Plan:
    """A step as rank 0 runs it: the plain `Step`, and the sequences its rows belong to."""

    step: Step
    sampled: list[Sequence]  # the sequences of step.logit_rows, in order
    num_drafts: list[int]  # parallel to sampled: each one's drafted tokens (its rows: 1 + that many)
    pooled: list[tuple[Sequence, int]]  # pooling sequences whose prompt is done, and their last row
    scoring: list[PromptScoring]


def plan(out: SchedulerOutput) -> Plan:
    """The step the scheduler decided, as plain data for every rank, plus what rank 0 needs to sample.
    A sequence with drafts (speculative decoding) runs its last token and its drafts, and samples from
    each of their rows."""
    seqs, logit_rows, sampled, num_drafts, pooled, scoring = [], [], [], [], [], []
    row = 0
    for seq, num_new, start in zip(out.seqs, out.num_new_tokens, out.num_computed_tokens):
        end = start + num_new
        own_end = min(end, len(seq))  # past it: the drafts the scheduler granted (kernel/scheduler.py)
        drafts = seq.draft_token_ids[: end - own_end]
        seqs.append(
            StepSeq(
                seq.token_ids[start:own_end] + drafts,
                start,
                list(seq.block_table),
                seq.lora_slot,
                len(drafts),
            )
        )
        if seq.params.prompt_logprobs is not None:
            # position p predicts token p + 1; positions already scored (before a preemption) are skipped
            first, last = max(start, len(seq.prompt_logprobs) - 1), min(end, seq.num_prompt_tokens - 1)
            if first < last:
                rows = range(row + first - start, row + last - start)
                scoring.append(PromptScoring(seq, rows, seq.token_ids[first + 1 : last + 1]))
        row += num_new
        if own_end == len(seq) and seq.pooling:
            pooled.append((seq, row - 1))
        elif own_end == len(seq):
            logit_rows.extend(range(row - 1 - len(drafts), row))
            sampled.append(seq)
            num_drafts.append(len(drafts))
    return Plan(Step(seqs, logit_rows, [s.rows for s in scoring]), sampled, num_drafts, pooled, scoring)


# logits of at most this many floats at a time when scoring prompts (~128 MB, and its log_softmax)
_SCORING_FLOATS = 1 << 25


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class ModelRunner:
    def __init__(self, model_dir: Path, config: EngineConfig, tp: TensorParallel = SINGLE):
        """`tp`: this runner's rank of a model split over several processes (kernel/executor.py); each
        rank holds its shard of the weights and a KV cache of its own heads, as many blocks on every rank."""
        self.config, self.tp = config, tp
        self.device = torch.device(config.device) if config.device else default_device()
        if self.device.type == "cuda" and tp.size > 1:
            self.device = torch.device("cuda", tp.rank % torch.cuda.device_count())
        default_dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.dtype = getattr(torch, config.dtype or default_dtype)
        self._check_attention_backend()
        gguf_blocks = self._can_use_gguf_blocks()
        self.model = load_model(
            model_dir, self.device, self.dtype, gguf_blocks, activation_bits=config.activation_bits, tp=tp
        )
        self.block_size = config.block_size
        cfg = self.model.config
        self.num_kv_heads = kv_heads_per_rank(cfg.num_kv_heads, tp)
        self.num_blocks = tp.min(config.num_kv_blocks or self._blocks_that_fit())
        # empty, not zeros: the OS hands out pages as they are first written, so a large cache costs
        # nothing at start-up; attention only ever reads slots that were written (padding is clamped)
        self.kv_cache = torch.empty(
            2, cfg.num_layers, self.num_blocks, self.block_size, self.num_kv_heads, cfg.head_dim,
            device=self.device, dtype=self.dtype,
        )  # fmt: skip
        # CPU memory that agents' pinned blocks are swapped out to (context_policy "swap"); empty like
        # the cache, so it costs nothing until a block is swapped out
        self.num_swap_blocks = (
            (config.swap_blocks if config.swap_blocks is not None else self.num_blocks)
            if config.context_policy == "swap"
            else 0
        )
        self.swap_cache = torch.empty(
            2, cfg.num_layers, self.num_swap_blocks, self.block_size, self.num_kv_heads, cfg.head_dim,
            dtype=self.dtype, pin_memory=self.device.type == "cuda" and self.num_swap_blocks > 0,
        )  # fmt: skip
        for i, layer in enumerate(self.model.attention_layers()):  # the driver contract (models/base.py)
            layer.k_cache, layer.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        # LoRA adapters applied per row over the base weights (enable_lora; kernel/lora.py)
        self.lora = None
        if config.enable_lora:
            self.lora = LoraSlots(self.model, model_dir, config.max_loras, config.max_lora_rank)
        # decode-only steps on CPU in float32 go through the C++ decode stack when the model fits it
        # (one rank: the stack has no collectives)
        self.use_decode_stack = (
            config.decode_stack and self.device.type == "cpu" and self.dtype == torch.float32 and tp.size == 1
        )
        self.decode_stack: DecodeStep | None = None  # built on the first decode-only step

    def _check_attention_backend(self) -> None:
        backend = self.config.attention_backend
        if backend not in (None, "torch", "triton"):
            raise LLMasOSError(f"unknown attention_backend {backend!r}; choose torch or triton")
        if backend == "triton":
            try:
                from llmasos.ops.triton_attention import triton_available
            except ImportError as exc:
                raise LLMasOSError(
                    "attention_backend='triton' needs the triton package (pip install triton)"
                ) from exc
            if not triton_available(self.device):
                raise LLMasOSError(
                    "attention_backend='triton' needs a CUDA GPU of compute capability 8.0 or newer "
                    "(or TRITON_INTERPRET=1, Triton's CPU interpreter, for tests)"
                )

    def _can_use_gguf_blocks(self) -> bool:
        from llmasos.ops.quant import kernels

        return (
            self.config.gguf_blocks
            and self.device.type == "cpu"
            and self.dtype == torch.float32
            and bool(kernels())
        )

    @property
    def memory_bytes(self) -> int:
        """The model's tensors plus the KV cache tensor."""
        tensors = [*self.model.parameters(), *self.model.buffers(), self.kv_cache]
        lora = self.lora.slot_bytes * self.lora.num_slots if self.lora is not None else 0
        return sum(t.numel() * t.element_size() for t in tensors) + lora

    @property
    def bytes_per_block(self) -> int:
        cfg = self.model.config
        return 2 * cfg.num_layers * self.block_size * self.num_kv_heads * cfg.head_dim * self.dtype.itemsize

    def _blocks_that_fit(self) -> int:
        """Size the cache: the configured GiB, else a share of free memory (capped on CPU: RAM is shared)."""
        if self.config.kv_cache_gib is not None:
            budget = int(self.config.kv_cache_gib * 2**30)
        elif self.device.type == "cuda":
            budget = int(free_memory_bytes(self.device) * 0.85)
        else:
            budget = min(int(free_memory_bytes(self.device) * 0.25), 4 * 2**30)
        return max(budget // self.bytes_per_block, 1)

    def swap(self, copies: SwapCopies) -> None:
        """Copy blocks' KV (every layer, K and V) out to CPU slots, then CPU slots into blocks, as the
        block manager decided (kernel/memory.py): out first, since a block may be swapped out and
        reused in one step."""
        if copies.out:
            blocks, slots = zip(*copies.out)
            self.swap_cache[:, :, list(slots)] = self.kv_cache[:, :, list(blocks)].to("cpu")
        if copies.into:
            slots, blocks = zip(*copies.into)
            self.kv_cache[:, :, list(blocks)] = self.swap_cache[:, :, list(slots)].to(self.device)

    def kv_layout(self) -> dict:
        """What makes this runner's KV bytes what they are, besides the model's files: a block saved by one
        runner is read back only by a runner with the same layout (kernel/disk_cache.py)."""
        cfg = self.model.config
        return {
            "dtype": str(self.dtype),
            "device": self.device.type,
            "shape": [2, cfg.num_layers, self.block_size, self.num_kv_heads, cfg.head_dim],
            "gguf_blocks": self._can_use_gguf_blocks(),
            "activation_bits": self.config.activation_bits,
            "attention_backend": self.config.attention_backend or "torch",
        }

    def read_blocks(self, block_ids: list[int]) -> list[bytes]:
        """The blocks' KV (every layer, K and V) as raw bytes, one block each, for the disk cache."""
        blocks = self.kv_cache[:, :, block_ids].to("cpu").movedim(2, 0).contiguous()
        return [block.view(torch.uint8).numpy().tobytes() for block in blocks]

    def write_blocks(self, blocks: list[tuple[int, bytes]]) -> None:
        """Copy KV bytes that `read_blocks` gave (by an earlier engine, perhaps) into blocks."""
        shape = self.kv_cache[:, :, 0].shape
        for block_id, payload in blocks:
            kv = torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(self.dtype).view(shape)
            self.kv_cache[:, :, block_id] = kv.to(self.device)

    def _slots(self, block_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return block_table[positions // self.block_size] * self.block_size + positions % self.block_size

    def prepare(self, step: Step) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """The step's flat inputs: token ids, positions, and the attention metadata every layer shares."""
        input_ids, positions, slot_mapping, prefills = [], [], [], []
        decode_rows, decode_tables, decode_lens = [], [], []
        row = 0
        for seq in step.seqs:
            num_new, start = len(seq.token_ids), seq.start
            end = start + num_new
            table = torch.tensor(seq.block_table)
            pos = torch.arange(start, end)
            input_ids.extend(seq.token_ids)
            positions.append(pos)
            slot_mapping.append(self._slots(table, pos))
            if start > 0 and (num_new == 1 or seq.num_draft):
                # a decode token, or a speculative step's last token and its drafts: each row attends
                # its own causal prefix as a decode row does, so the step keeps the fast decode path
                for i in range(num_new):
                    decode_rows.append(row + i)
                    decode_tables.append(seq.block_table)
                    decode_lens.append(start + i + 1)
            elif start == 0:
                prefills.append(PrefillChunk(row, row + num_new, None, None))
            else:
                context = torch.arange(end)
                mask = context.unsqueeze(0) <= pos.unsqueeze(1)
                prefills.append(PrefillChunk(row, row + num_new, self._slots(table, context).to(self.device),
                                             mask.to(self.device)))  # fmt: skip
            row += num_new
        md = AttentionMetadata(slot_mapping=torch.cat(slot_mapping).to(self.device), prefills=prefills)
        if self.config.attention_backend == "triton":
            md.triton = self._triton_batch(step)
        if decode_rows:
            max_len = max(decode_lens)
            width = -(-max_len // self.block_size)
            tables = torch.tensor([t[:width] + [t[0]] * (width - len(t[:width])) for t in decode_tables])
            lens = torch.tensor(decode_lens).unsqueeze(1)
            # padding positions repeat the last real one (masked out, but never unwritten memory)
            context = torch.minimum(torch.arange(max_len).unsqueeze(0), lens - 1)
            md.decode_rows = torch.tensor(decode_rows, device=self.device)
            slots = tables.gather(1, context // self.block_size) * self.block_size + context % self.block_size
            md.decode_kv_slots = slots.to(self.device)
            if min(decode_lens) != max_len:
                md.decode_mask = (torch.arange(max_len).unsqueeze(0) < lens)[:, None, None, :].to(self.device)
        if self.lora is not None:
            self.lora.ctx.batch = self._lora_batch(step, row)
        ids = torch.tensor(input_ids, device=self.device)
        return ids, torch.cat(positions).to(self.device), md

    def _lora_batch(self, step: Step, num_rows: int) -> LoraBatch | None:
        """Each row's adapter slot: every row's for the CPU kernel, and for the other devices' path
        decode rows one by one (BGMV), prefill chunks as segments (SGMV)."""
        row_slots, segments, row = [-1] * num_rows, [], 0
        for seq in step.seqs:
            num_new = len(seq.token_ids)
            if seq.lora_slot >= 0 and num_new == 1 and seq.start > 0:
                row_slots[row] = seq.lora_slot
            elif seq.lora_slot >= 0:
                segments.append((row, row + num_new, seq.lora_slot))
            row += num_new
        if not segments and max(row_slots) < 0:
            return None
        slots = torch.tensor(row_slots)
        for start, end, slot in segments:
            slots[start:end] = slot
        decode = torch.tensor(row_slots, device=self.device) if max(row_slots) >= 0 else None
        return LoraBatch(slots, decode, segments)

    def _triton_batch(self, step: Step) -> TritonBatch:
        lens = [seq.start + len(seq.token_ids) for seq in step.seqs]
        width = max(len(seq.block_table) for seq in step.seqs)
        tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq in step.seqs]
        starts = [0]
        for seq in step.seqs:
            starts.append(starts[-1] + len(seq.token_ids))

        def int32(values) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32, device=self.device)

        max_new = max(len(seq.token_ids) for seq in step.seqs)
        return TritonBatch(int32(tables), int32(starts), int32(lens), max_new)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, planned: Plan | None = None) -> RunnerOutput:
        """Run one step: the next token of each sequence whose step reaches its end (grammar masks,
        penalties and seeded sampling in kernel/sampler.py), the embeddings of pooling sequences whose
        prompt is done (last token, L2-normalized), and the prompt logprobs the step computed.
        `planned`: `plan(out)`, when the caller made it already (the tensor-parallel executor)."""
        planned = planned or plan(out)
        hidden, logits = self.run(planned.step)
        result = RunnerOutput(prompt_logprobs={s.seq.seq_id: self._score(hidden, s) for s in planned.scoring})
        if planned.pooled:  # rare: embedding requests
            rows = torch.tensor([row for _, row in planned.pooled], device=self.device)
            vectors = torch.nn.functional.normalize(hidden[rows].float(), dim=-1).tolist()
            result.pooled = {seq.seq_id: vector for (seq, _), vector in zip(planned.pooled, vectors)}
        if planned.sampled:
            self._sample(logits, planned, result)
        return result

    def _sample(self, logits: torch.Tensor, planned: Plan, result: RunnerOutput) -> None:
        """One token for each plain sequence; the kept drafts and one token for each that drafted."""
        plain_rows, plain, row = [], [], 0
        for seq, num_drafts in zip(planned.sampled, planned.num_drafts):
            if num_drafts:
                result.verified[seq.seq_id] = verify(
                    logits[row : row + num_drafts + 1], seq.draft_token_ids[:num_drafts], seq
                )
            else:
                plain_rows.append(row)
                plain.append(seq)
            row += num_drafts + 1
        if plain:
            rows = logits if len(plain_rows) == len(logits) else logits[plain_rows]
            result.sampled = {seq.seq_id: token for seq, token in zip(plain, sample(rows, plain))}

    @torch.inference_mode()
    def run(self, step: Step) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The forward pass and the logits of the rows that sample: (all hidden states, logits). Every
        rank of a split model runs it for each step; only rank 0 gets logits."""
        input_ids, positions, md = self.prepare(step)
        hidden = self._forward(input_ids, positions, md)
        if not step.logit_rows:
            return hidden, None
        rows = torch.tensor(step.logit_rows, dtype=torch.long, device=self.device)
        return hidden, self.model.compute_logits(hidden[rows])

    @torch.inference_mode()
    def run_worker(self, step: Step) -> None:
        """A tensor-parallel worker's part of a step: rank 0's collectives, in rank 0's order."""
        hidden, _ = self.run(step)
        for rows in step.scoring:
            for _ in self._scoring_logits(hidden, rows):
                pass

    def _forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata
    ) -> torch.Tensor:
        """The model's forward pass, or for a decode-only step the C++ decode stack (same kernels, same
        numbers, a third less time on a small CPU model)."""
        if self.use_decode_stack and is_decode_only(md):
            if self.decode_stack is None:
                self.decode_stack = build_decode_stack(self.model)
                self.use_decode_stack = self.decode_stack is not None
            if self.decode_stack is not None:
                return self.decode_stack(input_ids, positions, md)
        return self.model(input_ids, positions, md)

    def _scoring_logits(self, hidden: torch.Tensor, rows: range) -> Iterator[tuple[int, torch.Tensor | None]]:
        """The logits of `rows`, a bounded number at a time: (offset into rows, logits)."""
        step = max(_SCORING_FLOATS // self.model.config.vocab_size, 1)
        for at in range(0, len(rows), step):
            part = rows[at : at + step]
            yield at, self.model.compute_logits(hidden[part.start : part.stop])

    def _score(self, hidden: torch.Tensor, scoring: PromptScoring) -> list[dict[int, float]]:
        """Per row: {target token: its logprob, **the k most likely tokens: theirs}, as for sampled tokens."""
        k = scoring.seq.params.prompt_logprobs
        entries = []
        for at, logits in self._scoring_logits(hidden, scoring.rows):
            logprobs = logits.float().log_softmax(-1)
            targets = scoring.targets[at : at + len(logits)]
            chosen = logprobs.gather(1, torch.tensor(targets, device=self.device).unsqueeze(1)).squeeze(1)
            values, indices = logprobs.topk(k)
            for target, lp, top_ids, top_lps in zip(
                targets, chosen.tolist(), indices.tolist(), values.tolist()
            ):
                entries.append({target: lp, **dict(zip(top_ids, top_lps))})
        return entries
