"""Redaction: what a redacted span becomes, and the vault that can turn it back for its owner.

Four styles, because their users want different things: `mask` ("****") hides even the kind of
data; `placeholder` ("<EMAIL_1>") keeps the text readable and tells two addresses apart; `hash`
("<EMAIL_9f86d081884c>", a salted sha256 prefix) lets logs join on a value without holding it;
`reversible` ("<EMAIL_3fa85f6457>") is a placeholder that a `Vault` maps back to the original,
for the owner (API key) whose request it came from and nobody else.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
from collections import OrderedDict
from typing import Literal

from llmasos.errors import LLMasOSError

RedactionStyle = Literal["mask", "placeholder", "hash", "reversible"]
REDACTION_STYLES: tuple[RedactionStyle, ...] = ("mask", "placeholder", "hash", "reversible")
MASK = "****"
_VAULT_PLACEHOLDER = re.compile(r"<[A-Z_]+_[0-9a-f]{10}>")
# One salt per process: hashes join within a server's life, and cannot be joined across restarts.
_PROCESS_SALT = secrets.token_bytes(16)


class Vault:
    """Reversible placeholders, per owner. The placeholder is random, not derived from the value,
    so it says nothing to anyone without the vault; the same value gets the same placeholder for
    one owner. It lives in memory: at most `max_entries` values per owner, the least recently used
    forgotten first (a forgotten placeholder stays a placeholder)."""

    def __init__(self, max_entries: int = 10_000):
        if max_entries < 1:
            raise LLMasOSError(f"a vault needs max_entries >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: dict[
            str, OrderedDict[str, tuple[str, str]]
        ] = {}  # owner -> token -> (category, value)
        self._tokens: dict[str, dict[tuple[str, str], str]] = {}  # owner -> (category, value) -> token

    def placeholder(self, owner: str, category: str, original: str) -> str:
        with self._lock:
            entries = self._entries.setdefault(owner, OrderedDict())
            tokens = self._tokens.setdefault(owner, {})
            if (token := tokens.get((category, original))) is not None:
                entries.move_to_end(token)  # in use again: forget it last
                return token
            while (token := f"<{category.upper()}_{secrets.token_hex(5)}>") in entries:
                pass
            entries[token] = (category, original)
            tokens[(category, original)] = token
            if len(entries) > self.max_entries:
                _, forgotten = entries.popitem(last=False)
                del tokens[forgotten]
            return token

    def restore(self, text: str, owner: str) -> str:
        """`text` with the owner's placeholders turned back into what they hid; anyone else's
        placeholders, and all of them for an unknown owner, stay as they are."""
        with self._lock:
            entries = self._entries.get(owner, {})
            return _VAULT_PLACEHOLDER.sub(lambda m: entries.get(m.group(), ("", m.group()))[1], text)


class Redactor:
    """Replacements for one text (or one stream): placeholders are numbered in the order their
    values first appear, so the same value reads the same everywhere in it."""

    def __init__(
        self,
        style: RedactionStyle,
        *,
        vault: Vault | None = None,
        owner: str | None = None,
        salt: bytes | None = None,
    ):
        if style not in REDACTION_STYLES:
            raise LLMasOSError(f"unknown redaction style {style!r}; use one of {', '.join(REDACTION_STYLES)}")
        if style == "reversible" and (vault is None or owner is None):
            raise LLMasOSError(
                "reversible redaction needs a Vault and an owner (the API key id) to restore for"
            )
        self.style, self.vault, self.owner = style, vault, owner
        self.salt = _PROCESS_SALT if salt is None else salt
        self._numbers: dict[tuple[str, str], int] = {}
        self._counts: dict[str, int] = {}

    def replacement(self, category: str, original: str) -> str:
        label = category.upper()
        if self.style == "mask":
            return MASK
        if self.style == "hash":
            return f"<{label}_{hashlib.sha256(self.salt + original.encode()).hexdigest()[:12]}>"
        if self.style == "reversible":
            return self.vault.placeholder(self.owner, category, original)
        if (category, original) not in self._numbers:
            self._counts[category] = self._counts.get(category, 0) + 1
            self._numbers[(category, original)] = self._counts[category]
        return f"<{label}_{self._numbers[(category, original)]}>"
