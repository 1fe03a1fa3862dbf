"""What a caller gets back: vLLM-shaped `RequestOutput` / `CompletionOutput`.

A request's `SamplingParams.output_kind` says what each output carries (vLLM's `RequestOutputKind`):
the whole output so far (CUMULATIVE, the default), only what is new since the request's previous
output (DELTA: a stream then costs O(its length), not O(length^2)), or one output when the request
finishes (FINAL_ONLY). `accumulate` adds a request's delta outputs up to the cumulative one.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field, replace


class RequestOutputKind(enum.IntEnum):
    CUMULATIVE = 0  # every output holds all the text, token ids and logprobs so far
    DELTA = 1  # every output holds only the text, token ids and logprobs new since the previous one
    FINAL_ONLY = 2  # one output, when the request finishes, holding everything


@dataclass
class ToolCall:
    """A function call the model made: OpenAI's `tool_calls[]` entry (`arguments` is JSON text)."""

    id: str
    name: str
    arguments: str


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort" or "tool_calls"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[dict[int, float]] | None = None  # per token: chosen token and top alternatives
    cumulative_logprob: float | None = None
    # the calls parsed from `text` when the request offered tools (then `text` is what is left: the
    # content), else None; `finish_reason` is then "tool_calls"
    tool_calls: list[ToolCall] | None = None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finished_time: float | None
    num_preemptions: int
    last_token_time: float | None = None  # when the newest token was sampled (inter-token latency)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    usage: dict[str, int] = field(default_factory=dict)
    embedding: list[float] | None = None  # of a pooling request, once finished
    prompt_logprobs: list[dict[int, float] | None] | None = None  # when asked for: None for the first token


def accumulate(deltas: Sequence[RequestOutput]) -> RequestOutput:
    """The cumulative output that one request's DELTA outputs add up to: each completion's text,
    token ids and logprobs joined, everything else (finish reasons, usage, metrics) from the last."""
    last = deltas[-1]
    texts: dict[int, list[str]] = {}
    token_ids: dict[int, list[int]] = {}
    logprobs: dict[int, list[dict[int, float]]] = {}
    for delta in deltas:
        for completion in delta.outputs:
            texts.setdefault(completion.index, []).append(completion.text)
            token_ids.setdefault(completion.index, []).extend(completion.token_ids)
            if completion.logprobs is not None:
                logprobs.setdefault(completion.index, []).extend(completion.logprobs)
    outputs = [
        replace(
            completion,
            text="".join(texts[completion.index]),
            token_ids=token_ids[completion.index],
            logprobs=logprobs.get(completion.index, []) if completion.logprobs is not None else None,
        )
        for completion in last.outputs
    ]
    return replace(last, outputs=outputs)
