"""Datasets in the store: Parquet shards kept as blobs beside the models' (the same blobs/, lock and
staging folder, lent by ModelStore), and a manifest per dataset, datasets/<name>.json.

A dataset's digest is the sha256 of its rows written as canonical JSON lines (keys sorted, no
spaces, UTF-8): exactly the bytes `llmasos data export` writes, so anyone can check it with
`sha256sum`, and it does not change with the input's format, its chunking, the Parquet writer's
version or the machine. The shards have their own blob digests, which `verify` re-hashes.

As with models the manifest is the commit point: shards are written to a staging folder under the
store's lock, moved into blobs/, and the manifest is renamed into place last; an error or a crash
before that registers nothing, and the next change of the store collects the stray blobs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from llmasos.data.store import readers
from llmasos.errors import LLMasOSError, StoreError
from llmasos.files import sha256_file
from llmasos.store.sources import ProgressSink, progress_bar
from llmasos.store.store import _NAME_RE, ModelStore, _write_atomically

SHARD_BYTES = 256 << 20  # Arrow bytes per shard: a few row groups each, many shards for big data


class DatasetNotFoundError(StoreError):
    """No dataset of that name in the store."""


@dataclass
class DatasetManifest:
    """What a dataset is: its shards by content digest, its columns, and what produced it."""

    name: str
    source: str  # "file:/abs/path" (import) or "dataset:<name>@<digest>" (prepare, split)
    files: dict[str, dict]  # "shard-00000.parquet" -> {"digest": "sha256:...", "size": int, "rows": int}
    schema: dict[str, str]  # column -> Arrow type
    rows: int
    digest: str  # sha256 of the rows as canonical JSON lines: what `data export` writes
    lineage: dict  # {"sources": [{"source", "digest"}], "recipe": {...} | None, "llmasos": version}
    created: str  # ISO 8601, UTC
    report: dict = field(default_factory=dict)  # what the steps that made it did (prepare)

    @property
    def size(self) -> int:
        return sum(f["size"] for f in self.files.values())


def row_line(row: dict) -> str:
    """A row as one canonical JSON line (the unit of the dataset digest and of `export`)."""
    return json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str) + "\n"


class ShardWriter:
    """Tables in, Parquet shards out (into a staging folder), with the rows' digest kept as they pass.
    Every table is cast to the first one's schema, so a dataset has one schema."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.schema: pa.Schema | None = None
        self.shards: list[tuple[Path, int]] = []  # (path, rows)
        self.rows = 0
        self._hasher = hashlib.sha256()
        self._writer: pq.ParquetWriter | None = None
        self._shard_bytes = 0

    def write(self, table: pa.Table, where: str) -> None:
        if table.num_rows == 0:
            return
        if self.schema is None:
            self.schema = table.schema
        elif table.schema != self.schema:
            table = self._conform(table, where)
        for row in table.to_pylist():
            self._hasher.update(row_line(row).encode())
        if self._writer is None:
            path = self.folder / f"shard-{len(self.shards):05d}.parquet"
            self._writer = pq.ParquetWriter(path, self.schema, compression="zstd")
            self.shards.append((path, 0))
        self._writer.write_table(table)
        path, rows = self.shards[-1]
        self.shards[-1] = (path, rows + table.num_rows)
        self.rows += table.num_rows
        self._shard_bytes += table.nbytes
        if self._shard_bytes >= SHARD_BYTES:
            self._close_shard()

    def _conform(self, table: pa.Table, where: str) -> pa.Table:
        """The table in the dataset's schema: same columns, same types, a column of nulls excepted.
        No other cast, since Arrow would turn 1 into "1" and the rows would no longer round-trip."""
        same = set(table.column_names) == set(self.schema.names) and all(
            table.schema.field(f.name).type in (f.type, pa.null()) for f in self.schema
        )
        if not same:
            raise LLMasOSError(
                f"{where}: its columns ({_describe(table.schema)}) differ from the first rows' "
                f"({_describe(self.schema)}); every input must have the same columns and types"
            )
        return table.select(self.schema.names).cast(self.schema)

    def close(self) -> str:
        """Finish the last shard; returns the dataset digest."""
        self._close_shard()
        return "sha256:" + self._hasher.hexdigest()

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer, self._shard_bytes = None, 0


