"""JSONL data files, read with errors that name the file and the line (and nothing heavy imported)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from llmasos.errors import LLMasOSError


def read_jsonl(path: Path | str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a user-facing error for a bad file or line."""
    path = Path(path)
    if not path.is_file():
        raise LLMasOSError(f"data file {path} does not exist; give a JSONL file, one JSON object per line")
    count = 0
    with open(path, encoding="utf-8") as f:
        try:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise LLMasOSError(f"{path}, line {number}: not valid JSON ({error.msg})") from error
                if not isinstance(record, dict):
                    raise LLMasOSError(
                        f"{path}, line {number}: expected a JSON object, got {type(record).__name__}"
                    )
                count += 1
                yield number, record
        except UnicodeDecodeError as error:
            raise LLMasOSError(f"{path} is not UTF-8 text ({error})") from error
    if not count:
        raise LLMasOSError(f"data file {path} is empty; it needs at least one JSON object per line")
