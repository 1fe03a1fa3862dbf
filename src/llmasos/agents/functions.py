"""Tools as plain Python functions: the JSON schema from the type hints, arguments checked on call.

pydantic builds a model from the function's signature (`create_model`), so the schema the model is
shown and the validation of what it sends are one thing: a call whose arguments do not fit is an
error the agent sees as the tool's result, never a crash of the loop. The schema is OpenAI's function
tool dict, which `llmasos.tools.ToolRequest` takes like any request's tools: the chat template renders
it and the grammar of a forced or strict choice is built from it.
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
class FunctionTool:
    fn: Callable[..., Any]
    name: str
    description: str
    arguments: type[pydantic.BaseModel]  # the signature as a pydantic model (no other keys allowed)

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
        config = pydantic.ConfigDict(extra="forbid")  # the schema says additionalProperties: false
        model = pydantic.create_model(f"{fn.__name__}_arguments", __config__=config, **fields)
        return cls(fn, fn.__name__, doc.split("\n\n")[0].strip(), model)

    def schema(self, strict: bool = False) -> dict:
        """The OpenAI function tool, `{"type": "function", "function": {name, description, parameters,
        strict}}`; `strict` tools are decoded under their schema's grammar even when the choice is auto."""
        parameters = self.arguments.model_json_schema()
        parameters.pop("title", None)
        function = {"name": self.name, "description": self.description, "parameters": parameters}
        return {"type": "function", "function": {**function, "strict": strict}}

    def call(self, arguments: str) -> str:
        """Validate the arguments (JSON text, as a tool call carries them), run the function, and give
        its result as text (JSON unless a str). Raises pydantic.ValidationError for arguments that are
        not JSON or do not fit the signature."""
        checked = self.arguments.model_validate_json(arguments or "{}")
        result = self.fn(**{name: getattr(checked, name) for name in type(checked).model_fields})
        return result if isinstance(result, str) else json.dumps(result, default=str)
