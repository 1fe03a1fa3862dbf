"""The audit log: one JSON line per request, to answer "who used which model, when, how much",
and one per guard verdict (`"event": "guard"`: what was found and done, never the text).

Logging must never slow a request, so `log` only puts the record on a queue; a writer thread
turns each record into one line and writes it with a single os.write to a file opened O_APPEND,
as soon as it arrives. Once written, a line is the kernel's: a crash of the server loses only the
records still queued. (A crash of the machine can lose the last lines too: an fsync per request
would cost more than the log is worth.)

A process killed in the middle of a write can leave the last line cut short: Linux stops a write
to a file at a page boundary when the writer gets a fatal signal. Readers skip a line that does
not parse, and the next AuditLog on the file ends that line first, so it never swallows a record.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import threading
from datetime import datetime, timezone
from pathlib import Path

from llmasos.errors import LLMasOSError

logger = logging.getLogger(__name__)


class AuditLog:
    """An append-only JSON-lines file (default $LLMASOS_HOME/audit.jsonl). Prompts are personal
    data, so they are kept only when asked for with include_prompts=True."""

    def __init__(self, path: Path | str | None = None, include_prompts: bool = False):
        home = Path(os.environ.get("LLMASOS_HOME") or Path.home() / ".llmasos").expanduser()
        self.path = Path(path).expanduser() if path else home / "audit.jsonl"
        self.include_prompts = include_prompts
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            size = os.fstat(self._fd).st_size
            if size and os.pread(self._fd, 1, size - 1) != b"\n":  # a line cut short by a crash
                os.write(self._fd, b"\n")
        except OSError as e:
            raise LLMasOSError(f"cannot open the audit log {self.path} ({e}); give a writable path") from e
        self._queue: queue.SimpleQueue[dict | None] = queue.SimpleQueue()
        self._closed = False
        self._writer = threading.Thread(target=self._write_lines, name="llmasos-audit", daemon=True)
        self._writer.start()
        atexit.register(self.close)  # a normal exit writes what is queued; the thread is a daemon

    def log(
        self,
        *,
        key: str | None,
        model: str | None,
        route: str,
        status: int,
        prompt_tokens: int,
        completion_tokens: int,
        latency_s: float,
        request_id: str | None,
        prompt: object = None,
    ) -> None:
        """Queue one request's record and return at once. `key` is the key's name (None with auth
        off); `prompt` (text or chat messages) is dropped unless include_prompts is on."""
        record = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "key": key,
            "model": model,
            "route": route,
            "status": status,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "latency_s": round(latency_s, 6),
            "request_id": request_id,
        }
        if self.include_prompts:
            record["prompt"] = prompt
        self._put(record)

    def log_guard(self, record: dict) -> None:
        """Queue one guard verdict's record, `Verdict.audit_record(key, request_id)`: categories,
        actions, offsets and scores, which never hold the text (include_prompts does not apply)."""
        self._put(record)

    def _put(self, record: dict) -> None:
        if self._closed:
            raise ValueError(f"the audit log {self.path} is closed")
        self._queue.put(record)

    def close(self) -> None:
        """Write everything queued, then stop the writer and close the file. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._writer.join()
        os.close(self._fd)
        atexit.unregister(self.close)

    def _write_lines(self) -> None:
        while (record := self._queue.get()) is not None:
            line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
            try:
                os.write(self._fd, line.encode())  # one write, one append: the line lands whole
            except OSError as e:  # disk full, say: losing a record must not stop the log
                logger.error("audit log %s: a record was lost: %s", self.path, e)
