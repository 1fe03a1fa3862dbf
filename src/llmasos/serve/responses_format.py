"""The Responses API's wire format: the request body, its input items as the chat messages a model's
template renders, and the response object with its output items.

A request runs through the same path as a chat completion (`Gateway.start`), so the body is a
`_SamplingBody` (sampling values are checked once, by SamplingParams) whose conversation is built
from items: messages, and the function calls and their outputs of earlier turns. Unknown fields are
ignored, as OpenAI does; an item or a part that a text model cannot take (images, files, built-in
tools) is a 422 naming the field and the types it may have.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BeforeValidator, Discriminator, Field, Tag

from llmasos.errors import InvalidRequestError
from llmasos.outputs import CompletionOutput, ToolCall
from llmasos.sampling_params import StructuredOutputParams
from llmasos.serve.protocol import _Body, _SamplingBody
from llmasos.tools import ToolPlan, ToolRequest


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class TextPart(_Body):
    # output_text: an assistant's earlier answer, sent back as the client received it
    type: Literal["input_text", "output_text"]
    text: str


def _as_parts(value):
    """Text given as a plain string, as the one part it stands for (so a bad part's error names the part,
    not a union of string-or-list)."""
    return [{"type": "input_text", "text": value}] if isinstance(value, str) else value


TextParts = Annotated[list[TextPart], BeforeValidator(_as_parts)]


def _text(parts: list[TextPart]) -> str:
    return "".join(part.text for part in parts)


class MessageItem(_Body):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: TextParts
    id: str | None = None

    def item(self) -> dict:
        part = "output_text" if self.role == "assistant" else "input_text"
        content = [{"type": part, "text": _text(self.content)}]
        if part == "output_text":
            content[0]["annotations"] = []
        return {"type": "message", "id": self.id or new_id("msg"), "role": self.role, "content": content,
                "status": "completed"}  # fmt: skip


class FunctionCallItem(_Body):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None

    def item(self) -> dict:
        return {"type": "function_call", "id": self.id or new_id("fc"), "call_id": self.call_id,
                "name": self.name, "arguments": self.arguments, "status": "completed"}  # fmt: skip


class FunctionCallOutputItem(_Body):
    type: Literal["function_call_output"]
    call_id: str
    output: TextParts
    id: str | None = None

    def item(self) -> dict:
        return {"type": "function_call_output", "id": self.id or new_id("fco"), "call_id": self.call_id,
                "output": _text(self.output), "status": "completed"}  # fmt: skip


def _item_type(value) -> str | None:
    """A message item may leave out its type (OpenAI's EasyInputMessage)."""
    if isinstance(value, dict):
        return value.get("type", "message")
    return getattr(value, "type", None)


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_type),
]


def _as_messages(value):
    """An input given as a string, as the user message it stands for."""
    return [{"role": "user", "content": value}] if isinstance(value, str) else value


class TextFormat(_Body):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    def echo(self) -> dict:
        """The format as a response reports it back."""
        return self.model_dump(by_alias=True, exclude_none=True)


class TextConfig(_Body):
    format: TextFormat = Field(default_factory=TextFormat)


class FunctionTool(_Body):
    """A function tool in the Responses API's flat shape (chat completions nest it under `function`)."""

    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None

    def as_chat(self) -> dict:
        function = self.model_dump(exclude={"type"}, exclude_none=True)
        return {"type": "function", "function": function}


class NamedFunction(_Body):
    type: Literal["function"]
    name: str


class ResponsesRequest(_SamplingBody):
    """`POST /v1/responses`: the fields of OpenAI's that a local text model can honour."""

    input: Annotated[list[InputItem], BeforeValidator(_as_messages)]
    instructions: str | None = None
    max_output_tokens: int | None = None
    text: TextConfig = Field(default_factory=TextConfig)
    store: bool = True
    previous_response_id: str | None = None
    n: Literal[1] = 1  # one output per response
    tools: list[FunctionTool] = Field(default_factory=list)
    tool_choice: Literal["auto", "none", "required"] | NamedFunction = "auto"
    parallel_tool_calls: bool = True

    def _max_tokens(self) -> int | None:
        return self.max_output_tokens

    def _structured_output(self) -> StructuredOutputParams | None:
        fmt = self.text.format
        if fmt.type == "json_object":
            return StructuredOutputParams(json_object=True)
        if fmt.type == "json_schema":
            if not fmt.schema_:
                raise InvalidRequestError(
                    "text.format of type 'json_schema' needs a schema: "
                    '{"type": "json_schema", "name": "...", "schema": {...}}'
                )
            return StructuredOutputParams(json=fmt.schema_)
        return None

    def tool_request(self) -> ToolRequest | None:
        """The tools offered and how they may be used, as `llmasos.tools` reads them; None: no tools."""
        choice = self.tool_choice
        if isinstance(choice, NamedFunction):
            choice = {"type": "function", "function": {"name": choice.name}}
        return ToolRequest.from_openai([t.as_chat() for t in self.tools], choice, self.parallel_tool_calls)

    def input_items(self) -> list[dict]:
        """This request's input as Responses items (with ids), as they are stored and listed."""
        if not self.input:
            raise InvalidRequestError("input is empty: give some text or at least one item")
        return [item.item() for item in self.input]


