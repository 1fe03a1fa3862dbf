"""Speculative decoding's drafts from a second, smaller model (vLLM's draft-model method).

A draft model that shares the target's tokenizer proposes up to k tokens per step for each speculating
sequence, greedily, in one batched draft forward per draft position over all of them; the target then
verifies them in its one forward, as prompt lookup's (kernel/runner.py, kernel/rejection.py). Greedy
drafts are deterministic proposals, so rejection sampling keeps the output the target's own: the same
tokens under greedy decoding, the target's distribution when sampling.

The draft runs through the same kernel code (a ModelRunner of its own, loaded by the same loader) with
its own paged KV cache of as many blocks as the target's, addressed through the TARGET's block tables
(same block size, same positions): allocation, preemption and the truncation of rejected drafts cover
both caches at once. What the draft's cache holds for a sequence is one number,
`seq.num_draft_computed_tokens`: its first that many positions, as far as they are still the
sequence's (clamped to the target's `num_computed_tokens`, which a verify step rolls back past rejected
drafts), zeroed when its blocks are freed (kernel/memory.py). Each step's first draft forward follows
the target's: the prompt chunks the target computes (so the draft's prefill is chunked under the same
token budget) and, for a drafting sequence, what its draft KV lacks up to its last token (that token,
and the last kept draft when all were kept).

A block whose target KV came from elsewhere (a prefix-cache hit, a swap-in, the disk cache) may hold
draft KV of another sequence's, or none: so a sequence's draft KV always starts from position 0 (its
first chunk takes in its cached prefix too) and never reads KV it did not write; the price is a draft
prefill of cached prefixes, on the small model.

The scheduler grants drafts before any draft forward can run (their KV slots do not exist until it
allocates them): `propose` gives placeholders, the scheduler keeps as many as fit, and `draft` computes
that many real tokens in their place before the target's forward.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from llmasos.config import EngineConfig
from llmasos.errors import LLMasOSError, ModelNotFoundError
from llmasos.kernel.runner import ModelRunner, Step, StepSeq
from llmasos.kernel.scheduler import SchedulerOutput
from llmasos.kernel.sequence import Sequence
from llmasos.kernel.speculative import can_speculate, num_drafts
from llmasos.models.loader import read_hf_config

PLACEHOLDER = 0  # a granted draft's token until `DraftProposer.draft` computes it


def _vocab(model_dir: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise LLMasOSError(f"{model_dir} has no tokenizer.json, so its vocabulary cannot be checked")
    return Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)


def context_length(model_dir: Path) -> int:
    config = read_hf_config(model_dir)
    return config.get("max_position_embeddings") or config.get("n_positions") or 2048


def check_draft_model(target_dir: Path, draft_dir: Path, name: str, max_model_len: int) -> None:
    """Refuse a draft model the target cannot verify: another vocabulary (its token ids would mean other
    text), another number of logits, or a context shorter than the target's."""
    target_size = read_hf_config(target_dir).get("vocab_size")
    draft_size = read_hf_config(draft_dir).get("vocab_size")
    if _vocab(target_dir) != _vocab(draft_dir) or target_size != draft_size:
        raise LLMasOSError(
            f"the draft model {name!r} has another tokenizer or vocabulary than the target model "
            f"(vocab_size {draft_size} against {target_size}); a draft model must share the target's "
            "tokenizer: choose a smaller model of the same family"
        )
    if context_length(draft_dir) < max_model_len:
        raise LLMasOSError(
            f"the draft model {name!r} reads {context_length(draft_dir)} positions, fewer than the target's "
            f"max_model_len {max_model_len}; set max_model_len to at most {context_length(draft_dir)}"
        )


def resolve_draft_model(name: str) -> Path:
    """The draft model's folder, as the engine resolves its model (a store name or a model folder)."""
    from llmasos.store import ModelStore

    try:
        return ModelStore().resolve(name)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(f"the draft model (speculative_model) is not available: {exc}") from exc


