"""Prompt templates (`str.format` placeholders) and the YAML files users keep them in.

Task prompts, eval templates and bias probes are all data a user may write; this is the one place
that reads them and says exactly what is wrong with one.
"""

from __future__ import annotations

import string
from pathlib import Path

import yaml

from llmasos.errors import InvalidRequestError


def placeholders(template: object, where: str) -> set[str]:
    """The names of a template's placeholders; `where` names the template in errors."""
    if not isinstance(template, str):
        raise InvalidRequestError(f"{where} {template!r} is not a text; quote it")
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise InvalidRequestError(
            f"{where} {template!r} is malformed ({exc}); write literal braces as {{{{ and }}}}"
        ) from exc


def read_yaml(path: Path, what: str) -> object:
    """A user's YAML file; `what` says what the file should hold, for the error when it is missing."""
    if not path.is_file():
        raise InvalidRequestError(f"{path} is not a file; give {what}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise InvalidRequestError(f"{path} is not valid YAML: {exc}") from exc
