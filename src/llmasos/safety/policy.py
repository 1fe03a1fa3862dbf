"""Policies: what to do with each category of finding, chosen per API key and per model.

A `PolicySet` picks one whole policy for a request: the key's if it has one, else the model's
(an exact name first, then the first matching shell pattern like "qwen*", in file order), else
the default. Whole policies rather than category-by-category merges, so the policy that applies
to a request is one block of the file that can be read on its own.

The file (YAML, or JSON by its .json suffix):

    default: {default_action: redact}
    models:
      "qwen*": {actions: {ip_address: allow}}
    keys:
      support-bot: {actions: {email: allow, private_key: block}, redaction: reversible}
      batch-job: {default_action: block, min_score: 0.8}
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

import yaml

from llmasos.errors import LLMasOSError
from llmasos.safety.findings import ACTIONS, CATEGORIES, Action
from llmasos.safety.redaction import REDACTION_STYLES, RedactionStyle


@dataclass(frozen=True)
class Policy:
    """Category -> action; `default_action` for the categories not named. Findings scored below
    `min_score` are dropped before the policy applies."""

    actions: Mapping[str, Action] = field(default_factory=dict)
    default_action: Action = "redact"
    redaction: RedactionStyle = "placeholder"
    min_score: float = 0.5

    def __post_init__(self):
        for category, action in self.actions.items():
            if category not in CATEGORIES:
                raise LLMasOSError(
                    f"unknown category {category!r}; known categories: {', '.join(CATEGORIES)}"
                )
            _check_action(action, f"the action for {category!r}")
        _check_action(self.default_action, "default_action")
        if self.redaction not in REDACTION_STYLES:
            raise LLMasOSError(
                f"unknown redaction style {self.redaction!r}; use one of {', '.join(REDACTION_STYLES)}"
            )
        if not isinstance(self.min_score, int | float) or not 0.0 <= self.min_score <= 1.0:
            raise LLMasOSError(f"min_score must be a number from 0 to 1, got {self.min_score!r}")

    def action_for(self, category: str) -> Action:
        return self.actions.get(category, self.default_action)

    @classmethod
    def from_dict(cls, data: object) -> Policy:
        _check_fields(cls, data, "a policy", "policy fields")
        if not isinstance(data.get("actions", {}), Mapping):
            raise LLMasOSError(f"actions must map categories to actions, got {data['actions']!r}")
        return cls(**{**data, "actions": dict(data.get("actions", {}))})


@dataclass(frozen=True)
class PolicySet:
    """The policies of a server: by key (name), else by model, else the default."""

    default: Policy = field(default_factory=Policy)
    models: Mapping[str, Policy] = field(default_factory=dict)
    keys: Mapping[str, Policy] = field(default_factory=dict)

    def policy_for(self, model: str | None = None, key: str | None = None) -> Policy:
        if key is not None and key in self.keys:
            return self.keys[key]
        if model is not None:
            if model in self.models:
                return self.models[model]
            for pattern, policy in self.models.items():
                if fnmatchcase(model, pattern):
                    return policy
        return self.default

    @classmethod
    def from_dict(cls, data: object) -> PolicySet:
        _check_fields(cls, data, "a policy set", "top-level fields")
        sections = {}
        for section in ("models", "keys"):
            entries = data.get(section) or {}
            if not isinstance(entries, Mapping):
                raise LLMasOSError(f"{section} must map names to policies, got {entries!r}")
            sections[section] = {
                str(name): _in(f"{section}.{name}", Policy.from_dict, p) for name, p in entries.items()
            }
        default = _in("default", Policy.from_dict, data.get("default") or {})
        return cls(default=default, **sections)

    @classmethod
    def load(cls, path: Path | str) -> PolicySet:
        """A policy file: YAML, or JSON when it ends in .json."""
        path = Path(path).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise LLMasOSError(f"cannot read the policy file {path} ({e}); give a readable path") from e
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise LLMasOSError(f"the policy file {path} does not parse: {e}") from e
        return _in(f"policy file {path}", cls.from_dict, data or {})


def _check_action(action: object, what: str) -> None:
    if action not in ACTIONS:
        raise LLMasOSError(f"{what} is {action!r}; use one of {', '.join(ACTIONS)}")


def _fields(cls) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _check_fields(cls, data: object, what: str, kind: str) -> None:
    """data is a mapping whose keys are fields of the dataclass cls."""
    if not isinstance(data, Mapping):
        raise LLMasOSError(f"{what} is a mapping of {_fields(cls)}, got {data!r}")
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise LLMasOSError(f"unknown {kind} {unknown}; {what} has {_fields(cls)}")


def _in(where: str, parse, data):
    """parse(data), with `where` in front of the message of any error, so it points at the entry."""
    try:
        return parse(data)
    except LLMasOSError as e:
        raise LLMasOSError(f"{where}: {e}") from None
