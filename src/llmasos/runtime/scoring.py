"""Log-likelihoods through the kernel: the one primitive under perplexity, multiple choice,
classification by label likelihood and the lm-evaluation-harness backend.

Every score is a request with `prompt_logprobs`, so scoring runs batched in the same engine as
generation (one generation path) and equals what the model would do when sampling. Only the
scored tokens need their logits, so a context shared by several requests (a question and its
choices, few-shot examples) is computed once and then served from the prefix cache. Texts are
tokenized the way lm-evaluation-harness does for causal models: without special tokens, an empty
context conditioned on the tokenizer's BOS (else EOS) token, and whitespace at the end of a context
moved to the start of its continuation so the pair tokenizes as the joined text would.

This is what a decoder's `Backend.loglikelihood` is made of (`PagedBackend`); the functions take any
backend, so an `LLM` scores through its own `generate` and its guards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmasos.errors import InvalidRequestError
from llmasos.sampling_params import SamplingParams

if TYPE_CHECKING:
    from llmasos.runtime.backend import Backend


def _score_params(start: int) -> SamplingParams:
    """Score the prompt from `start` on (the context before it may come from the prefix cache); one
    token is sampled as well, as every request generates at least one."""
    return SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1, prompt_logprobs_start=start,
                          ignore_eos=True)  # fmt: skip


@dataclass
class Window:
    """A scoring request: `tokens` go in, and the last `num_scored` of them are scored."""

    tokens: list[int]
    num_scored: int


def prefix_token_id(model: Backend) -> int:
    tokenizer = model.tokenizer
    token = (
        tokenizer.bos_token_id
        if tokenizer.bos_token_id is not None
        else next(iter(tokenizer.eos_token_ids), None)
    )
    if token is None:
        raise InvalidRequestError(
            "this model's tokenizer has neither a BOS nor an EOS token to condition an empty context on; "
            "give every request a non-empty context"
        )
    return token


def encode_pair(model: Backend, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, split where the joined text's tokens split."""
    if not continuation:
        raise InvalidRequestError(
            f"empty continuation for context {context[:40]!r}: there is nothing to score"
        )
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    encode = model.tokenizer.encode
    if not stripped:
        return [prefix_token_id(model)], encode(continuation, add_special_tokens=False)
    whole = encode(stripped + continuation, add_special_tokens=False)
    context_ids = encode(stripped, add_special_tokens=False)
    return whole[: len(context_ids)], whole[len(context_ids) :]


def max_prompt_tokens(model: Backend) -> int:
    if model.kind != "decoder":
        raise InvalidRequestError(
            f"rolling log-likelihood and perplexity need a decoder model; this one is a {model.kind}"
        )
    return model.max_model_len - 1  # room for the one sampled token


def score_windows(
    model: Backend, windows: list[Window], progress: bool = False
) -> list[list[tuple[float, bool]]]:
    """Per window, per scored token: its log-probability and whether it is the most likely token."""
    params = [_score_params(len(w.tokens) - w.num_scored) for w in windows]
    outputs = model.generate([w.tokens for w in windows], params, progress=progress)
    scores = []
    for window, out in zip(windows, outputs):
        entries = out.prompt_logprobs[len(window.tokens) - window.num_scored :]
        targets = window.tokens[len(window.tokens) - window.num_scored :]
        scores.append([(entry[t], entry[t] >= max(entry.values())) for entry, t in zip(entries, targets)])
    return scores


def loglikelihood(
    model: Backend, requests: list[tuple[str, str]], *, progress: bool = False
) -> list[tuple[float, bool]]:
    """Per (context, continuation): log p(continuation | context), and whether greedy decoding from the
    context produces exactly the continuation. Contexts too long for the model lose their start."""
    if model.kind != "decoder":  # an encoder-decoder: the target's log-likelihood given the source
        return model.loglikelihood(requests, progress=progress)
    limit = max_prompt_tokens(model)
    windows = []
    for context, continuation in requests:
        context_ids, continuation_ids = encode_pair(model, context, continuation)
        if len(continuation_ids) >= limit:
            raise InvalidRequestError(
                f"a continuation of {len(continuation_ids)} tokens does not fit the model's context of "
                f"{model.max_model_len}; shorten it or score it with loglikelihood_rolling"
            )
        windows.append(Window((context_ids + continuation_ids)[-limit:], len(continuation_ids)))
    return [
        (sum(lp for lp, _ in scored), all(greedy for _, greedy in scored))
        for scored in score_windows(model, windows, progress)
    ]


def sliding_windows(tokens: list[int], context: int, stride: int, full_last: bool = False) -> list[Window]:
    """Score every token after the first once, each with as much context as its window gives.

    Windows of up to `context` tokens start every `stride` tokens (stride < context); a window scores
    only the tokens no earlier window scored (Hugging Face's perplexity recipe; a smaller stride gives
    each token more context at more compute). With stride == context - 1 and `full_last`, the last
    window is moved back to end at the text's end with a full context: lm-evaluation-harness's
    rolling scheme."""
    if not 1 <= stride <= context - 1:
        raise InvalidRequestError(
            f"stride {stride} must be between 1 and the window size minus one ({context - 1}): "
            "each window needs at least one token of context before the ones it scores"
        )
    windows, scored_until = [], 1  # the first token has nothing before it to be predicted from
    begin = 0
    while scored_until < len(tokens):
        end = min(begin + context, len(tokens))
        if full_last and end == len(tokens):
            begin = max(0, end - context)
        windows.append(Window(tokens[begin:end], end - scored_until))
        scored_until = end
        begin += stride
    return windows


def loglikelihood_rolling(model: Backend, texts: list[str], *, progress: bool = False) -> list[float]:
    """Total log-likelihood of each whole text (every token, the first given the BOS/EOS token), with
    disjoint windows of the model's context."""
    context = max_prompt_tokens(model)
    return [total for total, _ in sliding_logprob_sums(model, texts, context, context - 1, progress, True)]


def sliding_logprob_sums(
    model: Backend,
    texts: list[str],
    context: int,
    stride: int,
    progress: bool = False,
    full_last: bool = False,
) -> list[tuple[float, int]]:
    """Per text: the sum of its tokens' log-probabilities under sliding windows, and the token count."""
    if context > max_prompt_tokens(model):
        raise InvalidRequestError(
            f"a window of {context} tokens does not fit the model's context of {model.max_model_len}; "
            f"use at most {max_prompt_tokens(model)}"
        )
    prefix = prefix_token_id(model)
    per_text = []
    for text in texts:
        tokens = model.tokenizer.encode(text, add_special_tokens=False)
        if not tokens:
            raise InvalidRequestError("an empty text has no tokens to score; remove it or give it some text")
        per_text.append(sliding_windows([prefix, *tokens], context, stride, full_last))
    flat = score_windows(model, [w for windows in per_text for w in windows], progress)
    sums, at = [], 0
    for windows in per_text:
        scored = [lp for window_scores in flat[at : at + len(windows)] for lp, _ in window_scores]
        sums.append((sum(scored), len(scored)))
        at += len(windows)
    return sums
