"""The grammar a constrained tool choice decodes under: llguidance's Lark, with `%json` for each call.

A forced choice ("required" or a named function) allows only calls, in the family's markup, each
`{"name": <one of the tools>, "<arguments key>": <that tool's parameters schema>}`; so the arguments
always parse and validate. `strict` tools under "auto" allow text that opens no call, or calls (the
strict tools' arguments checked by their schema, the others' only as a JSON object). Without
`parallel_tool_calls` there is exactly one call. The kernel compiles the text
(`StructuredOutputParams(grammar=...)`) and stops the sequence once the grammar is complete.

A reply format (response_format, or the Responses API's text.format: a JSON schema or any JSON object)
shapes text only: a forced reply is calls, so it does not apply; under "auto" with strict tools the
reply is either an answer in that format or calls, as an agent with an output type and strict tools
asks (the openai-agents SDK's defaults).
"""

from __future__ import annotations

import json

from llmasos.errors import InvalidRequestError
from llmasos.sampling_params import StructuredOutputParams
from llmasos.tools.formats import ToolFormat
from llmasos.tools.spec import Tool, ToolRequest

# JSON as json.dumps writes it, the kernel's layout for structured output: free whitespace would let a
# weak model loop on spaces, and the arguments then read the same in every reply
LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_REGEX_SPECIALS = set("\\.+*?()|[]{}^$#&-~/")


def tool_grammar(
    fmt: ToolFormat, request: ToolRequest, answer: StructuredOutputParams | None = None
) -> str | None:
    """The Lark grammar for `request` in `fmt`'s markup, text replies in the `answer` format if one is
    given; None when decoding is not constrained by the tools."""
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
    if answer is not None:
        return "\n".join(["start: answer | calls", f"answer: {_answer_json(answer)}", *rules])
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


def _answer_json(answer: StructuredOutputParams) -> str:
    """The reply format as a Lark `%json` rule, laid out as the kernel lays out JSON output."""
    if answer.kind not in ("json", "json_object"):
        raise InvalidRequestError(
            f"a {answer.kind} output format and strict tools both constrain the reply: use a JSON "
            "schema or json_object format with strict tools, or make the tools not strict"
        )
    schema = {"type": "object"} if answer.json_object else answer.json
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as error:
            raise InvalidRequestError(f"the output format's schema is not JSON ({error}): fix it") from None
    return "%json " + json.dumps({"x-guidance": LAYOUT, **schema})


def _lit(text: str) -> str:
    """A Lark string literal, or nothing for empty markup."""
    return json.dumps(text) if text else ""


def _regex(text: str) -> str:
    """`text` matched literally inside a Lark /regex/."""
    return "".join("\\n" if c == "\n" else "\\" + c if c in _REGEX_SPECIALS else c for c in text)
