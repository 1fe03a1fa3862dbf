"""Perplexity of a text with a sliding window, through the kernel's prompt logprobs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmasos.runtime.scoring import max_prompt_tokens, sliding_logprob_sums

if TYPE_CHECKING:
    from llmasos.runtime import Backend


@dataclass
class PerplexityResult:
    perplexity: float  # exp(mean negative log-likelihood per token)
    mean_nll: float
    num_tokens: int  # tokens scored: every token of the text, the first given the BOS/EOS token
    context: int  # window size in tokens
    stride: int  # how far each window moves


def perplexity(
    llm: Backend, text: str, context: int | None = None, stride: int | None = None, progress: bool = False
) -> PerplexityResult:
    """Windows of `context` tokens (default: the model's context) every `stride` tokens (default: half
    a window), each token scored once with the context its window gives it."""
    context = context or max_prompt_tokens(llm)
    stride = stride or max(context // 2, 1)
    [(total, count)] = sliding_logprob_sums(llm, [text], context, stride, progress)
    mean_nll = -total / count
    return PerplexityResult(math.exp(mean_nll), mean_nll, count, context, stride)
