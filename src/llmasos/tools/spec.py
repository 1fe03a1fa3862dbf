"""What a request offers and asks for: its tools, `tool_choice` and `parallel_tool_calls`, checked once.

The shapes are OpenAI's (`{"type": "function", "function": {"name", "description", "parameters",
"strict"}}`), so the same dicts serve the server, `LLM.chat` and the chat template's `tools` variable.
A wrong shape is an InvalidRequestError that names the field, as OpenAI's own 400s do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from llmasos.errors import InvalidRequestError

CHOICES = ("auto", "none", "required")
_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")  # OpenAI's rule for function names


@dataclass(frozen=True)
class Tool:
    """One function the model may call; `parameters` is its arguments' JSON Schema."""

    name: str
    description: str | None = None
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool = False
    source: dict | None = field(default=None, compare=False)  # the dict the caller gave, if any

    def as_openai(self) -> dict:
        """The tool as the chat template's `tools` variable takes it: the caller's own dict, so the
        template renders what transformers would render from it."""
        if self.source is not None:
            return self.source
        function = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolRequest:
    """The tools of one request and how they may be used.

    `choice` is "auto", "none", "required", or "function": then `function` names the one that must be
    called.
    """

    tools: tuple[Tool, ...]
    choice: str = "auto"
    function: str | None = None
    parallel: bool = True

    @classmethod
    def from_openai(
        cls,
        tools: list | None,
        tool_choice: str | dict | None = None,
        parallel_tool_calls: bool | None = None,
    ) -> ToolRequest | None:
        """From the request's fields as OpenAI names them; None when it offers no tools."""
        if not tools:
            if tool_choice not in (None, "none", "auto"):
                raise InvalidRequestError(f"tool_choice={tool_choice!r} needs tools: give the tools list")
            return None
        if not isinstance(tools, list):
            raise InvalidRequestError("tools must be a list of {'type': 'function', 'function': {...}}")
        parsed = tuple(_tool(entry, i) for i, entry in enumerate(tools))
        names = [t.name for t in parsed]
        if len(set(names)) != len(names):
            raise InvalidRequestError(f"tools has functions with the same name: {names}; name each once")
        function = _named(tool_choice, names)
        choice = "function" if function else (tool_choice or "auto")
        parallel = True if parallel_tool_calls is None else bool(parallel_tool_calls)
        return cls(parsed, choice, function, parallel)

    @property
    def called(self) -> tuple[Tool, ...]:
        """The tools a call may name: the named one, or all."""
        if self.function is None:
            return self.tools
        return tuple(t for t in self.tools if t.name == self.function)

    @property
    def forced(self) -> bool:
        """Whether the model must call a tool ("required" or a named function)."""
        return self.choice not in ("auto", "none")

    @property
    def constrained(self) -> bool:
        """Whether decoding runs under the tools' grammar: a forced call, or `strict` tools under auto."""
        return self.forced or (self.choice == "auto" and any(t.strict for t in self.tools))

    def as_openai(self) -> list[dict]:
        return [t.as_openai() for t in self.tools]


def _tool(entry: object, i: int) -> Tool:
    where = f"tools[{i}]"
    if not isinstance(entry, dict) or entry.get("type", "function") != "function":
        raise InvalidRequestError(
            f"{where} must be {{'type': 'function', 'function': {{'name': ..., 'parameters': {{...}}}}}}"
        )
    function = entry.get("function")
    if not isinstance(function, dict):
        raise InvalidRequestError(f"{where}.function is missing: give {{'name': ..., 'parameters': {{...}}}}")
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidRequestError(
            f"{where}.function.name={name!r} is not a function name: use 1 to 64 letters, digits, _ . : or -"
        )
    parameters = function.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise InvalidRequestError(f"{where}.function.parameters must be a JSON Schema object")
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise InvalidRequestError(f"{where}.function.description must be a string")
    return Tool(name, description, parameters, bool(function.get("strict")), source=entry)


def _named(tool_choice: str | dict | None, names: list[str]) -> str | None:
    """The function a named tool_choice names; None for "auto", "none" and "required"."""
    if tool_choice is None:
        return None
    if isinstance(tool_choice, str):
        if tool_choice not in CHOICES:
            raise InvalidRequestError(
                f"tool_choice={tool_choice!r} is not one of {', '.join(CHOICES)} "
                "or {'type': 'function', 'function': {'name': ...}}"
            )
        return None
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise InvalidRequestError(
            "tool_choice must be 'auto', 'none', 'required' "
            "or {'type': 'function', 'function': {'name': ...}}"
        )
    if name not in names:
        raise InvalidRequestError(f"tool_choice names {name!r}, which is not in tools ({', '.join(names)})")
    return name
