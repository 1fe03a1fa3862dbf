"""Evaluation reports: JSON for machines, a Markdown table for people, both with the signature.

A score means nothing without what produced it: the signature records the exact model and task
bytes (digests), the prompt, the shots and every setting that moves the number, so two reports
with equal signatures are comparable and two with different ones say why they differ.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmasos.errors import LLMasOSError

if TYPE_CHECKING:
    from llmasos.store.card import EvalRecord


def llmasos_version() -> str:
    """The installed distribution's version; a source checkout on PYTHONPATH has no metadata."""
    try:
        return version("llmasos")
    except PackageNotFoundError:  # the package itself is imported first, so it is in sys.modules
        return sys.modules["llmasos"].__version__


@dataclass(frozen=True)
class EvalSignature:
    model: str
    model_digest: str
    task: str
    task_digest: str
    prompt_template: str
    shots: int
    dtype: str
    quantization: str | None
    batch_size: int
    seed: int
    llmasos_version: str = field(default_factory=llmasos_version)


@dataclass(frozen=True)
class EvalReport:
    """`extra` holds what is not a single number, e.g. "bleu_signature" or "confusion_matrix"
    ({"labels": [...], "matrix": [[...]]}, rows true, columns predicted), shown in Markdown too."""

    task: str
    kind: str
    metrics: dict[str, float]
    stderr: dict[str, float | None]
    num_examples: int
    signature: EvalSignature
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)

    def to_record(self) -> EvalRecord:
        """The headline figures and the signature, as a model card keeps them (llmasos.store.card)."""
        from llmasos.store.card import EvalRecord

        return EvalRecord(
            task=self.task,
            kind=self.kind,
            metrics=dict(self.metrics),
            num_examples=self.num_examples,
            signature=asdict(self.signature),
            recorded=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )

    @classmethod
    def from_json(cls, text: str) -> EvalReport:
        try:
            data = json.loads(text)
            data["signature"] = EvalSignature(**data["signature"])
            return cls(**data)
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise LLMasOSError(
                f"not an LLMasOS eval report ({error}); write one with EvalReport.save"
            ) from error

    def to_markdown(self) -> str:
        lines = [f"# {self.task} ({self.kind}, {self.num_examples} examples)", ""]
        lines += _table(
            ("metric", "value", "± stderr"),
            [(name, f"{value:.4f}", _stderr(self.stderr.get(name))) for name, value in self.metrics.items()],
        )
        matrix = self.extra.get("confusion_matrix")
        if matrix:
            lines += ["", "Confusion matrix (rows true, columns predicted):", ""]
            lines += _table(
                ("", *matrix["labels"]),
                [(label, *map(str, row)) for label, row in zip(matrix["labels"], matrix["matrix"])],
            )
        others, tables = [], []
        for key, value in self.extra.items():
            if key == "confusion_matrix":
                continue
            if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
                rows = [tuple(map(_cell, r.values())) for r in value]
                tables += ["", f"{key}:", "", *_table(tuple(value[0]), rows)]
            elif isinstance(value, list):  # per-example lists (predictions) stay in the JSON
                others.append((key, f"{len(value)} items (in the JSON report)"))
            else:
                others.append((key, str(value)))
        if others:
            lines += ["", *_table(("detail", "value"), others)]
        lines += tables
        signature = [(f.name, str(getattr(self.signature, f.name))) for f in fields(self.signature)]
        lines += ["", "Signature:", "", *_table(("field", "value"), signature)]
        return "\n".join(lines) + "\n"

    def save(self, directory: Path | str) -> tuple[Path, Path]:
        """Write <model>_<task>-<digest>.json and .md into directory (created if missing).

        The task's name is its file's stem, which two task files share (a/mmlu.jsonl, b/mmlu.jsonl),
        as two perplexity texts share "perplexity"; the first 8 hex digits of the task's content
        digest keep their reports apart. The name depends only on the model and the task's bytes, so
        a rerun replaces its own report, in any order, and a changed task file gets a new one.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        digest = self.signature.task_digest.removeprefix("sha256:")[:8]
        stem = _slug(f"{self.signature.model}_{self.task}-{digest}")
        json_path, md_path = directory / f"{stem}.json", directory / f"{stem}.md"
        json_path.write_text(self.to_json() + "\n", encoding="utf-8")
        md_path.write_text(self.to_markdown(), encoding="utf-8")
        return json_path, md_path


def _cell(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _stderr(value: float | None) -> str:
    """lm_eval prints N/A where a standard error has no meaning (one example, corpus metrics)."""
    return "N/A" if value is None else f"{value:.4f}"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    def row(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return [row(header), "|" + "---|" * len(header), *map(row, rows)]


def _slug(name: str) -> str:
    """A file name from a model name or path ("qwen3:0.6b", "/models/x") and a task name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "eval"
