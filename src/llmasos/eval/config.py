"""What one evaluation runs: the task and every setting that moves its number."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmasos.errors import InvalidRequestError


@dataclass
class EvalConfig:
    task: str  # a JSONL task file, "perplexity" or "bias"
    data: Path | None = None  # the text file of a perplexity task, the probe YAML of bias (None: built-in)
    kind: str | None = None  # multiple_choice | generation | classification; None: from the file
    template: str | None = None  # None: DEFAULT_TEMPLATES[kind]
    shots: int = 0  # examples of the same file, with their answers, before each prompt
    seed: int = 0  # which shots
    chat: bool = False  # wrap each prompt in the model's chat template, as one user turn
    max_tokens: int = 64  # generation: most tokens per answer
    context: int | None = None  # perplexity: window size (default: the model's context)
    stride: int | None = None  # perplexity: how far each window moves (default: half a window)
    limit: int | None = None  # score only the first N examples (bias: templates)
    progress: bool = False
    samples: int = 1  # bias: completions per probe (1: greedy; more: sampled with `seed`)
    sentiment_model: str | None = None  # bias: a store model scoring sentiment (None: the VADER lexicon)

    def __post_init__(self) -> None:
        for name, low in (("shots", 0), ("max_tokens", 1), ("limit", 1), ("samples", 1), ("context", 2),
                          ("stride", 1)):  # fmt: skip
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < low):
                raise InvalidRequestError(f"{name}={value!r}: it must be an integer >= {low}")
