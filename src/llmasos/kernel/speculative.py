"""Speculative decoding's drafts: prompt lookup (n-gram), no second model.

Input-grounded work (summarizing a text, editing code, answering from a document) repeats runs of
its input. Prompt lookup (llama.cpp's lookup decoding, vLLM's "ngram") takes the last n tokens of a
sequence, finds their latest earlier occurrence in the sequence (prompt and output), and proposes
the tokens that followed it. The runner then computes the sequence's last token and the k drafts in
one forward, as k + 1 decode rows (kernel/runner.py), and kernel/rejection.py keeps the drafts the
model agrees with plus one token of its own: greedy output is unchanged, sampled output follows the
model's distribution. On a GPU a step of k + 1 rows costs little more than a step of one on a small
model, so every accepted draft is a token nearly for free.

A verify step is not free on a CPU, though: k + 1 rows cost about 1 + VERIFY_COST_PER_DRAFT * k
plain decode steps. So each sequence keeps a record of what its drafts were worth lately (DraftRecord:
drafted tokens the model went on to produce, and misses, both decaying), and drafts only as many as
pay for their verification at that acceptance (`worth_drafting`), none while they would not. Every
step's lookup is still compared with the token that came, drafted or not, so a sequence that starts
copying its input again starts drafting again: llama.cpp's and vLLM's adaptive drafting, in a few
lines. Which tokens are verified never changes which are output, only how fast.

Pure Python over token ids; which sequences may draft is decided here too.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmasos.kernel.lookup import NGRAM_MAX, NGRAM_MIN, DraftRecord
from llmasos.kernel.sequence import Sequence

# on a CPU, a verify step of k drafts costs about 1 + this * k plain decode steps (smollm2 on 2 cores,
# the C++ decode stack, whose integer kernel's time grows with the rows: docs/benchmarks.md C5); the
# engine core passes 0 on a GPU, where every draft found is verified
VERIFY_COST_PER_DRAFT = 0.3


def propose_ngram(token_ids: list[int], k: int, max_n: int = NGRAM_MAX, min_n: int = NGRAM_MIN) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the sequence's last n tokens
    (n from max_n down to min_n, the first that matches); [] when none matches."""
    length = len(token_ids)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        tail = token_ids[length - n :]
        first = tail[0]
        # latest start first: the most recent context is the likeliest to continue the same way
        for start in range(length - n - 1, -1, -1):
            if token_ids[start] == first and token_ids[start : start + n] == tail:
                return token_ids[start + n : start + n + k]
    return []


def can_speculate(seq: Sequence) -> bool:
    """Whether seq's next tokens may be drafted: plain sampling only. A grammar's state, penalties and
    logprobs depend on each token before the next one is drawn, so those sequences decode one at a time."""
    p = seq.params
    return not (
        seq.pooling
        or seq.matcher is not None
        or p.num_speculative_tokens == 0
        or p.logprobs is not None
        or p.repetition_penalty != 1.0
        or p.presence_penalty
        or p.frequency_penalty
    )


@dataclass
class SpeculativeStats:
    """Totals since start, as vLLM counts them: drafted and accepted tokens, and verify forwards per
    sequence (each gives its accepted drafts plus one token)."""

    num_drafts: int = 0  # sequence-steps that verified at least one drafted token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Tokens a sequence gained per verify forward (1 + accepted drafts, on average)."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0


def worth_drafting(acceptance: float, k: int, cost_per_draft: float) -> int:
    """How many of k drafts to verify: the number that gives the most tokens per unit of step cost,
    (1 + a + ... + a^n) / (1 + cost_per_draft * n) over n = 0..k (0: a plain decode step)."""
    best, best_rate, expected = 0, 1.0, 1.0
    for n in range(1, k + 1):
        expected += acceptance**n
        rate = expected / (1 + cost_per_draft * n)
        if rate > best_rate:
            best, best_rate = n, rate
    return best


class NgramProposer:
    """Drafts for the decoding sequences of a step, by prompt lookup, as many as pay for themselves."""

    def __init__(
        self, num_speculative_tokens: int, max_model_len: int, cost_per_draft: float = VERIFY_COST_PER_DRAFT
    ):
        self.k, self.max_model_len, self.cost_per_draft = (
            num_speculative_tokens,
            max_model_len,
            cost_per_draft,
        )

    def propose(self, seq: Sequence) -> list[int]:
        """seq's drafts for this step, as many as `num_drafts` allows; fewer, or none, while its recent
        lookups were seldom right (DraftRecord)."""
        k = num_drafts(seq, self.k, self.max_model_len)
        if k <= 0:
            return []
        record = seq.draft_record = seq.draft_record or DraftRecord()
        record.settle(seq.token_ids)
        record.position, record.lookup = len(seq), record.index.propose(seq.token_ids, k)
        return record.lookup[: worth_drafting(record.acceptance, len(record.lookup), self.cost_per_draft)]


def num_drafts(seq: Sequence, k: int, max_model_len: int) -> int:
    """How many tokens seq may draft this step: at most its own num_speculative_tokens (else k), and never
    past its max_tokens or the context (a verify step gives its accepted drafts and one more token)."""
    p = seq.params
    return min(
        k if p.num_speculative_tokens is None else p.num_speculative_tokens,
        p.max_tokens - seq.num_output_tokens - 1,
        max_model_len - len(seq) - 1,
    )
