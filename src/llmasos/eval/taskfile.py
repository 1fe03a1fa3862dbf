"""Task files: JSONL with one example per line, checked line by line before any model runs.

Three kinds, told apart by their fields (or named by the caller):
  multiple_choice  {"context": str, "choices": [str, str, ...], "answer": index or choice text}
  generation       {"prompt" (or "input"): str, "reference": str} or "references": [str, ...]
  classification   {"text": str, "label": str}
Every error names the file, the line and the field, and shows a valid line, because a task file
is written by hand and a bad line found after an hour of scoring is an hour lost.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llmasos.errors import LLMasOSError
from llmasos.files import read_jsonl, sha256_file

KINDS = ("multiple_choice", "generation", "classification")

VALID_LINES = {
    "multiple_choice": '{"context": "The sky is", "choices": ["blue", "green"], "answer": 0}',
    "generation": '{"prompt": "Translate to French: cat", "reference": "chat"}',
    "classification": '{"text": "I loved it", "label": "positive"}',
}


@dataclass(frozen=True)
class MultipleChoiceExample:
    context: str
    choices: tuple[str, ...]
    answer: int  # index into choices


@dataclass(frozen=True)
class GenerationExample:
    prompt: str
    references: tuple[str, ...]


@dataclass(frozen=True)
class ClassificationExample:
    text: str
    label: str


Example = MultipleChoiceExample | GenerationExample | ClassificationExample


@dataclass(frozen=True)
class TaskFile:
    """A validated task file; `labels` is the label set of a classification task, else empty."""

    path: Path
    kind: str
    examples: tuple[Example, ...]
    labels: tuple[str, ...]
    digest: str

    def few_shot(self, index: int, shots: int, seed: int = 0) -> list[Example]:
        """`shots` examples to show before example `index`, never that example itself.

        One seeded sample of shots + 1 serves every example (the one being scored is dropped from
        it), so a run is reproducible from its seed and most prompts share one few-shot prefix.
        (lm-evaluation-harness draws a fresh sample per document from one seeded stream instead.)"""
        if not 0 <= shots < len(self.examples):
            raise LLMasOSError(
                f"{self.path} has {len(self.examples)} examples, so shots must be 0 to "
                f"{len(self.examples) - 1} (the scored example is never its own shot); got {shots}"
            )
        if not 0 <= index < len(self.examples):
            raise LLMasOSError(f"example index {index} is out of range for {self.path}")
        pool = random.Random(seed).sample(range(len(self.examples)), shots + 1)
        return [self.examples[i] for i in pool if i != index][:shots]


def file_digest(path: Path | str) -> str:
    """The sha256 of the file's bytes, as "sha256:<hex>" (what `sha256sum` prints)."""
    return sha256_file(path)


def load_task(path: Path | str, kind: str | None = None, labels: Sequence[str] | None = None) -> TaskFile:
    """Read and check a task file; the kind comes from the first line's fields unless given.

    For classification, `labels` fixes the label set and its order; by default it is the sorted
    labels found in the file."""
    path = Path(path)
    if kind is not None and kind not in KINDS:
        raise LLMasOSError(f"unknown task kind {kind!r}; use one of {', '.join(KINDS)}")
    try:
        records = list(read_jsonl(path))
    except LLMasOSError as error:
        shapes = "; ".join(f"{k}: {line}" for k, line in VALID_LINES.items())
        raise LLMasOSError(f"{error}. Valid task lines look like {shapes}") from error
    kind = kind or _infer_kind(path, *records[0])
    if labels is not None and kind != "classification":
        raise LLMasOSError(f"{path}: a label set is for classification tasks, and this is a {kind} task")
    parse = {"multiple_choice": _multiple_choice, "generation": _generation, "classification": _label}[kind]
    lines = [_Line(path, number, kind, record) for number, record in records]
    examples = tuple(parse(line) for line in lines)
    label_set = _label_set(path, lines, examples, labels) if kind == "classification" else ()
    return TaskFile(path=path, kind=kind, examples=examples, labels=label_set, digest=file_digest(path))