def chat_messages(items: list[dict], instructions: str | None) -> list[dict]:
    """The conversation of `items` as chat messages for the model's template; `instructions` lead as a
    system message (they are not carried over from a previous response, as OpenAI does). A run of
    function calls is one assistant message with several tool_calls (joined to the assistant's text
    just before it), and each call's output a tool message."""
    messages = [{"role": "system", "content": instructions}] if instructions else []
    for item in items:
        if item["type"] == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            messages.append({"role": role, "content": "".join(p["text"] for p in item["content"])})
        elif item["type"] == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}  # fmt: skip
            last = messages[-1] if messages else {}
            if last.get("role") == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    return messages


INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}  # finish reason: why


def message_item(message_id: str, text: str, status: str) -> dict:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"type": "message", "id": message_id, "role": "assistant", "status": status, "content": [part]}


def function_call_item(call: ToolCall, status: str = "completed") -> dict:
    return {"type": "function_call", "id": "fc_" + call.id.removeprefix("call_"), "call_id": call.id,
            "name": call.name, "arguments": call.arguments, "status": status}  # fmt: skip


def output_items(completion: CompletionOutput, plan: ToolPlan | None) -> list[dict]:
    """The output items of a finished completion: its text as an assistant message (unless it is only
    calls), then each function call it made; the last item is incomplete if the reply was cut short."""
    if plan is not None:
        completion = plan.read(completion)
    calls = completion.tool_calls or []
    items = (
        [message_item(new_id("msg"), completion.text, "completed")] if completion.text or not calls else []
    )
    items += [function_call_item(call) for call in calls]
    if completion.finish_reason in INCOMPLETE:
        items[-1]["status"] = "incomplete"
    return items


def usage(job_usage: dict) -> dict:
    """A chat completion's usage, in the Responses API's names."""
    return {
        "input_tokens": job_usage["prompt_tokens"],
        "input_tokens_details": {
            "cached_tokens": job_usage["prompt_tokens_details"]["cached_tokens"],
            "cache_write_tokens": 0,  # the prefix cache keeps blocks by itself: nothing is written on request
        },
        "output_tokens": job_usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": job_usage["total_tokens"],
    }


class ResponseObject:
    """The response object of one request: its fixed fields, then its status, output and usage."""

    def __init__(self, body: ResponsesRequest, response_id: str | None = None):
        self.body = body
        self.id = response_id or new_id("resp")
        self.created_at = int(time.time())

    def to_dict(
        self,
        status: str,
        output: list[dict],
        usage: dict | None = None,
        incomplete_reason: str | None = None,
    ) -> dict:
        body = self.body
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
            "error": None,
            "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": body.model,
            "output": output,
            "parallel_tool_calls": body.parallel_tool_calls,
            "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "store": body.store,
            "temperature": body.temperature,
            "text": {"format": body.text.format.echo()},
            "tool_choice": body.tool_choice
            if isinstance(body.tool_choice, str)
            else body.tool_choice.model_dump(),
            "tools": [tool.model_dump() for tool in body.tools],
            "top_p": body.top_p,
            "truncation": "disabled",
            "usage": usage,
            "user": body.user,
            "metadata": body.metadata or {},
        }

    def finished(self, completion: CompletionOutput, output: list[dict], job_usage: dict) -> dict:
        """The whole response once its completion has finished."""
        reason = INCOMPLETE.get(completion.finish_reason or "")
        return self.to_dict("incomplete" if reason else "completed", output, usage(job_usage), reason)
