"""A prefix cache that survives restarts: full KV blocks on disk, one file per block.

The GPU prefix cache (kernel/memory.py) dies with its process; a long system prompt or document is
computed again after every restart. Here each full block the engine computes is also written to a
folder (default `$LLMASOS_HOME/cache/kv`), and a later engine, in this process or another, reads it
back instead of computing it when a request's prefix matches.

A file is named by sha256(model key + the block's chain hash). The chain hash already covers the
per-key salt and every token up to the block's end (memory.chain_hash), and the model key covers the
model's files and everything that changes the KV's bytes (dtype, layout, kernels), so one folder
serves many models and tenants, and no tenant's file can ever answer another's prompt.

A file: MAGIC, the model key, the chain hash, the block's token ids, the payload's sha256, then the
payload (the block's K and V for every layer, raw bytes in the runner's layout). A read checks all
of them, so a truncated, corrupt or foreign file is a miss, and it is removed. Files are written to a
temporary name and renamed, so a crash never leaves a half-written block under a real name.

The folder is bounded (`max_bytes`) with least-recently-used eviction: a hit touches the file's
mtime, so the order survives a restart too. Writes go through one background thread per folder, so
the engine's step only copies the block out of the KV cache; `flush()` waits for them. The index
and the bound are per process: engines of one process share them, separate processes sharing a
folder each keep the bound for what they see.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import queue
import struct
import threading
import time
from collections import OrderedDict
from pathlib import Path

from llmasos.errors import LLMasOSError

log = logging.getLogger("llmasos")

MAGIC = b"LLMKV01\n"
SUFFIX = ".kv"
_HEAD = struct.Struct("<8s32s32sI")  # magic, model key, chain hash, number of tokens
_DIGEST_SIZE = 32
_STALE_TEMP_S = 3600.0  # a temporary file this old is a crash's leftover, not another process's write
_QUEUE_BYTES = 256 * 2**20  # most payload bytes waiting to be written; past it, the engine waits


def default_folder() -> Path:
    home = Path(os.environ.get("LLMASOS_HOME") or Path.home() / ".llmasos").expanduser()
    return home / "cache" / "kv"


def model_digest(model_dir: Path) -> str:
    """The model's identity from its files: a store model's files are links to blobs named by their
    sha256, so the link targets suffice; any other file is hashed."""
    from llmasos.files import sha256_file

    hasher = hashlib.sha256()
    for path in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
        target = path.resolve().name
        identity = target if path.is_symlink() and target.startswith("sha256-") else sha256_file(path)
        hasher.update(f"{path.relative_to(model_dir)}\0{identity}\n".encode())
    return hasher.hexdigest()


class _Folder:
    """One folder's index (file name -> size, least recently used first), its bound and its writer."""

    def __init__(self, path: Path, max_bytes: int):
        self.path, self.max_bytes = path, max_bytes
        self.lock = threading.Lock()
        self.index: OrderedDict[str, int] = OrderedDict()
        self.total_bytes = 0
        self.pending: set[str] = set()  # queued, not yet written
        self.queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self.queued_bytes = 0
        self.room = threading.Condition(self.lock)
        self.writer: threading.Thread | None = None
        path.mkdir(parents=True, exist_ok=True)
        self._scan()

    def _scan(self) -> None:
        now, found = time.time(), []
        for entry in os.scandir(self.path):
            try:
                stat = entry.stat()
            except FileNotFoundError:  # another process evicted it meanwhile
                continue
            if entry.name.endswith(SUFFIX):
                found.append((stat.st_mtime, entry.name, stat.st_size))
            elif entry.name.endswith(".tmp") and now - stat.st_mtime > _STALE_TEMP_S:
                _remove(self.path / entry.name)
        for _, name, size in sorted(found):
            self.index[name] = size
            self.total_bytes += size
        self._evict()

    def _evict(self) -> None:
        """Remove least recently used files until the folder fits its bound (lock held)."""
        while self.total_bytes > self.max_bytes and self.index:
            name, size = self.index.popitem(last=False)
            self.total_bytes -= size
            _remove(self.path / name)

    def forget(self, name: str) -> None:
        with self.lock:
            size = self.index.pop(name, None)
            if size is not None:
                self.total_bytes -= size
        _remove(self.path / name)

    def touch(self, name: str) -> None:
        with self.lock:
            if name in self.index:
                self.index.move_to_end(name)
        try:
            os.utime(self.path / name)
        except FileNotFoundError:
            pass

    def enqueue(self, name: str, data: bytes) -> None:
        with self.lock:
            if name in self.index or name in self.pending:
                return
            while self.queued_bytes and self.queued_bytes + len(data) > _QUEUE_BYTES:
                self.room.wait()
            self.pending.add(name)
            self.queued_bytes += len(data)
            if self.writer is None:
                self.writer = threading.Thread(target=self._write_loop, name="llmasos-kv-disk", daemon=True)
                self.writer.start()
        self.queue.put((name, data))

    def flush(self) -> None:
        if self.writer is not None:
            self.queue.join()

    def _write_loop(self) -> None:
        while True:
            name, data = self.queue.get()
            try:
                self._write(name, data)
            except OSError as e:  # a full or read-only disk: the block stays in memory only
                log.warning("could not write a KV block to %s: %s", self.path, e)
            finally:
                with self.lock:
                    self.pending.discard(name)
                    self.queued_bytes -= len(data)
                    self.room.notify_all()
                self.queue.task_done()

    def _write(self, name: str, data: bytes) -> None:
        staged = self.path / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(staged, "wb") as f:
            f.write(data)
        os.replace(staged, self.path / name)
        with self.lock:
            self.index[name] = len(data)
            self.total_bytes += len(data)
            self._evict()


