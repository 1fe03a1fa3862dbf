"""What the dedup steps remember across batches, on disk, so that `data prepare`'s memory does not
grow with the dataset: a SQLite table of 64-bit keys (text hashes, MinHash band hashes), each with
the ordinal of the kept row it came from, and a flat file of the kept rows' MinHash signatures.

SQLite (the standard library's) keeps its B-tree in a temporary file and a page cache of a few MiB;
lookups of a whole batch are one query. A Python set or datasketch's in-memory LSH would cost
~100 bytes to ~2 KiB per row in RAM instead: 0.5-2 GiB for a few million rows.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from collections.abc import Sequence

import numpy as np

_CACHE_KIB = 8 << 10  # SQLite's page cache, per index
_SIGNED = np.dtype("<i8")  # SQLite integers are signed 64-bit


class KeyIndex:
    """64-bit keys -> ordinals of the rows they came from; several rows may share a key."""

    def __init__(self, folder: str):
        self._db = sqlite3.connect(os.path.join(folder, "keys.sqlite"), isolation_level=None)
        for pragma in ("journal_mode = OFF", "synchronous = OFF", f"cache_size = -{_CACHE_KIB}",
                       "temp_store = FILE"):  # fmt: skip
            self._db.execute(f"PRAGMA {pragma}")
        self._db.execute("CREATE TABLE keys (key INTEGER NOT NULL, ordinal INTEGER NOT NULL)")
        self._db.execute("CREATE INDEX by_key ON keys (key)")

    def lookup(self, keys: np.ndarray) -> dict[int, list[int]]:
        """The ordinals stored under each of `keys` (uint64), for those stored at all."""
        found: dict[int, list[int]] = {}
        if len(keys) == 0:
            return found
        query = "SELECT key, ordinal FROM keys WHERE key IN (SELECT value FROM json_each(?))"
        signed = np.unique(keys.astype(np.uint64).view(_SIGNED))
        for key, ordinal in self._db.execute(query, (json.dumps(signed.tolist()),)):
            found.setdefault(int(np.int64(key).view(np.uint64)), []).append(ordinal)
        return found

    def add(self, keys: Sequence[int] | np.ndarray, ordinals: Sequence[int] | np.ndarray) -> None:
        signed = np.asarray(keys, dtype=np.uint64).view(_SIGNED).tolist()
        self._db.executemany("INSERT INTO keys VALUES (?, ?)", zip(signed, np.asarray(ordinals).tolist()))

    def close(self) -> None:
        self._db.close()


class SignatureFile:
    """Fixed-size records of the kept rows, appended in kept order and read back by ordinal with
    pread, so they stay out of RAM: the row's line, then its MinHash signature (uint32 values:
    datasketch's hash values are below 2**32)."""

    def __init__(self, folder: str, num_perm: int):
        self._file = open(os.path.join(folder, "signatures.u32"), "w+b")  # noqa: SIM115 (closed by close())
        self._width = (num_perm + 1) * 4
        self.count = 0

    def append(self, lines: Sequence[int], signatures: np.ndarray) -> None:
        records = np.column_stack([np.asarray(lines, dtype=np.uint64), signatures]).astype(np.uint32)
        self._file.seek(0, os.SEEK_END)
        self._file.write(records.tobytes())
        self.count += len(records)

    def read(self, ordinal: int) -> tuple[int, np.ndarray]:
        """(line, signature) of the kept row number `ordinal` (0-based)."""
        self._file.flush()
        record = np.frombuffer(os.pread(self._file.fileno(), self._width, ordinal * self._width), np.uint32)
        return int(record[0]), record[1:]

    def close(self) -> None:
        self._file.close()


def spill_folder() -> tempfile.TemporaryDirectory:
    """A private folder for one step's index (in TMPDIR), removed when the step closes."""
    return tempfile.TemporaryDirectory(prefix="llmasos-dedup-")


def band_keys(signatures: np.ndarray, bands: Sequence[tuple[int, int]]) -> np.ndarray:
    """One 64-bit key per (row, LSH band): a multiply-add hash of the band's values, salted by the
    band's number so equal values in different bands differ. A rare collision only makes a candidate,
    which the signature comparison then rejects."""
    values = signatures.astype(np.uint64)
    keys = np.empty((len(values), len(bands)), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for b, (start, end) in enumerate(bands):
            multipliers = _MULTIPLIERS[: end - start]
            keys[:, b] = (values[:, start:end] * multipliers).sum(axis=1, dtype=np.uint64) + np.uint64(b)
    return keys


_MULTIPLIERS = np.random.default_rng(20261206).integers(1, 2**63, size=1024, dtype=np.uint64) * 2 + 1
