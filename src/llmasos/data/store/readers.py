"""The input formats of `llmasos data import`, each read as a stream of small Arrow tables, so that
memory stays bounded whatever the size of the input.

    .jsonl .ndjson      one JSON object per line (the columns are the keys)
    .parquet            its row groups, in batches
    .csv .tsv           pyarrow's streaming CSV reader (types inferred from the first block)
    .txt .md            one document per file: {"text": contents}
    HF `datasets`       a `save_to_disk` folder (state.json + Arrow stream files), read with pyarrow
                        itself: the `datasets` library is not needed to import one
    a folder            every file of the formats above in it, in path order

Errors name the file (and line) and say what to do, before anything is registered.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from llmasos.errors import LLMasOSError

BATCH_ROWS = 4096
BATCH_BYTES = 8 << 20
_JSONL = (".jsonl", ".ndjson")
_CSV = (".csv", ".tsv")
_TEXT = (".txt", ".md")
SUFFIXES = (*_JSONL, ".parquet", *_CSV, *_TEXT)


@dataclass
class Batch:
    """Some rows of one input file, and how many of the input's bytes they account for (progress)."""

    table: pa.Table
    where: str  # the file (and lines) the rows came from, for error messages
    bytes_read: int


def input_files(path: Path) -> list[Path]:
    """The files an import of `path` reads, in order; a clear error when there is nothing to read."""
    if not path.exists():
        raise LLMasOSError(f"{path} does not exist; give a data file ({', '.join(SUFFIXES)}) or a folder")
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES and path.suffix != ".arrow":
            raise LLMasOSError(f"{path}: unknown data format '{path.suffix}'; use {', '.join(SUFFIXES)}")
        return [path]
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
        raise LLMasOSError(
            f"{path} is a Hugging Face DatasetDict with the splits {', '.join(splits)}; import one split "
            f"at a time, e.g. `llmasos data import {path / (splits[0] if splits else 'train')} --name ...`"
        )
    if (path / "state.json").is_file():
        return _hf_arrow_files(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise LLMasOSError(f"folder {path} has no data files ({', '.join(SUFFIXES)})")
    return files


def read_batches(path: Path) -> Iterator[Batch]:
    """Every row of one input file, a bounded batch at a time."""
    suffix = path.suffix.lower()
    if suffix in _JSONL:
        return _jsonl(path)
    if suffix == ".parquet":
        return _parquet(path)
    if suffix in _CSV:
        return _csv(path, delimiter="\t" if suffix == ".tsv" else ",")
    if suffix == ".arrow":
        return _arrow_stream(path)
    return _text(path)


def _jsonl(path: Path) -> Iterator[Batch]:
    rows: list[dict] = []
    size, first = 0, 1
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            size += len(line)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise LLMasOSError(f"{path}, line {number}: not valid JSON ({e})") from e
            if not isinstance(row, dict):
                raise LLMasOSError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
            if len(rows) >= BATCH_ROWS or size >= BATCH_BYTES:
                yield Batch(_from_rows(rows, f"{path}, lines {first}-{number}"), f"{path}:{first}", size)
                rows, size, first = [], 0, number + 1
    if rows:
        yield Batch(_from_rows(rows, f"{path}, lines {first}-"), f"{path}:{first}", size)


def _from_rows(rows: list[dict], where: str) -> pa.Table:
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowException, TypeError, ValueError) as e:
        raise LLMasOSError(
            f"{where}: the records do not fit one table ({e}); a field must have the same type in every line"
        ) from e


def _parquet(path: Path) -> Iterator[Batch]:
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
        total_rows, size = max(1, file.metadata.num_rows), path.stat().st_size
        for batch in file.iter_batches(batch_size=BATCH_ROWS):
            yield Batch(pa.Table.from_batches([batch]), str(path), size * batch.num_rows // total_rows)
    except (pa.ArrowException, OSError) as e:
        raise LLMasOSError(f"{path} is not a readable Parquet file ({e})") from e


def _csv(path: Path, delimiter: str) -> Iterator[Batch]:
    import pyarrow.csv as csv

    try:
        reader = csv.open_csv(
            path,
            read_options=csv.ReadOptions(block_size=BATCH_BYTES),
            parse_options=csv.ParseOptions(delimiter=delimiter),
        )
        for batch in reader:
            yield Batch(pa.Table.from_batches([batch]), str(path), batch.nbytes)
    except (pa.ArrowException, OSError) as e:
        raise LLMasOSError(
            f"{path} could not be read as CSV ({e}); a column must keep the type of its first rows"
        ) from e


def _arrow_stream(path: Path) -> Iterator[Batch]:
    try:
        with pa.memory_map(str(path)) as source:
            for batch in pa.ipc.open_stream(source):
                yield Batch(pa.Table.from_batches([batch]), str(path), batch.nbytes)
    except (pa.ArrowException, OSError) as e:
        raise LLMasOSError(f"{path} is not a readable Arrow stream file ({e})") from e


def _text(path: Path) -> Iterator[Batch]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LLMasOSError(f"{path} is not UTF-8 text ({e})") from e
    yield Batch(pa.table({"text": [text]}), str(path), path.stat().st_size)


def _hf_arrow_files(folder: Path) -> list[Path]:
    """The Arrow files of a `datasets` save_to_disk folder, in the order its state.json lists them."""
    try:
        state = json.loads((folder / "state.json").read_text())
        files = [folder / entry["filename"] for entry in state["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise LLMasOSError(f"{folder / 'state.json'} is not a `datasets` save_to_disk state ({e})") from e
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not files:
        raise LLMasOSError(f"{folder} lacks its Arrow files ({', '.join(missing) or 'none listed'})")
    return files
