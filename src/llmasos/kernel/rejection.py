"""Verifying drafted tokens: which drafts the model keeps, and the token it adds (rejection sampling).

A sequence's verify step gives k + 1 rows of logits: row i is the model's distribution p_i for the
token after draft i - 1 (row 0: after the last verified token). Greedy: keep drafts while each equals
its row's argmax, then add the argmax of the first row that disagreed (or of the last row): exactly
the tokens greedy decoding gives one at a time. Sampled (Leviathan et al. 2023, Chen et al. 2023):
keep draft d_i with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection draw from the
residual max(p_i - q_i, 0), normalized; if all are kept, draw from p_k. The tokens then follow p
exactly, whatever proposed them. Prompt lookup proposes deterministically (q_i is one-hot on d_i),
so it keeps d_i with probability p_i(d_i) and otherwise draws from p_i with d_i taken out.

p is the distribution the sampler would draw from: temperature, top-k, top-p and min-p applied
(kernel/sampler.py filter_logits). Draws are seeded per (sequence seed, position), as the sampler's.
"""

from __future__ import annotations

import torch

from llmasos.kernel.sampler import filter_logits
from llmasos.kernel.sequence import Sequence


def _generator(seq: Sequence, position: int, device: torch.device) -> torch.Generator:
    seed = (seq.seed * 1_000_003 + position) % 2**63
    return torch.Generator(device=device).manual_seed(seed)


def verify(
    logits: torch.Tensor, drafts: list[int], seq: Sequence, draft_probs: torch.Tensor | None = None
) -> list[int]:
    """logits: [len(drafts) + 1, vocab], the rows of seq's verify step. Returns the drafts kept and the
    model's next token after them (1 to len(drafts) + 1 tokens). draft_probs: [len(drafts), vocab], the
    proposer's distributions q_i (None: deterministic drafts, q_i one-hot)."""
    if seq.params.greedy:
        targets = logits.argmax(-1).tolist()
        kept = 0
        while kept < len(drafts) and drafts[kept] == targets[kept]:
            kept += 1
        return drafts[:kept] + [targets[kept]]
    probs = filter_logits(logits.float(), [seq] * len(logits)).softmax(-1)
    position = len(seq)  # the position of the first token this step adds
    out = []
    for i, draft in enumerate(drafts):
        generator = _generator(seq, position + i, logits.device)
        p = probs[i]
        q = draft_probs[i] if draft_probs is not None else None
        accept = p[draft] if q is None else torch.clamp(p[draft] / q[draft], max=1.0)
        if torch.rand((), generator=generator, device=logits.device) < accept:
            out.append(draft)
            continue
        if q is None:
            residual = p.clone()
            residual[draft] = 0.0
        else:
            residual = torch.clamp(p - q, min=0.0)
        if residual.sum() <= 0:  # p equals q (up to rounding): any draw from p is right
            residual = p
        out.append(int(torch.multinomial(residual / residual.sum(), 1, generator=generator)))
        return out
    generator = _generator(seq, position + len(drafts), logits.device)
    out.append(int(torch.multinomial(probs[len(drafts)], 1, generator=generator)))
    return out
