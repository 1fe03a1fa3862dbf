"""The task helpers behind `llm.summarize(...)` and `llmasos task NAME`."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from llmasos.errors import InvalidRequestError
from llmasos.sampling_params import SamplingParams, StructuredOutputParams
from llmasos.templates import placeholders, read_yaml

if TYPE_CHECKING:
    from llmasos.runtime import Backend

TEMPLATES_FILE = Path(__file__).with_name("templates.yaml")
TASKS = ("summarize", "translate", "classify", "answer", "extract", "complete_code")
# the placeholders each task fills; a user's template may use any of them, and must use the text's
FIELDS = {
    "summarize": ({"text", "max_words"}, "text"),
    "translate": ({"text", "source", "target"}, "text"),
    "classify": ({"text", "labels"}, "text"),
    "answer": ({"question", "context"}, "question"),
    "extract": ({"text", "schema"}, "text"),
    "complete_code": ({"code", "language"}, "code"),
}


def load_templates(overrides: dict | str | Path | None = None) -> dict[str, dict]:
    """The built-in templates, with a user's YAML file (or dict) of the same shape merged over them."""
    templates = yaml.safe_load(TEMPLATES_FILE.read_text(encoding="utf-8"))
    if overrides is None:
        return templates
    if not isinstance(overrides, dict):
        path = Path(overrides)
        overrides = read_yaml(path, "a YAML file of task templates")
        if not isinstance(overrides, dict):
            raise InvalidRequestError(
                f"{path} must map task names to templates, e.g. summarize: {{prompt: ...}}"
            )
    for task, entry in overrides.items():
        if task not in TASKS:
            raise InvalidRequestError(
                f"unknown task {task!r} in the templates; the tasks are {', '.join(TASKS)}"
            )
        if not isinstance(entry, dict) or not set(entry) <= {"prompt", "seq2seq", "stop"}:
            raise InvalidRequestError(
                f"the {task} template must be a mapping with prompt and/or seq2seq strings "
                "(and, for complete_code, stop: {language: [strings], default: [strings]})"
            )
        if "stop" in entry and not _valid_stops(entry["stop"]):
            raise InvalidRequestError(
                f"the {task} stop entry must map languages to lists of stop strings, with a default list"
            )
        for key in ("prompt", "seq2seq"):
            if key in entry:
                _check_template(task, entry[key])
        templates[task] = {**templates[task], **entry}
    return templates


def _valid_stops(stop: object) -> bool:
    return (
        isinstance(stop, dict)
        and "default" in stop
        and all(isinstance(v, list) and all(isinstance(s, str) and s for s in v) for v in stop.values())
    )


def _check_template(task: str, template: str) -> None:
    allowed, required = FIELDS[task]
    names = placeholders(template, f"the {task} template")
    if required not in names or not names <= allowed:
        raise InvalidRequestError(
            f"the {task} template must use {{{required}}} and only {', '.join(sorted(allowed))}; "
            f"it uses {', '.join(sorted(names)) or 'none'}"
        )


@dataclass
class Classification:
    label: str  # the most likely label
    scores: dict[str, float]  # every label's probability (label log-likelihoods, softmaxed over the labels)


