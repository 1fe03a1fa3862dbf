"""Tools as plain Python functions: the JSON schema from the type hints, arguments checked on call.

pydantic builds a model from the function's signature (`create_model`), so the schema the model is
shown and the validation of what it sends are one thing: a call whose arguments do not fit is an
error the agent sees as the tool's result, never a crash of the loop.
"""

from __future__ import annotations

import inspect
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pydantic

from llmasos.errors import LLMasOSError


@dataclass(frozen=True)
class ToolCall:
    """One call the model asked for: the tool's name and its arguments (a JSON object)."""

    name: str
    arguments: dict[str, Any]
    id: str = ""


@dataclass(frozen=True)
class FunctionTool:
    fn: Callable[..., Any]
    name: str
    description: str
    arguments: type[pydantic.BaseModel]  # the signature as a pydantic model

    @classmethod
    def from_function(cls, fn: Callable[..., Any]) -> FunctionTool:
        """The tool of `fn`: its name, its docstring's first paragraph, its parameters' type hints
        (defaults make them optional). A parameter without a type hint is refused: the model would
        be told nothing about it."""
        hints = typing.get_type_hints(fn)
        fields = {}
        for name, param in inspect.signature(fn).parameters.items():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise LLMasOSError(f"tool {fn.__name__}: *args and **kwargs cannot be described to a model")
            if name not in hints:
                raise LLMasOSError(f"tool {fn.__name__}: give the parameter {name!r} a type hint")
            default = ... if param.default is param.empty else param.default
            fields[name] = (hints[name], default)
        doc = inspect.getdoc(fn) or ""
        model = pydantic.create_model(f"{fn.__name__}_arguments", **fields)
        return cls(fn, fn.__name__, doc.split("\n\n")[0].strip(), model)

    def schema(self) -> dict:
        """The OpenAI function tool: {"type": "function", "function": {name, description, parameters}}."""
        parameters = self.arguments.model_json_schema()
        parameters.pop("title", None)
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": parameters},
        }

    def call(self, arguments: dict[str, Any]) -> str:
        """Validate the arguments, run the function, and give its result as text (JSON unless a str).
        Raises pydantic.ValidationError for arguments that do not fit the signature."""
        checked = self.arguments.model_validate(arguments)
        result = self.fn(**{name: getattr(checked, name) for name in type(checked).model_fields})
        return result if isinstance(result, str) else json.dumps(result, default=str)
