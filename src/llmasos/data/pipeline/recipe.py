"""Recipes: the YAML that says which steps `data prepare` runs, checked whole before any work.

    column: text                  # the text column the steps read (default: text)
    steps:
      - fineweb_quality: {}       # datatrove's filters take their own options
      - gopher_quality: {min_doc_words: 20}
      - exact_dedup: {}
      - near_dedup: {threshold: 0.8, num_perm: 128, ngram: 5}
      - scrub: {action: redact, style: placeholder}     # or action: block (drop the row)
      - decontaminate: {against: [evals/task.jsonl, "dataset:mmlu-test"], ngram: 13, column: "*"}
      - chat_format: {column: messages, action: drop}  # or fail
      - language_id: {languages: [en, fr], min_score: 0.65}   # adds columns language, language_score

An error names the step (its number and name) and the field. The recipe's digest is that of its
parsed content (comments and layout aside), recorded in the lineage of what it produces.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from llmasos.data.pipeline import guards, language, steps
from llmasos.data.store import DatasetStore, readers
from llmasos.errors import LLMasOSError

# Each of LLMasOS's steps: field -> the type it takes, or the tuple of values allowed.
_FIELDS: dict[str, dict[str, object]] = {
    "exact_dedup": {"column": str},
    "near_dedup": {"column": str, "threshold": float, "num_perm": int, "ngram": int},
    "scrub": {"column": str, "action": ("redact", "block"), "style": ("placeholder", "mask", "hash")},
    "decontaminate": {"column": str, "against": list, "ngram": int},
    "chat_format": {"column": str, "action": ("drop", "fail")},
    "language_id": {"column": str, "languages": list, "min_score": float},
}
STEP_NAMES = (*steps.QUALITY_FILTERS, *_FIELDS)


@dataclass
class Recipe:
    path: str
    column: str
    steps: list[tuple[str, dict]]  # (step name, options) in order

    @property
    def digest(self) -> str:
        canonical = json.dumps({"column": self.column, "steps": self.steps}, sort_keys=True)
        return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()

    def lineage(self) -> dict:
        return {"path": self.path, "digest": self.digest, "steps": [_describe(n, o) for n, o in self.steps]}


def load_recipe(path: Path | str, store: DatasetStore) -> Recipe:
    """Read and check a recipe: step names, fields, their types, the files and datasets named."""
    path = Path(path).expanduser()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise LLMasOSError(f"cannot read recipe {path} ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise LLMasOSError(f"recipe {path} is not valid YAML ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("steps"), list) or not data["steps"]:
        raise LLMasOSError(f"recipe {path}: expected a mapping with a non-empty list `steps:`")
    unknown = set(data) - {"column", "steps"}
    if unknown:
        raise LLMasOSError(
            f"recipe {path}: unknown field(s) {', '.join(sorted(unknown))} (fields: column, steps)"
        )
    column = data.get("column", "text")
    if not isinstance(column, str):
        raise LLMasOSError(f"recipe {path}: `column` must be a column name")
    parsed = []
    for number, entry in enumerate(data["steps"], start=1):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise LLMasOSError(f"recipe {path}, step {number}: write each step as `- name: {{options}}`")
        ((name, options),) = entry.items()
        where = f"recipe {path}, step {number} ({name})"
        if name not in STEP_NAMES:
            raise LLMasOSError(f"{where}: unknown step; steps are {', '.join(STEP_NAMES)}")
        options = options or {}
        if not isinstance(options, dict):
            raise LLMasOSError(f"{where}: options must be a mapping of field: value")
        if name in _FIELDS:
            _check_fields(where, options, _FIELDS[name])
        if name == "decontaminate":
            _check_against(where, options.get("against"), store)
        if name == "language_id":
            _check_languages(where, options.get("languages", []))
        parsed.append((name, options))
    recipe = Recipe(str(path.resolve()), column, parsed)
    for number, (name, options) in enumerate(recipe.steps, start=1):
        if name in steps.QUALITY_FILTERS:  # datatrove checks its own options when the filter is made
            try:
                build_step(name, options, column, store, index=False)
            except LLMasOSError as e:
                raise LLMasOSError(f"recipe {path}, step {number}: {e}") from e
    return recipe


def build_step(name: str, options: dict, column: str, store: DatasetStore, index: bool = True) -> steps.Step:
    """The step object for one checked recipe entry (`index`: read the decontamination sources)."""
    options = dict(options)
    column = options.pop("column", column)
    if name in steps.QUALITY_FILTERS:
        return steps.quality_filter(name, column, options)
    if name == "exact_dedup":
        return steps.ExactDedup(name, column)
    if name == "near_dedup":
        return steps.NearDedup(name, column, **options)
    if name == "scrub":
        return guards.scrub(column, options.get("action", "redact"), options.get("style", "placeholder"))
    if name == "chat_format":
        return guards.ChatFormat(name, column, **options)
    if name == "language_id":
        return language.LanguageId(name, column, **options)
    step = guards.Decontaminate(name, column, ngram=options.get("ngram", 13))
    for source in options["against"] if index else []:
        step.add_source(source, _texts(source, store))
    return step


def _texts(source: str, store: DatasetStore):
    if source.startswith("dataset:"):
        yield from (guards.all_text(row) for row in store.rows(source.removeprefix("dataset:")))
        return
    path = Path(source).expanduser()
    for file in readers.input_files(path):
        for batch in readers.read_batches(file):
            yield from (guards.all_text(row) for row in batch.table.to_pylist())


def _check_fields(where: str, options: dict, fields: dict[str, object]) -> None:
    for key, value in options.items():
        if key not in fields:
            raise LLMasOSError(f"{where}: unknown field '{key}'; fields are {', '.join(fields)}")
        kind, number = fields[key], isinstance(value, int | float) and not isinstance(value, bool)
        if isinstance(kind, tuple):
            ok, expected = value in kind, f"one of {', '.join(kind)}"
        elif kind is float:
            ok, expected = number and 0 < value <= 1, "a number above 0 and at most 1"
        elif kind is int:
            ok, expected = number and isinstance(value, int) and value >= 1, "a whole number, at least 1"
        else:
            ok, expected = isinstance(value, kind), f"a {kind.__name__}"
        if not ok:
            raise LLMasOSError(f"{where}: field '{key}' must be {expected}, got {value!r}")


def _check_against(where: str, against: object, store: DatasetStore) -> None:
    if not isinstance(against, list) or not against or not all(isinstance(a, str) for a in against):
        raise LLMasOSError(
            f"{where}: field 'against' must list evaluation files or store datasets (dataset:NAME)"
        )
    for source in against:
        if source.startswith("dataset:"):
            store.get(source.removeprefix("dataset:"))
        elif not Path(source).expanduser().exists():
            raise LLMasOSError(f"{where}: field 'against': {source} does not exist")


def _check_languages(where: str, languages: object) -> None:
    if not isinstance(languages, list) or not all(isinstance(code, str) for code in languages):
        raise LLMasOSError(f"{where}: field 'languages' must list language codes, e.g. [en, fr]")
    try:
        language.check_languages(languages)
    except LLMasOSError as e:
        raise LLMasOSError(f"{where}: {e}") from e


def _describe(name: str, options: dict) -> str:
    return name + (" " + json.dumps(options, sort_keys=True) if options else "")
