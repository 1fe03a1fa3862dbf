"""`llmasos eval --task data:NAME[:COLUMN]`: a dataset of the store as an evaluation task.

A dataset whose columns are a task file's (`choices`, `label` or `reference(s)`; see taskfile.py)
is that task, read from its JSONL export (whose sha256 is the dataset digest, so the report's task
digest names the dataset's content). Any other dataset, or one named with a column, is scored by
perplexity over that text column (default `text`), its rows joined by blank lines, as
`--task perplexity --data FILE` scores a file. Both files are cached under cache/data/ by digest.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path

from llmasos.data.store import DatasetStore
from llmasos.data.store.stats import text_column
from llmasos.errors import InvalidRequestError
from llmasos.eval.config import EvalConfig

PREFIX = "data:"
_TASK_COLUMNS = ("choices", "label", "reference", "references")


def resolve(config: EvalConfig) -> tuple[EvalConfig, str | None]:
    """The config with a `data:` task made a task file or a perplexity run, and the report's task
    name ("data:NAME..."); other configs unchanged, with None."""
    if not config.task.startswith(PREFIX):
        return config, None
    name, _, column = config.task.removeprefix(PREFIX).partition(":")
    if config.data is not None:
        raise InvalidRequestError(f"--task {config.task} names its data; drop --data {config.data}")
    store = DatasetStore()
    manifest = store.get(name)
    if not column and any(c in manifest.schema for c in _TASK_COLUMNS):
        return replace(config, task=str(store.exported(name))), config.task
    column = text_column(manifest, column or None)
    return replace(config, task="perplexity", data=_text_file(store, name, column)), config.task


def _text_file(store: DatasetStore, name: str, column: str) -> Path:
    """The column's texts, joined by blank lines, written once (atomically) per digest and column."""
    digest = store.get(name).digest
    path = store.store.cache / "data" / f"{digest.replace(':', '-')}.{column}.txt"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staged = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            first = True
            for table in store.batches(name, columns=[column]):
                for text in table.column(column).to_pylist():
                    if text:
                        f.write(text if first else "\n\n" + text)
                        first = False
        os.replace(staged, path)
    except BaseException:
        Path(staged).unlink(missing_ok=True)
        raise
    return path
