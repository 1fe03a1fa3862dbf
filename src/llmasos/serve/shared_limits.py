"""Rate limits shared by the replicas of one server: the sliding windows of serve/limits.py kept in
one SQLite file that every replica opens, so a key limited to R requests a minute gets R across all of
them, not R per replica, and a replica that restarts finds the window as it was.

The router of `llmasos serve --replicas N` makes the file ($LLMASOS_HOME/run/serve-PORT/limits.sqlite,
fresh at each start) and gives its path to every replica (`--shared-limits`). WAL mode lets readers
run beside the one writer; `admit` reads the key's window, decides with `limits.decide` and records
the admitted request in one IMMEDIATE transaction, so two replicas cannot both take the last place.
A transaction is a few indexed rows of one key: it runs on the server's event loop, as the
in-process limiter does, and waits at most BUSY_TIMEOUT_MS for another replica's.

The clock is the wall clock (time.time): monotonic clocks are not comparable between processes in
general, and a minute's window tolerates what NTP corrects. The file must be local to the machines'
replicas: SQLite's locks do not hold on network file systems, so replicas on other machines (Ray)
share it only where the file system is the same one (docs/distributed.md).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from llmasos.serve.keys import ApiKey
from llmasos.serve.limits import WINDOW_S, Decision, Window, decide

BUSY_TIMEOUT_MS = 5000
SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (key TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS requests_key_at ON requests (key, at);
CREATE TABLE IF NOT EXISTS tokens (key TEXT NOT NULL, at REAL NOT NULL, tokens INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS tokens_key_at ON tokens (key, at);
"""


class SharedRateLimiter:
    """`RateLimiter`'s admit and record over a SQLite file that other processes share."""

    def __init__(self, path: Path | str, clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self.clock = clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # autocommit (isolation_level None): the transactions are the explicit BEGIN IMMEDIATE below. Made
        # in one thread, used on the event loop's (a server in a thread): sqlite3 serializes the calls.
        self._db = sqlite3.connect(
            self.path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # a crash of the machine may lose the last minute
        self._db.executescript(SCHEMA)

    def admit(self, key: ApiKey, estimated_tokens: int = 0) -> Decision:
        """`limits.decide` on the key's window as all replicas filled it; an admitted request counts
        towards requests per minute at once, in the same transaction."""
        if key.requests_per_minute is None and key.tokens_per_minute is None:
            return decide(Window(), key, estimated_tokens, self.clock())  # the budget alone: no window
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            now = self.clock()
            since = now - WINDOW_S
            db.execute("DELETE FROM requests WHERE key = ? AND at <= ?", (key.name, since))
            db.execute("DELETE FROM tokens WHERE key = ? AND at <= ?", (key.name, since))
            window = Window()
            window.requests.extend(
                at for (at,) in db.execute("SELECT at FROM requests WHERE key = ? ORDER BY at", (key.name,))
            )
            window.tokens.extend(
                db.execute("SELECT at, tokens FROM tokens WHERE key = ? ORDER BY at", (key.name,))
            )
            window.token_sum = sum(tokens for _, tokens in window.tokens)
            decision = decide(window, key, estimated_tokens, now)
            if decision.allowed and key.requests_per_minute is not None:
                db.execute("INSERT INTO requests VALUES (?, ?)", (key.name, now))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return decision

    def record(self, key: ApiKey, tokens: int) -> None:
        """Charge a finished request's real token count to the key's shared tokens-per-minute window."""
        if key.tokens_per_minute is not None:
            self._db.execute("INSERT INTO tokens VALUES (?, ?, ?)", (key.name, self.clock(), tokens))

    def close(self) -> None:
        self._db.close()
