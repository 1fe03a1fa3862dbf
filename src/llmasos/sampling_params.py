"""SamplingParams: how one request turns logits into tokens, validated up front.

Field names and meanings follow vLLM's `SamplingParams` (and so the OpenAI API), because that is
what users of the field already know. Validation errors name the field and the allowed range.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from llmasos.errors import InvalidRequestError
from llmasos.outputs import RequestOutputKind


@dataclass
class StructuredOutputParams:
    """What the output must be, enforced token by token in the sampler (names as in vLLM).

    Exactly one field is set. The OpenAI `response_format` maps onto `json` (json_schema) and
    `json_object`; `regex`, `choice` and `grammar` are vLLM's extra forms.
    """

    json: dict | str | None = None  # a JSON Schema, as a dict or its JSON text
    json_object: bool = False  # any JSON object
    regex: str | None = None  # the whole output matches it
    choice: list[str] | None = None  # the output is one of these strings
    grammar: str | None = None  # Lark syntax as llguidance takes it (llama.cpp GBNF is converted)

    def __post_init__(self) -> None:
        given = self._given()
        if len(given) != 1:
            raise InvalidRequestError(
                "structured output needs exactly one of json, json_object, regex, choice or grammar; "
                + (f"got {', '.join(given)}: set only one" if given else "got none: set one")
            )
        value = getattr(self, self.kind)
        ok, allowed = {
            "json": (isinstance(value, (dict, str)), "a JSON Schema (a dict or its JSON text)"),
            "regex": (isinstance(value, str), "a string"),
            "choice": (
                isinstance(value, list) and bool(value) and all(isinstance(c, str) for c in value),
                "a non-empty list of strings",
            ),
            "grammar": (isinstance(value, str) and bool(value.strip()), "a non-empty string in Lark syntax"),
        }.get(self.kind, (True, ""))
        if not ok:
            raise InvalidRequestError(
                f"invalid structured output {self.kind}={value!r}: it must be {allowed}"
            )

    def _given(self) -> list[str]:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        return given + ["json_object"] * bool(self.json_object)

    @property
    def kind(self) -> str:
        """The one field that is set: "json", "json_object", "regex", "choice" or "grammar"."""
        return self._given()[0]


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF/CTRL style, over prompt and output tokens
    presence_penalty: float = 0.0  # OpenAI style, over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None  # same seed, same output, whatever else is in the batch
    max_tokens: int = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # how many top alternatives to return per token (0: only the chosen one)
    # the same for each prompt token given the ones before it (scoring, perplexity); such a request computes
    # its prompt from `prompt_logprobs_start` on, so only the prefix cache's blocks before that serve it
    prompt_logprobs: int | None = None
    # (LLMasOS) the first prompt position to score: a shared context before it (the question of several
    # choices, few-shot examples) comes from the prefix cache; entries before it are None
    prompt_logprobs_start: int = 1
    truncate_prompt_tokens: int | None = None  # keep only the last N prompt tokens (with a warning)
    skip_special_tokens: bool = True
    structured_output: StructuredOutputParams | None = None  # constrain the output (JSON, regex, ...)
    # (LLMasOS) the LoRA adapter of the store to run the request through (the engine needs enable_lora)
    lora: str | None = None
    # (LLMasOS) most drafted tokens per step when the engine decodes speculatively (None: the engine's
    # num_speculative_tokens; 0: this request decodes one token a step)
    num_speculative_tokens: int | None = None
    # what each RequestOutput of the request holds: everything so far, what is new, or only the final one
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self._check(self.n >= 1, "n", "an integer >= 1", self.n)
        self._check(self.temperature >= 0, "temperature", "a number >= 0 (0 means greedy)", self.temperature)
        self._check(self.top_k >= 0, "top_k", "an integer >= 0 (0 disables it)", self.top_k)
        self._check(0 < self.top_p <= 1, "top_p", "a number in (0, 1]", self.top_p)
        self._check(0 <= self.min_p <= 1, "min_p", "a number in [0, 1]", self.min_p)
        self._check(
            self.repetition_penalty > 0, "repetition_penalty", "a number > 0", self.repetition_penalty
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            self._check(-2 <= value <= 2, name, "a number in [-2, 2]", value)
        self._check(self.max_tokens >= 1, "max_tokens", "an integer >= 1", self.max_tokens)
        self._check(all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings", self.stop)
        self._check(
            self.logprobs is None or 0 <= self.logprobs <= 20,
            "logprobs",
            "an integer in [0, 20]",
            self.logprobs,
        )
        self._check(
            self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
            "prompt_logprobs",
            "an integer in [0, 20]",
            self.prompt_logprobs,
        )
        start = self.prompt_logprobs_start
        self._check(start >= 1, "prompt_logprobs_start", "an integer >= 1", start)
        self._check(
            self.truncate_prompt_tokens is None or self.truncate_prompt_tokens >= 1,
            "truncate_prompt_tokens",
            "an integer >= 1",
            self.truncate_prompt_tokens,
        )
        k = self.num_speculative_tokens
        self._check(k is None or k >= 0, "num_speculative_tokens", "an integer >= 0 (0: no drafts)", k)
        kinds = {kind.name.lower(): kind for kind in RequestOutputKind}
        if isinstance(self.output_kind, str) and self.output_kind.lower() in kinds:
            self.output_kind = kinds[self.output_kind.lower()]
        self._check(
            isinstance(self.output_kind, RequestOutputKind),
            "output_kind",
            "a RequestOutputKind (or its name: " + ", ".join(kinds) + ")",
            self.output_kind,
        )

    @staticmethod
    def _check(ok: bool, name: str, allowed: str, value: object) -> None:
        if not ok:
            raise InvalidRequestError(f"invalid sampling parameter {name}={value!r}: it must be {allowed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def with_output_kind(params: SamplingParams | None, kind: RequestOutputKind) -> SamplingParams:
    """The caller's params (or the defaults) with outputs of this kind; the caller's object is left alone."""
    return dataclasses.replace(params or SamplingParams(), output_kind=kind)
