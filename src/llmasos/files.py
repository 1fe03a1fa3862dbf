"""Durable file changes shared by the store and the keys file: an exclusive lock between
processes, a staged copy written and fsynced before it replaces the original, and an fsync of
the folder so the rename itself survives a crash. And JSONL data files (training data, eval
tasks), read with errors that name the file and the line."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llmasos.errors import LLMasOSError


def sha256_file(path: Path | str) -> str:
    """ "sha256:<hex>" of a file's bytes (what `sha256sum` prints), read in 1 MiB chunks."""
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


@contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an flock on lock_path (created if missing); each open is its own holder, so threads
    of one process exclude each other too."""
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def stage_text(folder: Path, prefix: str, text: str) -> str:
    """Write text to a new private (0600) file in folder, fsynced; returns its path for os.replace."""
    fd, staged = tempfile.mkstemp(dir=folder, prefix=prefix)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(staged)
        raise
    return staged


def fsync_dir(folder: Path) -> None:
    """Make a rename in folder durable, not only the renamed file's contents."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