_folders: dict[Path, _Folder] = {}
_folders_lock = threading.Lock()


def _folder(path: Path, max_bytes: int) -> _Folder:
    """The process's one `_Folder` for path (the largest bound asked for wins)."""
    path = path.expanduser().resolve()
    with _folders_lock:
        folder = _folders.get(path)
        if folder is None:
            folder = _folders[path] = _Folder(path, max_bytes)
        with folder.lock:
            folder.max_bytes = max(folder.max_bytes, max_bytes)
        return folder


@atexit.register
def _flush_all() -> None:
    """Blocks still queued at exit are written (the writer threads are daemons)."""
    for folder in list(_folders.values()):
        folder.flush()


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


class DiskPrefixCache:
    """One model's view of a folder of KV blocks: `save` after a block is computed, `load` at admission.

    model_key: what makes two engines' KV bytes interchangeable (see `EngineCore`); block_bytes: the
    payload's exact size, so a file from another layout is refused even before its checksum."""

    def __init__(self, folder: Path, max_bytes: int, model_key: bytes, block_bytes: int):
        if max_bytes <= 0:
            raise LLMasOSError(f"the KV disk cache needs a positive size, not {max_bytes} bytes")
        if len(model_key) != _DIGEST_SIZE:
            raise LLMasOSError("the KV disk cache's model key must be a sha256 digest (32 bytes)")
        self.model_key, self.block_bytes = model_key, block_bytes
        self.folder = _folder(Path(folder), max_bytes)
        self.hit_blocks = 0  # blocks read back (by this view)
        self.dropped_files = 0  # corrupt, truncated or foreign files found and removed

    @property
    def path(self) -> Path:
        return self.folder.path

    @property
    def total_bytes(self) -> int:
        return self.folder.total_bytes

    @property
    def num_files(self) -> int:
        return len(self.folder.index)

    def name(self, block_hash: bytes) -> str:
        return hashlib.sha256(self.model_key + block_hash).hexdigest() + SUFFIX

    def has(self, block_hash: bytes) -> bool:
        """Written or queued (a dict lookup, cheap enough for every published block)."""
        name = self.name(block_hash)
        return name in self.folder.index or name in self.folder.pending

    def save(self, block_hash: bytes, token_ids: tuple[int, ...], payload: bytes) -> None:
        """Queue the block for writing (nothing if it is on disk or queued already)."""
        if len(payload) != self.block_bytes:
            raise LLMasOSError(f"a KV block is {self.block_bytes} bytes, not {len(payload)}")
        head = _HEAD.pack(MAGIC, self.model_key, block_hash, len(token_ids))
        tokens = struct.pack(f"<{len(token_ids)}q", *token_ids)
        self.folder.enqueue(self.name(block_hash), head + tokens + hashlib.sha256(payload).digest() + payload)

    def load(self, block_hash: bytes, token_ids: tuple[int, ...]) -> bytes | None:
        """The block's payload, checked against its header and checksum; None for a miss. A file that
        fails a check is removed, so it costs one read, once."""
        name = self.name(block_hash)
        if name not in self.folder.index:
            return None
        try:
            data = (self.path / name).read_bytes()
        except FileNotFoundError:  # evicted by another process
            self.folder.forget(name)
            return None
        payload = self._check(data, block_hash, token_ids)
        if payload is None:
            log.warning("ignoring and removing a damaged or foreign KV block file %s", self.path / name)
            self.dropped_files += 1
            self.folder.forget(name)
            return None
        self.folder.touch(name)
        self.hit_blocks += 1
        return payload

    def _check(self, data: bytes, block_hash: bytes, token_ids: tuple[int, ...]) -> bytes | None:
        n = len(token_ids)
        start = _HEAD.size + 8 * n + _DIGEST_SIZE
        if len(data) != start + self.block_bytes:
            return None
        if _HEAD.unpack_from(data) != (MAGIC, self.model_key, block_hash, n):
            return None
        if struct.unpack_from(f"<{n}q", data, _HEAD.size) != tuple(token_ids):
            return None
        payload = data[start:]
        if hashlib.sha256(payload).digest() != data[start - _DIGEST_SIZE : start]:
            return None
        return payload

    def flush(self) -> None:
        """Wait until every queued block is on disk."""
        self.folder.flush()