class DraftProposer:
    """Drafts for the decoding sequences of a step, by a draft model's greedy tokens."""

    def __init__(self, target_dir: Path, config: EngineConfig, target: ModelRunner, max_model_len: int):
        draft_dir = resolve_draft_model(config.speculative_model)
        check_draft_model(target_dir, draft_dir, config.speculative_model, max_model_len)
        # the target's block tables index this cache too: as many blocks, nothing of the target's own
        # (no swap space, disk cache or adapters: those concern the target's KV and weights)
        draft_config = replace(
            config,
            device=str(target.device),
            num_kv_blocks=target.num_blocks,
            context_policy="none",
            kv_disk_cache_gb=None,
            enable_lora=False,
            speculative=None,
            speculative_model=None,
        )
        try:
            self.runner = ModelRunner(draft_dir, draft_config)
        except torch.OutOfMemoryError as exc:  # the target sized its cache from free memory first
            raise LLMasOSError(
                f"the draft model {config.speculative_model!r} and its KV cache ({target.num_blocks} blocks, "
                "as the target's) do not fit beside the target: set kv_cache_gib (or num_kv_blocks) lower"
            ) from exc
        self.k, self.max_model_len = config.num_speculative_tokens, max_model_len

    def propose(self, seq: Sequence) -> list[int]:
        """Placeholders for seq's drafts this step (as many as `num_drafts` allows), for the scheduler."""
        return [PLACEHOLDER] * num_drafts(seq, self.k, self.max_model_len)

    def draft(self, out: SchedulerOutput) -> None:
        """Compute the drafts the scheduler granted (before `Scheduler.update`: each sequence's
        num_computed_tokens is where its step starts). The first draft forward also follows the target's
        prefill chunks, so a prompt's draft KV is computed chunk by chunk under the same token budget,
        not all at once at its first draft; draft forward j gives every sequence with more than j
        drafts its draft j."""
        feeds, drafting = [], []
        for seq, num_new, start in zip(out.seqs, out.num_new_tokens, out.num_computed_tokens):
            if not can_speculate(seq):  # it never drafts: its tokens need no draft KV
                continue
            begin, end = min(seq.num_draft_computed_tokens, start), min(start + num_new, len(seq))
            lacking = seq.token_ids[begin:end]
            # a few tokens after the first (the last kept draft and the next token) go as decode rows,
            # which keeps the step decode-only (the fast path, kernel/runner.py); a prompt as a prefill
            as_rows = len(lacking) - 1 if begin > 0 and len(lacking) <= self.k + 1 else 0
            feeds.append(StepSeq(lacking, begin, seq.block_table, num_draft=as_rows))
            seq.num_draft_computed_tokens = end
            if seq.draft_token_ids:
                drafting.append((seq, len(feeds) - 1))
        if not feeds:
            return
        rows, row = [], 0
        for feed in feeds:
            row += len(feed.token_ids)
            rows.append(row - 1)
        seqs = [seq for seq, _ in drafting]
        logit_rows = [rows[i] for _, i in drafting]
        if not seqs:  # prompt chunks only
            self.runner.run(Step(feeds, [], []))
            return
        for j in range(max(len(seq.draft_token_ids) for seq in seqs)):
            _, logits = self.runner.run(Step(feeds, logit_rows, []))
            for seq, token in zip(seqs, logits.argmax(-1).tolist()):
                seq.draft_token_ids[j] = token
            seqs = [seq for seq in seqs if len(seq.draft_token_ids) > j + 1]
            feeds = [StepSeq([seq.draft_token_ids[j]], len(seq) + j, seq.block_table) for seq in seqs]
            logit_rows = list(range(len(seqs)))
        for seq, _ in drafting:  # positions up to its next-to-last draft's have draft KV now
            seq.num_draft_computed_tokens = len(seq) + len(seq.draft_token_ids) - 1
