"""Stored responses of the Responses API: an embedded SQLite database ($LLMASOS_HOME/responses.sqlite).

A response is stored with the items it was given (its whole conversation: a `previous_response_id`
chain's items, then its own input) so that the next turn prepends them, and `GET .../input_items`
lists them. Each row belongs to the key that made it (None on a server without keys); every read,
chain and delete names its owner, so one key can never see that another's response exists.

SQLite because it ships with Python, survives a restart, and lets `llmasos serve` processes share a
file (WAL mode: readers never wait on the one writer). One connection, guarded by a lock, serves the
worker threads the server calls it from (`asyncio.to_thread`), so the event loop never waits on disk.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    owner TEXT,
    created_at REAL NOT NULL,
    response TEXT NOT NULL,
    input_items TEXT NOT NULL
)
"""


@dataclass
class StoredResponse:
    id: str
    owner: str | None
    response: dict  # the response object as the client received it
    input_items: list[dict]  # every item its model was given, oldest first (instructions aside)

    def conversation(self) -> list[dict]:
        """The items a follow-up turn continues from: this response's input, then its output."""
        return self.input_items + self.response["output"]


class ResponseStore:
    def __init__(self, path: Path | str | None = None):
        home = Path(os.environ.get("LLMASOS_HOME") or Path.home() / ".llmasos").expanduser()
        self.path = Path(path).expanduser() if path else home / "responses.sqlite"
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None  # opened on first use: a server never asked makes no file

    def _connection(self) -> sqlite3.Connection:
        """The connection, opened on first use; call it holding the lock."""
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=5000")  # another server process writing
            db.execute(SCHEMA)
            os.chmod(self.path, 0o600)  # conversations are personal data
            self._db = db
        return self._db

    def put(self, stored: StoredResponse) -> None:
        row = (
            stored.id,
            stored.owner,
            time.time(),
            json.dumps(stored.response),
            json.dumps(stored.input_items),
        )
        with self._lock:
            self._connection().execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)", row)

    def get(self, response_id: str, owner: str | None) -> StoredResponse | None:
        """The response, if it exists and belongs to `owner` (`IS` also matches None to NULL)."""
        with self._lock:
            row = (
                self._connection()
                .execute(
                    "SELECT response, input_items FROM responses WHERE id = ? AND owner IS ?",
                    (response_id, owner),
                )
                .fetchone()
            )
        if row is None:
            return None
        return StoredResponse(response_id, owner, json.loads(row[0]), json.loads(row[1]))

    def delete(self, response_id: str, owner: str | None) -> bool:
        """True if there was such a response of `owner`'s to delete."""
        with self._lock:
            cursor = self._connection().execute(
                "DELETE FROM responses WHERE id = ? AND owner IS ?", (response_id, owner)
            )
        return cursor.rowcount > 0

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
