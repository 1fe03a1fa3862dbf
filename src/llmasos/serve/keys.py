"""API keys for the server: who may call it, which models and tools, and how much.

The keys file ($LLMASOS_HOME/keys.json) keeps a sha256 of each secret, never the secret. A secret
is 32 random bytes, so unlike a password it cannot be guessed back from its hash, and a plain fast
hash is the right one (GitHub and Stripe do the same); `llmasos keys add` prints the secret once.

Several processes share the file: the shell adds and revokes keys while a server reads them and
persists the tokens they used. Every change takes an flock on keys.json.lock, re-reads the file,
edits it and renames a complete new file into place, so a reader never sees half a file and no
change is lost. A running server sees a new file by its stat (a rename makes a new inode) and
re-reads it, so a key added or revoked from the shell counts from the next request on.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from fnmatch import fnmatchcase
from pathlib import Path

from llmasos.errors import LLMasOSError
from llmasos.files import exclusive, fsync_dir, stage_text

SECRET_PREFIX = "sk-llmasos-"  # tells a leaked secret apart at a glance (and to secret scanners)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


@dataclass
class ApiKey:
    """One key: its identity, what it may use, and how much. None means unlimited."""

    name: str
    hash: str  # "sha256:<hex>" of the secret
    models: list[str] = field(default_factory=lambda: ["*"])  # names or shell patterns: "*", "qwen*"
    tools: list[str] = field(default_factory=lambda: ["*"])  # the functions a request may offer, likewise
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    token_budget: int | None = None  # tokens over the key's whole life
    tokens_used: int = 0
    created: str = ""  # ISO 8601, UTC
    revoked: bool = False
    admin: bool = False  # may pull, import, remove, load and unload models and manage keys through the API

    def allows_model(self, model: str) -> bool:
        return any(fnmatchcase(model, pattern) for pattern in self.models)

    def allows_tool(self, tool: str) -> bool:
        return any(fnmatchcase(tool, pattern) for pattern in self.tools)


class KeyStore:
    """The keys of one keys file, re-read whenever the file changes.

    A server calls `authenticate` and `record_usage` on its event loop and may run `flush` (which
    fsyncs) in a worker thread: an internal lock guards the in-memory state and is never held
    across an fsync, so the loop never waits on the disk."""

    def __init__(self, path: Path | str | None = None):
        home = Path(os.environ.get("LLMASOS_HOME") or Path.home() / ".llmasos").expanduser()
        self.path = Path(path).expanduser() if path else home / "keys.json"
        self._mutex = threading.Lock()
        self._keys: dict[str, ApiKey] = {}
        self._pending: dict[str, int] = {}  # tokens recorded since the file was last written
        self._signature: tuple[int, int, int] | None = None  # stat of the file _keys was read from
        self.reload()

    def add(
        self,
        name: str,
        models: Sequence[str] = ("*",),
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        token_budget: int | None = None,
        admin: bool = False,
        tools: Sequence[str] = ("*",),
    ) -> tuple[ApiKey, str]:
        """A new key and its secret: the only time the secret exists outside the caller's hands."""
        if not _NAME_RE.fullmatch(name):
            raise LLMasOSError(
                f"invalid key name '{name}': use up to 64 letters, digits, '.', '_', '@' and '-', "
                "starting with a letter or digit"
            )
        models = [m.strip() for m in models if m.strip()]
        if not models:
            raise LLMasOSError("a key needs at least one model name or pattern; use '*' for all models")
        tools = [t.strip() for t in tools if t.strip()]  # none: no tools at all
        limits = {"rpm": requests_per_minute, "tpm": tokens_per_minute, "budget": token_budget}
        for label, value in limits.items():
            if value is not None and value < 1:
                raise LLMasOSError(f"{label} must be at least 1, or left unset for no limit")
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(
            name=name,
            hash=_hash(secret),
            models=models,
            tools=tools,
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
            token_budget=token_budget,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            admin=admin,
        )

        def insert(keys: dict[str, ApiKey]) -> None:
            if name in keys:
                state = " (revoked)" if keys[name].revoked else ""
                raise LLMasOSError(
                    f"a key named '{name}'{state} already exists in {self.path}; pick another name "
                    "(see `llmasos keys list`)"
                )
            keys[name] = key

        self._change(insert)
        return key, secret

    def list(self) -> list[ApiKey]:
        """Every key, revoked ones included, by name."""
        self.reload()
        return sorted(self._keys.values(), key=lambda k: k.name)

    def revoke(self, name: str) -> None:
        """Mark the key revoked; it stays in the file so usage and audit lines still name it."""

        def mark(keys: dict[str, ApiKey]) -> None:
            if name not in keys:
                raise LLMasOSError(f"no key named '{name}' in {self.path}; see `llmasos keys list`")
            keys[name].revoked = True

        self._change(mark)

    def authenticate(self, secret: str) -> ApiKey | None:
        """The live key whose secret this is, or None (unknown or revoked).

        Every stored hash is compared, in constant time, so the time taken does not tell an
        attacker which key came closest or whether one matched early."""
        self.reload()
        digest = _hash(secret).encode()
        match = None
        for key in self._keys.values():
            if hmac.compare_digest(key.hash.encode(), digest) and match is None:
                match = key
        return match if match is not None and not match.revoked else None

    def record_usage(self, name: str, tokens: int) -> None:
        """Count tokens against the key's budget now; they reach the file on the next `flush`."""
        with self._mutex:
            self._pending[name] = self._pending.get(name, 0) + tokens
            if name in self._keys:
                self._keys[name].tokens_used += tokens

    def flush(self) -> None:
        """Persist the usage recorded so far, so budgets survive a restart. Free when there is none."""
        if self._pending:
            self._change(lambda keys: None)

    def reload(self) -> bool:
        """Re-read the file if it changed since it was last read; costs one stat when it did not."""
        with self._mutex:
            if _stat(self.path) == self._signature:
                return False
            keys, self._signature = _read(self.path)
            self._keys = self._with_pending(keys)
            return True

    def _change(self, edit: Callable[[dict[str, ApiKey]], None]) -> None:
        """Apply `edit` to the file as it is now, together with the usage not yet written."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(self.path.with_name(self.path.name + ".lock")):
            keys, _ = _read(self.path)
            with self._mutex:
                written = dict(self._pending)
            for name, tokens in written.items():
                if name in keys:
                    keys[name].tokens_used += tokens
            edit(keys)
            staged = _stage(self.path, keys)
            with self._mutex:
                os.replace(staged, self.path)
                for name, tokens in written.items():
                    left = self._pending.pop(name) - tokens
                    if left:
                        self._pending[name] = left
                self._keys = self._with_pending(keys)
                self._signature = _stat(self.path)
            fsync_dir(self.path.parent)

    def _with_pending(self, keys: dict[str, ApiKey]) -> dict[str, ApiKey]:
        """The keys as read from the file plus the usage recorded since it was written. Lock held."""
        return {
            name: replace(k, tokens_used=k.tokens_used + self._pending.get(name, 0))
            for name, k in keys.items()
        }


def _hash(secret: str) -> str:
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _read(path: Path) -> tuple[dict[str, ApiKey], tuple[int, int, int] | None]:
    """The keys in the file and the stat of the very file read (no file: no keys yet)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            keys = [ApiKey(**entry) for entry in json.loads(f.read())["keys"]]
    except FileNotFoundError:
        return {}, None
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise LLMasOSError(
            f"the keys file {path} is unreadable or damaged ({e}); repair it, or move it aside and "
            "add the keys again with `llmasos keys add`"
        ) from e
    return {k.name: k for k in keys}, (st.st_ino, st.st_mtime_ns, st.st_size)


def _stage(path: Path, keys: dict[str, ApiKey]) -> str:
    """The new contents, complete and fsynced, in a temporary file beside `path` (0600: only the
    owner reads the hashes)."""
    text = json.dumps({"keys": [asdict(k) for _, k in sorted(keys.items())]}, indent=2) + "\n"
    return stage_text(path.parent, f".{path.name}-", text)
