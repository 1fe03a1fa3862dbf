"""The grammar a constrained tool choice decodes under: llguidance's Lark, with `%json` for each call.

A forced choice ("required" or a named function) allows only calls, in the family's markup, each
`{"name": <one of the tools>, "<arguments key>": <that tool's parameters schema>}`; so the arguments
always parse and validate. `strict` tools under "auto" allow text that opens no call, or calls (the
strict tools' arguments checked by their schema, the others' only as a JSON object). Without
`parallel_tool_calls` there is exactly one call. The kernel compiles the text
(`StructuredOutputParams(grammar=...)`) and stops the sequence once the grammar is complete.
"""

from __future__ import annotations

import json

from llmasos.tools.formats import ToolFormat
from llmasos.tools.spec import Tool, ToolRequest

# JSON as json.dumps writes it, the kernel's layout for structured output: free whitespace would let a
# weak model loop on spaces, and the arguments then read the same in every reply
LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_REGEX_SPECIALS = set("\\.+*?()|[]{}^$#&-~/")


def tool_grammar(fmt: ToolFormat, request: ToolRequest) -> str | None:
    """The Lark grammar for `request` in `fmt`'s markup; None when decoding is not constrained."""
    if not request.constrained:
        return None
    strict_only = not request.forced  # under auto, only strict tools' schemas bind
    schemas = " | ".join(_call_json(fmt, t, t.strict or not strict_only) for t in request.called)
    more = f"({_lit(fmt.separator)} call)*" if request.parallel else ""
    close, end = _lit(fmt.call_close), _lit(fmt.end)
    rules = [
        f"call_json: {schemas}",
        f"call: {_lit(fmt.call_open)} call_json {close}",
        f"calls: {_lit(fmt.begin)} call {more} {end}",
    ]
    if request.forced:
        return "\n".join(["start: calls", *rules])
    opening = [*fmt.triggers] if not fmt.leading_text else [fmt.triggers[0]]
    before = ".*" if fmt.leading_text else "\\s*"  # where a trigger turns text into calls
    text = "TEXT: /(?s:.*)/ & ~/" + "|".join(f"(?s:{before}{_regex(t)}.*)" for t in opening) + "/"
    if not fmt.leading_text:
        return "\n".join(["start: TEXT | calls", text, *rules])
    # text, then the first call's opening as part of one lexeme: llguidance lexes greedily, so text and
    # an opening that follows it as a separate literal would never part
    head = _regex(fmt.begin + fmt.call_open)
    trigger = _regex(fmt.triggers[0])
    return "\n".join(
        [
            f"start: TEXT | HEAD call_json {close} {more} {end}",
            text,
            f"HEAD: /(?s:.*{head})/ & ~/(?s:.*{trigger}.*{trigger}.*)/",
            *rules,
        ]
    )


def _call_json(fmt: ToolFormat, tool: Tool, checked: bool) -> str:
    arguments = tool.parameters if checked else {"type": "object"}
    schema = {
        "x-guidance": LAYOUT,
        "type": "object",
        "properties": {"name": {"const": tool.name}, fmt.arguments_key: arguments},
        "required": ["name", fmt.arguments_key],
        "additionalProperties": False,
    }
    return "%json " + json.dumps(schema)


def _lit(text: str) -> str:
    """A Lark string literal, or nothing for empty markup."""
    return json.dumps(text) if text else ""


def _regex(text: str) -> str:
    """`text` matched literally inside a Lark /regex/."""
    return "".join("\\n" if c == "\n" else "\\" + c if c in _REGEX_SPECIALS else c for c in text)