def _infer_kind(path: Path, number: int, record: dict) -> str:
    if "choices" in record:
        return "multiple_choice"
    if "label" in record:
        return "classification"
    if "reference" in record or "references" in record:
        return "generation"
    raise LLMasOSError(
        f'{path}, line {number}: cannot tell the task kind; a line needs "choices" (multiple_choice), '
        f'"reference"/"references" (generation) or "label" (classification), e.g. '
        f"{VALID_LINES['multiple_choice']}"
    )


@dataclass(frozen=True)
class _Line:
    """One record with what an error about it must say."""

    path: Path
    number: int
    kind: str
    record: dict

    def error(self, problem: str) -> LLMasOSError:
        return LLMasOSError(
            f"{self.path}, line {self.number}: {problem}; a valid {self.kind} line looks like "
            f"{VALID_LINES[self.kind]}"
        )

    def text(self, field: str) -> str:
        """The field's value, which must be a string with some text."""
        if field not in self.record:
            raise self.error(f'the "{field}" field is missing')
        value = self.record[field]
        if not isinstance(value, str):
            raise self.error(f'"{field}" must be a string, got {type(value).__name__}')
        if not value.strip():
            raise self.error(f'"{field}" is empty')
        return value

    def texts(self, field: str, at_least: int) -> tuple[str, ...]:
        """A list field of at least `at_least` non-empty strings."""
        if field not in self.record:
            raise self.error(f'the "{field}" field is missing')
        values = self.record[field]
        if not isinstance(values, list) or len(values) < at_least:
            raise self.error(f'"{field}" must be a list of at least {at_least} strings')
        for i, value in enumerate(values):
            if not isinstance(value, str) or not value.strip():
                raise self.error(f'"{field}"[{i}] must be a non-empty string, got {json.dumps(value)}')
        return tuple(values)


def _multiple_choice(line: _Line) -> MultipleChoiceExample:
    context = line.text("context")
    choices = line.texts("choices", at_least=2)
    if "answer" not in line.record:
        raise line.error('the "answer" field is missing')
    answer = line.record["answer"]
    if isinstance(answer, str):
        if answer not in choices:
            raise line.error(f'"answer" {json.dumps(answer)} is not one of the choices')
        answer = choices.index(answer)
    elif isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise line.error(
            f'"answer" {json.dumps(answer)} must be a choice index 0 to {len(choices) - 1} or a choice text'
        )
    return MultipleChoiceExample(context=context, choices=choices, answer=answer)


def _generation(line: _Line) -> GenerationExample:
    fields = [f for f in ("prompt", "input") if f in line.record] or ["prompt"]
    refs = [f for f in ("reference", "references") if f in line.record] or ["reference"]
    if len(fields) > 1 or len(refs) > 1:
        raise line.error('give one of "prompt"/"input" and one of "reference"/"references", not both')
    prompt = line.text(fields[0])
    if refs[0] == "references":
        return GenerationExample(prompt=prompt, references=line.texts("references", at_least=1))
    return GenerationExample(prompt=prompt, references=(line.text("reference"),))


def _label(line: _Line) -> ClassificationExample:
    return ClassificationExample(text=line.text("text"), label=line.text("label"))


def _label_set(
    path: Path, lines: list[_Line], examples: tuple[Example, ...], labels: Sequence[str] | None
) -> tuple[str, ...]:
    label_set = tuple(labels) if labels is not None else tuple(sorted({e.label for e in examples}))
    if len(set(label_set)) != len(label_set):
        raise LLMasOSError(f"{path}: the label set {list(label_set)} repeats a label; list each label once")
    if len(label_set) < 2:
        raise LLMasOSError(
            f"{path}: the label set {list(label_set)} has one label, and classification needs at least "
            "two; add examples of the other labels or give the full label set"
        )
    for line, example in zip(lines, examples):
        if example.label not in label_set:
            raise line.error(f'"label" {json.dumps(example.label)} is not in the label set {list(label_set)}')
    return label_set
