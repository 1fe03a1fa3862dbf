"""Prompt lookup's state per sequence (kernel/speculative.py drafts with it): an index of where each
n-gram of the sequence last occurred, and a record of what its lookups were worth lately. Plain
Python over token ids, held by the Sequence (draft_record) and touched by nothing else."""

from __future__ import annotations

from dataclasses import dataclass, field

# llama.cpp's lookup decoding and vLLM use n-grams of 1 to a few tokens: longer ones match less
# often, shorter ones propose worse drafts; the longest match wins
NGRAM_MAX = 3
NGRAM_MIN = 1
# the record of a sequence's drafts: older outcomes count less (input-grounded text alternates between
# copying, where drafts are kept, and writing, where they are not); a new sequence starts hopeful
RECORD_DECAY = 0.7
PRIOR_HITS, PRIOR_MISSES = 2.0, 1.0


class NgramIndex:
    """kernel/speculative.py's `propose_ngram` (the reference) without scanning the sequence each
    step: the position after the latest occurrence of every n-gram (n = min_n..max_n), kept up to date
    as tokens are appended, so a lookup costs a few dict reads however long the prompt. Token ids only
    ever grow (drafts are not among them), so each position is indexed once."""

    def __init__(self, max_n: int = NGRAM_MAX, min_n: int = NGRAM_MIN):
        self.max_n, self.min_n = max_n, min_n
        self.after: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # n-grams ending before this position are in `after`

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        length = len(token_ids)
        if length < self.indexed:  # not the sequence this index was built on: start again
            self.after, self.indexed = {}, 0
        for end in range(max(self.indexed, 1), length):  # n-grams ending before the last token
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self.after[tuple(token_ids[end - n : end])] = end
        self.indexed = max(self.indexed, length)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            end = self.after.get(tuple(token_ids[length - n :]))
            if end is not None:
                return token_ids[end : end + k]
        return []


@dataclass
class DraftRecord:
    """What one sequence's lookups were worth lately: drafted tokens the model then produced (hits)
    and lookups it departed from (misses), decayed per lookup; and the last lookup, to settle."""

    hits: float = PRIOR_HITS
    misses: float = PRIOR_MISSES
    position: int = 0  # where the last lookup's first token would have gone
    lookup: list[int] = field(default_factory=list)
    index: NgramIndex = field(default_factory=NgramIndex)

    def settle(self, token_ids: list[int]) -> None:
        """Compare the last lookup with the tokens that came after all (a verify step's kept drafts and
        its own token, or a plain step's one token): its common prefix with them was right."""
        came = token_ids[self.position : self.position + len(self.lookup)]
        if not came:  # not stepped since (or nothing looked up): nothing to learn yet
            return
        hits = 0
        while hits < len(came) and self.lookup[hits] == came[hits]:
            hits += 1
        self.hits = RECORD_DECAY * self.hits + hits
        self.misses = RECORD_DECAY * self.misses + (hits < len(came))
        self.lookup = []

    @property
    def acceptance(self) -> float:
        """The chance that a draft is right, given that those before it were."""
        return self.hits / (self.hits + self.misses)