class DatasetStore:
    """The datasets on this machine, by name, in the model store's home."""

    def __init__(self, home: Path | None = None):
        self.store = ModelStore(home)  # lends the blobs, the lock and the staging folder
        self.folder = self.store.datasets

    # ---- adding --------------------------------------------------------------------------------

    def import_path(
        self, path: Path | str, name: str, progress: bool | ProgressSink = False
    ) -> DatasetManifest:
        """Copy a data file or folder into the store as a dataset (see readers.py for the formats)."""
        path = Path(path).expanduser().resolve()
        self.check_new(name)
        files = readers.input_files(path)
        sources = [{"source": f"file:{f}", "digest": sha256_file(f)} for f in files]
        total = sum(f.stat().st_size for f in files)

        def batches(advance: Callable[[int], None]) -> Iterator[tuple[pa.Table, str]]:
            for file in files:
                for batch in readers.read_batches(file):
                    advance(batch.bytes_read)
                    yield batch.table, batch.where

        with progress_bar(progress) as bar:
            task = bar.add_task(f"importing {path.name}", total=total)
            return self.create(
                name, batches(lambda n: bar.advance(task, n)), source=f"file:{path}", sources=sources
            )

    def create(
        self,
        name: str,
        tables: Iterable[tuple[pa.Table, str]],
        source: str,
        sources: list[dict],
        recipe: dict | None = None,
        report: dict | None = None,
    ) -> DatasetManifest:
        """Write (table, where) pairs as a new dataset; registered only once every row is written.
        `report` may be filled in while `tables` is consumed (a pipeline's counts)."""
        self.check_new(name)
        with self.store.lock(), self.store.staging() as work:
            try:
                writer = ShardWriter(work)
                for table, where in tables:
                    writer.write(table, where)
                lineage = {"sources": sources, "recipe": recipe}
                return self.register(name, writer, source, lineage, report or {})
            finally:
                self.store.collect_garbage()  # the blobs of a failed attempt

    def register(
        self, name: str, writer: ShardWriter, source: str, lineage: dict, report: dict
    ) -> DatasetManifest:
        """Close `writer`, move its shards into blobs/ and write the manifest (the commit point).
        The caller holds the store's lock and collects the garbage of a failed attempt."""
        digest = writer.close()
        if writer.schema is None:
            raise LLMasOSError(f"no rows to store in dataset '{name}': the input has no records")
        self.check_new(name)  # again, under the lock: another process may have taken it
        files = {}
        for path, rows in writer.shards:
            files[path.name] = {**self.store.add_blob(path), "rows": rows}
        manifest = DatasetManifest(
            name=name,
            source=source,
            files=files,
            schema={f.name: str(f.type) for f in writer.schema},
            rows=writer.rows,
            digest=digest,
            lineage={**lineage, "llmasos": _version()},
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            report=report,
        )
        target = self._manifest_path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(target, json.dumps(asdict(manifest), indent=2) + "\n", self.store.tmp)
        return manifest

    # ---- reading -------------------------------------------------------------------------------

    def list(self) -> list[DatasetManifest]:
        names = (str(p.relative_to(self.folder).with_suffix("")) for p in self.folder.rglob("*.json"))
        return [self.get(n) for n in sorted(names) if _NAME_RE.fullmatch(n)]

    def get(self, name: str) -> DatasetManifest:
        check_dataset_name(name)
        path = self._manifest_path(name)
        if not path.is_file():
            raise DatasetNotFoundError(
                f"dataset '{name}' is not in the store; see `llmasos data list`, or add it with "
                f"`llmasos data import PATH --name {name}`"
            )
        try:
            return DatasetManifest(**json.loads(path.read_text()))
        except (ValueError, TypeError) as e:
            raise StoreError(
                f"the manifest of dataset '{name}' ({path}) is damaged ({e}); run `llmasos data rm {name}` "
                "and import it again"
            ) from e

    def has(self, name: str) -> bool:
        return bool(_NAME_RE.fullmatch(name)) and self._manifest_path(name).is_file()

    def batches(self, name: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """The dataset's rows, a row-group batch at a time, in order."""
        manifest = self.get(name)
        for shard, f in manifest.files.items():
            blob = self.store.blob(f["digest"])
            if not blob.is_file():
                raise StoreError(f"dataset '{name}' lacks the blob of {shard}; run `llmasos data verify`")
            for batch in pq.ParquetFile(blob).iter_batches(batch_size=readers.BATCH_ROWS, columns=columns):
                yield pa.Table.from_batches([batch])

    def rows(self, name: str) -> Iterator[dict]:
        for table in self.batches(name):
            yield from table.to_pylist()

    def export(self, name: str, out: Path | str) -> int:
        """Write the dataset to `out`: JSONL (its canonical lines: the file's sha256 is the dataset
        digest) or, for a .parquet name, Parquet in the dataset's schema (importing it gives the same
        digest). Written beside `out` and renamed, so a failed export leaves no half file. Returns
        the rows."""
        out = Path(out).expanduser()
        parquet = out.suffix.lower() == ".parquet"
        if not parquet and out.suffix.lower() not in (".jsonl", ".ndjson"):
            raise LLMasOSError(f"cannot export to {out.name}: name a .jsonl or a .parquet file")
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, staged = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}-")
        count = 0
        try:
            with os.fdopen(fd, "wb") as f:
                if parquet:
                    count = self._write_parquet(name, f)
                else:
                    for row in self.rows(name):
                        f.write(row_line(row).encode())
                        count += 1
            os.replace(staged, out)
        except BaseException:
            Path(staged).unlink(missing_ok=True)
            raise
        return count

    def _write_parquet(self, name: str, f) -> int:
        """The shards' batches into one Parquet file (they share one schema: see ShardWriter)."""
        writer, count = None, 0
        for table in self.batches(name):
            writer = writer or pq.ParquetWriter(f, table.schema, compression="zstd")
            writer.write_table(table)
            count += table.num_rows
        if writer is not None:
            writer.close()
        return count

    def exported(self, name: str) -> Path:
        """The dataset's JSONL export, made once into cache/data/ and named by the digest (what
        training and evaluation read); an export whose sha256 is not the digest (a partial or
        damaged file) is written again."""
        manifest = self.get(name)
        path = self.store.cache / "data" / f"{manifest.digest.replace(':', '-')}.jsonl"
        if not path.is_file() or sha256_file(path) != manifest.digest:
            self.export(name, path)
        return path

    def verify(self, name: str) -> list[str]:
        """Re-hash every shard blob, then the rows themselves; the problems found (empty: all good)."""
        manifest = self.get(name)
        problems = []
        for shard, f in manifest.files.items():
            blob = self.store.blob(f["digest"])
            if not blob.is_file():
                problems.append(f"the blob of {shard} is missing")
            elif sha256_file(blob) != f["digest"]:
                problems.append(f"the blob of {shard} is corrupted (hash mismatch)")
        if problems:
            return [f"{p}; import the dataset again" for p in problems]
        hasher = hashlib.sha256()
        for row in self.rows(name):
            hasher.update(row_line(row).encode())
        if "sha256:" + hasher.hexdigest() != manifest.digest:
            problems.append("its rows do not hash to the dataset digest; import the dataset again")
        return problems

    # ---- removing ------------------------------------------------------------------------------

    def remove(self, name: str) -> None:
        """Delete the dataset, then every blob nothing refers to any more."""
        check_dataset_name(name)
        if not self._manifest_path(name).is_file():
            self.get(name)  # raises the not-found error
        with self.store.lock():
            self._manifest_path(name).unlink()
            shutil.rmtree(self.stats_folder(name), ignore_errors=True)
            parent = self._manifest_path(name).parent
            if parent != self.folder and not any(parent.iterdir()):
                parent.rmdir()
            self.store.collect_garbage()

    # ---- internals -----------------------------------------------------------------------------

    def check_new(self, name: str) -> None:
        """Raise unless `name` is a valid name that no dataset has yet (checked before any work)."""
        check_dataset_name(name)
        if self._manifest_path(name).is_file():
            raise StoreError(
                f"dataset '{name}' already exists; pick another --name, or `llmasos data rm {name}` first"
            )

    def _manifest_path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def stats_folder(self, name: str) -> Path:
        """Where `llmasos data stats` writes by default: beside the manifest (removed with it)."""
        return self.folder / f"{name}.stats"


def check_dataset_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise StoreError(
            f"invalid dataset name '{name}': use letters, digits, '.', '_' and '-', starting with a letter "
            "or digit, with at most one '/' as in org/name"
        )


def _version() -> str:
    """LLMasOS's version, from the package object (always imported before this module): importing
    the package by name would count as importing its lazy facade for the layer checks."""
    return sys.modules["llmasos"].__version__


def _describe(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)
