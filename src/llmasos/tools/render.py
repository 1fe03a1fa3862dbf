"""A conversation with tools as the model's prompt, and the plan its reply is decoded and read by.

OpenAI's history carries a call's arguments as JSON text; chat templates write them with `tojson`,
so they get the parsed object (as vLLM hands them over), and the tools go to the template's `tools`
variable, rendered exactly as transformers' `apply_chat_template(messages, tools=...)` renders them.
A template that has no `tools` variable gets them in a system message instead, and the history's calls
and results as text in the fallback's markup, which the grammar then holds the model to.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from llmasos.errors import InvalidRequestError
from llmasos.outputs import CompletionOutput, ToolCall
from llmasos.sampling_params import SamplingParams, StructuredOutputParams
from llmasos.tokenizer import ChatPrompt, Tokenizer
from llmasos.tools.formats import ToolFormat, detect_format, format_named
from llmasos.tools.grammar import tool_grammar
from llmasos.tools.parser import ToolCallParser, parse_tool_calls
from llmasos.tools.spec import ToolRequest

FALLBACK_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n"
    "<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, "arguments": '
    "<args-json-object>}}\n</tool_call>"
)


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request with tools decodes (its grammar) and how its reply reads (its parser)."""

    format: ToolFormat
    request: ToolRequest

    def sampling_params(self, params: SamplingParams | None) -> SamplingParams:
        """`params` (never changed) with the tools' grammar (joined with the reply format of params'
        structured output, see tools/grammar.py) and the special tokens the format needs."""
        params = params or SamplingParams()
        grammar = tool_grammar(self.format, self.request, params.structured_output)
        changes: dict = {}
        if grammar is not None:  # it holds the reply format too, if one was asked for
            changes["structured_output"] = StructuredOutputParams(grammar=grammar)
        if self.format.keep_special_tokens:
            changes["skip_special_tokens"] = False
        return dataclasses.replace(params, **changes) if changes else params

    def parser(self) -> ToolCallParser:
        """A parser for one streamed reply."""
        return ToolCallParser(self.format, self._max_calls)

    def read(self, completion: CompletionOutput) -> CompletionOutput:
        """The completion with its calls parsed out: `text` is the content, `tool_calls` the calls."""
        content, calls = parse_tool_calls(self.format, completion.text, self._max_calls)
        if not calls:
            return completion
        return dataclasses.replace(
            completion, text=content or "", tool_calls=calls, finish_reason=finish_reason(completion, calls)
        )

    @property
    def _max_calls(self) -> int | None:
        return None if self.request.parallel else 1


def finish_reason(completion: CompletionOutput, calls: list[ToolCall]) -> str | None:
    """ "tool_calls" when a reply that made calls ended on its own, as OpenAI reports it."""
    return "tool_calls" if calls and completion.finish_reason == "stop" else completion.finish_reason


def tool_format(tokenizer: Tokenizer, parser: str | None = None) -> ToolFormat:
    """The model's format: the one `parser` names (`--tool-call-parser`), else its template's."""
    return format_named(parser) if parser else detect_format(tokenizer.chat_template)


def render_chat(
    tokenizer: Tokenizer, messages: list[dict], request: ToolRequest | None, fmt: ToolFormat
) -> tuple[ChatPrompt, ToolPlan | None]:
    """The prompt of a conversation that may offer tools and hold calls and their results, and the
    plan for its reply (None when no tool may be called)."""
    messages = [_template_message(m) for m in messages]
    tools = request.as_openai() if request else None
    if not _takes_tools(tokenizer.chat_template):
        messages = _as_text(messages, tools, fmt)
        tools = None
    prompt = tokenizer.apply_chat_template(messages, tools=tools)
    plan = ToolPlan(fmt, request) if request is not None and request.choice != "none" else None
    return prompt, plan


def _takes_tools(template: str | None) -> bool:
    return "tools" in (template or "")


def _template_message(message: dict) -> dict:
    """An OpenAI message as chat templates read it: a call's arguments parsed from their JSON text."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    parsed = []
    for i, call in enumerate(calls):
        function = dict(call.get("function") or {})
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                function["arguments"] = json.loads(arguments) if arguments.strip() else {}
            except ValueError as error:
                raise InvalidRequestError(
                    f"the arguments of tool_calls[{i}] ({function.get('name')!r}) in the history are not "
                    f"JSON ({error}); send them as the model returned them"
                ) from None
        parsed.append({**call, "function": function})
    return {**message, "tool_calls": parsed}


def _as_text(messages: list[dict], tools: list[dict] | None, fmt: ToolFormat) -> list[dict]:
    """The conversation for a template without tools: tools in the system message, calls and results
    as text in the format's markup."""
    out = []
    for message in messages:
        if message.get("tool_calls"):
            calls = fmt.separator.join(
                fmt.call_open
                + json.dumps(
                    {"name": c["function"].get("name"), fmt.arguments_key: c["function"].get("arguments", {})}
                )
                + fmt.call_close
                for c in message["tool_calls"]
            )
            text = "\n".join(filter(None, [message.get("content") or "", fmt.begin + calls + fmt.end]))
            out.append({"role": "assistant", "content": text})
        elif message.get("role") == "tool":
            out.append(
                {
                    "role": "user",
                    "content": f"<tool_response>\n{message.get('content', '')}\n</tool_response>",
                }
            )
        else:
            out.append(message)
    if tools:
        listing = FALLBACK_PROMPT.format(tools="\n".join(json.dumps(t) for t in tools))
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{listing}"}
        else:
            out.insert(0, {"role": "system", "content": listing})
    return out
