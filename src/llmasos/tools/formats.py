"""How each model family writes its tool calls, as data: one `ToolFormat` per family.

A format says which text opens the calls (`triggers`), whether the model may write text before them,
what the arguments' key is, and the exact markup around and between calls, which the grammar emits
when decoding is constrained and the template renders when a call is in the history:

- hermes (Hermes 2 Pro, Qwen2.5, Qwen3): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
  one block per call, after optional text;
- llama3_json (Llama 3.1-3.3): the reply is `{"name": ..., "parameters": {...}}`, optionally after
  `<|python_tag|>`, several joined by "; ";
- mistral (Mistral v0.3 and later): `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`.

The family is found in the chat template's text (the markup it renders for a call in the history), or
named with `--tool-call-parser`. A template that shows no known markup gets the hermes markup under a
grammar (`native` False): the model has never seen the format, so every call it makes is constrained.
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass

from llmasos.errors import InvalidRequestError


@dataclass(frozen=True)
class ToolFormat:
    name: str
    triggers: tuple[str, ...]  # text that starts the calls; the rest of the reply is the calls
    leading_text: bool  # whether text may come before the calls (else they open the reply)
    arguments_key: str = "arguments"
    begin: str = ""  # before the first call
    call_open: str = ""  # before each call's JSON object
    call_close: str = ""  # after each call's JSON object
    separator: str = ""  # between calls
    end: str = ""  # after the last call
    keep_special_tokens: bool = False  # the trigger is a special token, which decoding must not drop
    short_ids: bool = False  # Mistral's templates take only 9-character call ids
    native: bool = True  # False: the grammar fallback for a template without a known format

    def call_id(self) -> str:
        """A new id for one call, in the form the family's template accepts back in the history."""
        if self.short_ids:
            return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
        return "call_" + secrets.token_hex(12)


FORMATS = {
    "hermes": ToolFormat(
        "hermes",
        ("<tool_call>",),
        True,
        call_open="<tool_call>\n",
        call_close="\n</tool_call>",
        separator="\n",
    ),
    "llama3_json": ToolFormat(
        "llama3_json", ("<|python_tag|>", "{"), False, arguments_key="parameters", separator="; "
    ),
    "mistral": ToolFormat(
        "mistral",
        ("[TOOL_CALLS]",),
        False,
        begin="[TOOL_CALLS] [",
        separator=", ",
        end="]",
        keep_special_tokens=True,
        short_ids=True,
    ),
}
FALLBACK = ToolFormat(**{**vars(FORMATS["hermes"]), "name": "grammar", "native": False})


def format_named(name: str) -> ToolFormat:
    """The format `--tool-call-parser NAME` picks."""
    if name not in FORMATS:
        raise InvalidRequestError(f"unknown tool call parser {name!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


def detect_format(chat_template: str | None) -> ToolFormat:
    """The family whose call markup the chat template renders; FALLBACK when it shows none."""
    template = chat_template or ""
    if "<tool_call>" in template:
        return FORMATS["hermes"]
    if "[TOOL_CALLS]" in template:
        return FORMATS["mistral"]
    if "<|python_tag|>" in template or ("<|start_header_id|>" in template and '"parameters"' in template):
        return FORMATS["llama3_json"]
    return FALLBACK
