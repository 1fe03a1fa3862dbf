"""The sampler: logits of the sequences that finished their step -> one token each.

Grammar masks (structured output), penalties, temperature, top-k, top-p and min-p are applied
batched; logprobs are those of the raw model distribution. Randomness is per sequence
and per position: the generator for a sampled token is seeded from (sequence seed, position), so
a seeded request gives the same tokens whatever else is in the batch, and a preempted sequence
that is recomputed draws the same tokens again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmasos.kernel.sequence import Sequence
from llmasos.kernel.structured import mask_logits


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None = None  # of the chosen token, under the raw model distribution
    top_logprobs: dict[int, float] | None = None  # the chosen token and the top-k alternatives


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """In place: repetition (prompt + output, HF style), presence and frequency (output, OpenAI style)."""
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            ids = torch.tensor(sorted(set(seq.token_ids)), device=logits.device)
            scores = logits[row, ids]
            logits[row, ids] = torch.where(
                scores > 0, scores / p.repetition_penalty, scores * p.repetition_penalty
            )
        if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
            ids, counts = torch.tensor(seq.output_token_ids, device=logits.device).unique(return_counts=True)
            logits[row, ids] -= p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty


def filter_logits(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p as masks to -inf (rows that don't use one are untouched)."""
    temps = torch.tensor([s.params.temperature for s in seqs], device=logits.device, dtype=logits.dtype)
    logits = logits / temps.unsqueeze(1)
    top_k = [s.params.top_k for s in seqs]
    top_p = [s.params.top_p for s in seqs]
    min_p = [s.params.min_p for s in seqs]
    if any(top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
        remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
        k = torch.tensor([k or logits.shape[1] for k in top_k], device=logits.device)
        remove |= torch.arange(logits.shape[1], device=logits.device) >= k.unsqueeze(1)
        probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(-1)
        cumulative = probs.cumsum(-1) - probs  # mass before each token: the first always stays
        remove |= cumulative >= torch.tensor(top_p, device=logits.device, dtype=probs.dtype).unsqueeze(1)
        logits = logits.scatter(1, sorted_ids, sorted_logits.masked_fill(remove, float("-inf")))
    if any(min_p):
        probs = logits.softmax(-1)
        threshold = torch.tensor(min_p, device=logits.device, dtype=probs.dtype).unsqueeze(1)
        logits = logits.masked_fill(probs < threshold * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[SampledToken]:
    """logits: [len(seqs), vocab] for each sequence's next token."""
    logits = logits.float()
    want_logprobs = any(s.params.logprobs is not None for s in seqs)
    raw_logprobs = logits.log_softmax(-1) if want_logprobs else None
    logits = mask_logits(logits, seqs)  # structured output: what the grammar allows, before anything else
    if any(
        s.params.repetition_penalty != 1 or s.params.presence_penalty or s.params.frequency_penalty
        for s in seqs
    ):
        logits = logits.clone()
        apply_penalties(logits, seqs)
    token_ids = logits.argmax(-1)
    sampled_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if sampled_rows:
        rows = torch.tensor(sampled_rows, device=logits.device)
        probs = filter_logits(logits[rows], [seqs[i] for i in sampled_rows]).softmax(-1)
        for j, i in enumerate(sampled_rows):
            seed = (seqs[i].seed * 1_000_003 + len(seqs[i])) % 2**63  # any integer is a valid user seed
            generator = torch.Generator(device=logits.device).manual_seed(seed)
            token_ids[i] = torch.multinomial(probs[j], 1, generator=generator)
    token_ids = token_ids.tolist()
    out = []
    for i, (seq, token_id) in enumerate(zip(seqs, token_ids)):
        k = seq.params.logprobs
        if k is None:
            out.append(SampledToken(token_id))
            continue
        values, indices = raw_logprobs[i].topk(k)
        chosen = raw_logprobs[i, token_id].item()
        out.append(
            SampledToken(token_id, chosen, {token_id: chosen, **dict(zip(indices.tolist(), values.tolist()))})
        )
    return out
