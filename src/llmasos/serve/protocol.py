"""The OpenAI wire format: request bodies as pydantic models, and their mapping onto SamplingParams.

The models check shapes and types only (a wrong type is a 422, as FastAPI users expect); value
ranges are checked once, by `SamplingParams`, whose messages name the field and the allowed range
(a 400). Unknown fields are ignored, as OpenAI and vLLM do, so newer clients keep working.
vLLM's extensions (top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids) are accepted too.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from llmasos.errors import InvalidRequestError
from llmasos.sampling_params import SamplingParams, StructuredOutputParams
from llmasos.tools import ToolRequest

MAX_STOP_STRINGS = 4  # OpenAI's limit


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    name: str = "output"
    schema_: dict = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str = "{}"  # JSON text, as the model returned it


class ToolCallMessage(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCallMessage] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # the call a tool message answers
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def as_template_message(self) -> dict:
        """The message as chat templates and the guards read it: content always text."""
        message = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


class _SamplingBody(_Body):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    metadata: dict[str, str] | None = None  # metadata.agent names the agent (a kernel process)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    # vLLM's extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    def _num_logprobs(self) -> int | None:
        return None

    def _max_tokens(self) -> int | None:
        return self.max_tokens

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """The request as SamplingParams; default_max_tokens fills what the context leaves."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
        max_tokens = self._max_tokens()
        optional = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
        }
        return SamplingParams(
            n=self.n,
            max_tokens=default_max_tokens if max_tokens is None else max_tokens,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            ignore_eos=self.ignore_eos,
            logprobs=self._num_logprobs(),
            structured_output=self._structured_output(),
            **{name: value for name, value in optional.items() if value is not None},
        )

    def _structured_output(self) -> StructuredOutputParams | None:
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return StructuredOutputParams(json_object=True)
        if fmt.json_schema is None:
            raise InvalidRequestError(
                "response_format type 'json_schema' needs a json_schema object: "
                '{"type": "json_schema", "json_schema": {"name": "...", "schema": {...}}}'
            )
        return StructuredOutputParams(json=fmt.json_schema.schema_)

    def agent(self, header: str | None) -> str | None:
        """The agent this request is a turn of: metadata.agent, else the X-Agent header, else user."""
        return (self.metadata or {}).get("agent") or header or self.user

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingBody):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    # function calling: OpenAI's shapes, checked by llmasos.tools.ToolRequest (its messages name the field)
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def _num_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs set to true")
        return (self.top_logprobs or 0) if self.logprobs else None

    def conversation(self) -> list[dict]:
        if not self.messages:
            raise InvalidRequestError("messages is empty: give at least one message")
        return [m.as_template_message() for m in self.messages]

    def tool_request(self) -> ToolRequest | None:
        """The tools offered and how they may be used; None when there are none."""
        return ToolRequest.from_openai(self.tools, self.tool_choice, self.parallel_tool_calls)


class CompletionRequest(_SamplingBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False

    def _num_logprobs(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """One or several prompts, each text or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise InvalidRequestError("prompt is empty: give some text or token ids")
        return prompts


class EmbeddingRequest(_Body):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    def inputs(self) -> list[str | list[int]]:
        data = self.input
        if isinstance(data, str) or (data and isinstance(data[0], int)):
            data = [data]
        if not data or any(len(item) == 0 for item in data):
            raise InvalidRequestError("input is empty: give some text or token ids")
        return list(data)
