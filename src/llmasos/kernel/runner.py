"""The model runner: owns the model and the KV cache tensors; turns a scheduled step into one
flat batch, runs the forward pass and samples (kernel/sampler.py), and returns token ids, never
logits: only the sampled tokens, the logprobs asked for and pooled embeddings cross its boundary,
so a runner could live in another process.

Block tables become cache slots here (slot = block_id * block_size + offset), once per step,
in an `AttentionMetadata` that every layer shares.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmasos.config import EngineConfig
from llmasos.errors import LLMasOSError
from llmasos.kernel.memory import SwapCopies
from llmasos.kernel.sampler import SampledToken, sample
from llmasos.kernel.scheduler import SchedulerOutput
from llmasos.kernel.sequence import Sequence
from llmasos.models.loader import load_model
from llmasos.ops.attention import AttentionMetadata, PrefillChunk, TritonBatch
from llmasos.ops.decode_stack import DecodeStep, build_decode_stack, is_decode_only


@dataclass
class RunnerOutput:
    """What one step gives the engine core, by seq_id, in the order the sequences were scheduled."""

    # the next token of each sequence whose step reached its end (with its logprobs if it asked)
    sampled: dict[int, SampledToken] = field(default_factory=dict)
    pooled: dict[int, list[float]] = field(default_factory=dict)  # embeddings of finished pooling prompts
    prompt_logprobs: dict[int, list[dict[int, float]]] = field(default_factory=dict)  # this step's new ones


@dataclass
class PromptScoring:
    """Rows of the flat batch whose logits score the prompt tokens that follow them."""

    seq: Sequence
    rows: range
    targets: list[int]  # the prompt token each row predicts


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
    def __init__(self, model_dir: Path, config: EngineConfig):
        self.config = config
        self.device = torch.device(config.device) if config.device else default_device()
        default_dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.dtype = getattr(torch, config.dtype or default_dtype)
        self._check_attention_backend()
        gguf_blocks = self._can_use_gguf_blocks()
        self.model = load_model(
            model_dir, self.device, self.dtype, gguf_blocks, activation_bits=config.activation_bits
        )
        self.block_size = config.block_size
        self.num_blocks = config.num_kv_blocks or self._blocks_that_fit()
        cfg = self.model.config
        # empty, not zeros: the OS hands out pages as they are first written, so a large cache costs
        # nothing at start-up; attention only ever reads slots that were written (padding is clamped)
        self.kv_cache = torch.empty(
            2, cfg.num_layers, self.num_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim,
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
            2, cfg.num_layers, self.num_swap_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim,
            dtype=self.dtype, pin_memory=self.device.type == "cuda" and self.num_swap_blocks > 0,
        )  # fmt: skip
        for i, layer in enumerate(self.model.attention_layers()):  # the driver contract (models/base.py)
            layer.k_cache, layer.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        # decode-only steps on CPU in float32 go through the C++ decode stack when the model fits it
        self.use_decode_stack = (
            config.decode_stack and self.device.type == "cpu" and self.dtype == torch.float32
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
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def bytes_per_block(self) -> int:
        cfg = self.model.config
        return 2 * cfg.num_layers * self.block_size * cfg.num_kv_heads * cfg.head_dim * self.dtype.itemsize

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

    def _slots(self, block_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return block_table[positions // self.block_size] * self.block_size + positions % self.block_size

    def prepare(
        self, out: SchedulerOutput
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int], list[PromptScoring]]:
        """Flat inputs for the step, the rows whose hidden state gives a next-token distribution, and
        the rows that score prompt tokens (for requests that ask for prompt logprobs)."""
        input_ids, positions, slot_mapping, prefills, sample_rows, scoring = [], [], [], [], [], []
        decode_rows, decode_tables, decode_lens = [], [], []
        row = 0
        for seq, num_new, start in zip(out.seqs, out.num_new_tokens, out.num_computed_tokens):
            end = start + num_new
            table = torch.tensor(seq.block_table)
            pos = torch.arange(start, end)
            input_ids.extend(seq.token_ids[start:end])
            positions.append(pos)
            slot_mapping.append(self._slots(table, pos))
            if num_new == 1 and start > 0:
                decode_rows.append(row)
                decode_tables.append(seq.block_table)
                decode_lens.append(end)
            elif start == 0:
                prefills.append(PrefillChunk(row, row + num_new, None, None))
            else:
                context = torch.arange(end)
                mask = context.unsqueeze(0) <= pos.unsqueeze(1)
                prefills.append(PrefillChunk(row, row + num_new, self._slots(table, context).to(self.device),
                                             mask.to(self.device)))  # fmt: skip
            if seq.params.prompt_logprobs is not None:
                # position p predicts token p + 1; positions already scored (before a preemption) are skipped
                first, last = max(start, len(seq.prompt_logprobs) - 1), min(end, seq.num_prompt_tokens - 1)
                if first < last:
                    rows = range(row + first - start, row + last - start)
                    scoring.append(PromptScoring(seq, rows, seq.token_ids[first + 1 : last + 1]))
            row += num_new
            if end == len(seq):
                sample_rows.append(row - 1)
        md = AttentionMetadata(slot_mapping=torch.cat(slot_mapping).to(self.device), prefills=prefills)
        if self.config.attention_backend == "triton":
            md.triton = self._triton_batch(out)
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
        ids = torch.tensor(input_ids, device=self.device)
        return ids, torch.cat(positions).to(self.device), md, sample_rows, scoring

    def _triton_batch(self, out: SchedulerOutput) -> TritonBatch:
        lens = [start + n for start, n in zip(out.num_computed_tokens, out.num_new_tokens)]
        width = max(len(seq.block_table) for seq in out.seqs)
        tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq in out.seqs]
        starts = [0]
        for n in out.num_new_tokens:
            starts.append(starts[-1] + n)

        def int32(values) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32, device=self.device)

        return TritonBatch(int32(tables), int32(starts), int32(lens), max(out.num_new_tokens))

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Run one step: the next token of each sequence whose step reaches its end (grammar masks,
        penalties and seeded sampling in kernel/sampler.py), the embeddings of pooling sequences whose
        prompt is done (last token, L2-normalized), and the prompt logprobs the step computed."""
        input_ids, positions, md, sample_rows, scoring = self.prepare(out)
        all_hidden = self._forward(input_ids, positions, md)
        result = RunnerOutput(prompt_logprobs={s.seq.seq_id: self._score(all_hidden, s) for s in scoring})
        hidden = all_hidden[torch.tensor(sample_rows, dtype=torch.long, device=self.device)]
        done = [
            seq
            for seq, n, start in zip(out.seqs, out.num_new_tokens, out.num_computed_tokens)
            if start + n == len(seq)
        ]
        if any(seq.pooling for seq in done):  # rare: embedding requests
            rows = [i for i, seq in enumerate(done) if seq.pooling]
            vectors = torch.nn.functional.normalize(hidden[rows].float(), dim=-1).tolist()
            result.pooled = {done[i].seq_id: vector for i, vector in zip(rows, vectors)}
            keep = [i for i, seq in enumerate(done) if not seq.pooling]
            hidden, done = hidden[keep], [done[i] for i in keep]
        if done:
            tokens = sample(self.model.compute_logits(hidden), done)
            result.sampled = {seq.seq_id: token for seq, token in zip(done, tokens)}
        return result

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

    def _score(self, hidden: torch.Tensor, scoring: PromptScoring) -> list[dict[int, float]]:
        """Per row: {target token: its logprob, **the k most likely tokens: theirs}, as for sampled tokens."""
        k = scoring.seq.params.prompt_logprobs
        step = max(_SCORING_FLOATS // self.model.config.vocab_size, 1)
        entries = []
        for at in range(0, len(scoring.rows), step):
            rows = scoring.rows[at : at + step]
            logprobs = self.model.compute_logits(hidden[rows.start : rows.stop]).float().log_softmax(-1)
            targets = scoring.targets[at : at + step]
            chosen = logprobs.gather(1, torch.tensor(targets, device=self.device).unsqueeze(1)).squeeze(1)
            values, indices = logprobs.topk(k)
            for target, lp, top_ids, top_lps in zip(
                targets, chosen.tolist(), indices.tolist(), values.tolist()
            ):
                entries.append({target: lp, **dict(zip(top_ids, top_lps))})
        return entries