class Tasks:
    """The six tasks over one model (a runtime Backend; `LLM` hands over itself, guards and all); each
    takes one input or a list (answered as one batch)."""

    def __init__(self, model: Backend, templates: dict | str | Path | None = None):
        self.model = model
        self.templates = load_templates(templates)

    # -- the tasks --------------------------------------------------------------------------------
    def summarize(self, text: str | list[str], max_words: int = 60, max_tokens: int | None = None):
        """A summary of at most about `max_words` words (the token budget follows from it)."""
        _positive("max_words", max_words)
        texts = _texts("text", text)
        budget = max_tokens or math.ceil(max_words * 2)  # English runs at ~1.3 tokens a word, with slack
        prompts = [self._prompt("summarize", text=t, max_words=max_words) for t in texts]
        return _shape(text, self._generate(prompts, budget))

    def translate(
        self, text: str | list[str], target: str, source: str = "English", max_tokens: int | None = None
    ):
        """`text` in `target`; the budget is twice the source's tokens, as translations rarely grow more."""
        texts = _texts("text", text)
        budget = max_tokens or max(2 * max(self._num_tokens(t) for t in texts), 16)
        prompts = [self._prompt("translate", text=t, source=source, target=target) for t in texts]
        return _shape(text, self._generate(prompts, budget))

    def classify(self, text: str | list[str], labels: list[str] | None = None):
        """The most likely label and each label's probability, by comparing the labels' log-likelihoods.

        A classifier model (BERT, RoBERTa with a head) uses its own labels; `labels`, if given, must be them.
        """
        texts = _texts("text", text)
        if self.model.kind == "classifier":
            results = [self._from_head(scores, labels) for scores in self.model.classify(texts)]
            return _shape(text, results)
        if not labels or len(set(labels)) < 2 or not all(isinstance(x, str) and x.strip() for x in labels):
            raise InvalidRequestError(
                "classify needs at least two distinct, non-empty labels, e.g. ['yes', 'no']"
            )
        prompts = [self._prompt("classify", text=t, labels=", ".join(labels)) for t in texts]
        pairs = [(p, label) for p in prompts for label in labels]  # the label starts the answer
        logprobs = [lp for lp, _ in self.model.loglikelihood(pairs)]
        results = []
        for i in range(len(texts)):
            row = logprobs[i * len(labels) : (i + 1) * len(labels)]
            top = max(row)
            weights = [math.exp(lp - top) for lp in row]
            scores = {label: w / sum(weights) for label, w in zip(labels, weights)}
            results.append(Classification(max(scores, key=scores.get), scores))
        return _shape(text, results)

    def answer(self, question: str | list[str], context: str | list[str], max_tokens: int = 64):
        """The answer to `question` from `context` alone (one context for all questions, or one each)."""
        questions = _texts("question", question)
        contexts = [context] * len(questions) if isinstance(context, str) else list(context)
        if len(contexts) != len(questions):
            raise InvalidRequestError(
                f"{len(questions)} questions but {len(contexts)} contexts: give one or one each"
            )
        _texts("context", contexts)
        prompts = [self._prompt("answer", question=q, context=c) for q, c in zip(questions, contexts)]
        return _shape(question, self._generate(prompts, max_tokens))

    def extract(self, text: str | list[str], schema: dict, max_tokens: int = 256):
        """The text's information as a dict that follows `schema` (a JSON Schema), enforced while decoding."""
        if not isinstance(schema, dict) or not schema:
            raise InvalidRequestError("extract needs a JSON Schema as a dict, e.g. {'type': 'object', ...}")
        texts = _texts("text", text)
        prompts = [self._prompt("extract", text=t, schema=json.dumps(schema)) for t in texts]
        structured = StructuredOutputParams(json=schema)
        outputs = self._generate(prompts, max_tokens, structured_output=structured)
        results = []
        for out in outputs:
            try:
                results.append(json.loads(out))
            except json.JSONDecodeError as exc:
                raise InvalidRequestError(
                    f"the extraction ran out of tokens before its JSON was complete ({len(out)} characters); "
                    "raise max_tokens"
                ) from exc
        return _shape(text, results)

    def complete_code(self, code: str | list[str], language: str = "python", max_tokens: int = 128):
        """The code that continues `code`, ending where its block ends (the language's stop sequences)."""
        codes = _texts("code", code)
        stops = self.templates["complete_code"]["stop"]
        stop = stops.get(language.lower(), stops["default"])
        prompts = [self._prompt("complete_code", raw=True, code=c, language=language) for c in codes]
        return _shape(code, self._generate(prompts, max_tokens, stop=stop, strip=False))

    # -- how -------------------------------------------------------------------------------------
    def _prompt(self, task: str, raw: bool = False, **fields: object) -> str:
        entry = self.templates[task]
        if self.model.kind == "seq2seq":
            return entry["seq2seq"].format(**fields)
        if self.model.kind != "decoder":
            raise InvalidRequestError(
                f"{task} needs a model that generates text; this one is a {self.model.kind} "
                "(use classify or embed)"
            )
        prompt = entry["prompt"].format(**fields)
        if raw or not self.model.tokenizer.has_chat_template:
            return prompt if raw else prompt + "\n"
        return self.model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])

    def _generate(self, prompts: list[str], max_tokens: int, strip: bool = True, **params) -> list[str]:
        _positive("max_tokens", max_tokens)
        outputs = self.model.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, **params))
        return [out.outputs[0].text.strip() if strip else out.outputs[0].text for out in outputs]

    def _num_tokens(self, text: str) -> int:
        return len(self.model.tokenizer.encode(text))

    def _from_head(self, scores: dict[str, float], labels: list[str] | None) -> Classification:
        if labels is not None and set(labels) != set(scores):
            raise InvalidRequestError(
                f"this classifier's labels are {sorted(scores)}, from its own head; it cannot score "
                f"{sorted(set(labels))}: give exactly its labels, or none"
            )
        return Classification(max(scores, key=scores.get), scores)


def _texts(name: str, value: str | list[str]) -> list[str]:
    texts = [value] if isinstance(value, str) else list(value)
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise InvalidRequestError(f"the {name} is empty: give some text (or a list of non-empty texts)")
    return texts


def _shape(given: str | list, results: list):
    """One result for one input, a list for a list."""
    return results[0] if isinstance(given, str) else results


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise InvalidRequestError(f"{name}={value!r}: it must be an integer >= 1")
