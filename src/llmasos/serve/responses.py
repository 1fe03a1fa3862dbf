"""OpenAI response bodies built from engine outputs: whole responses, stream chunks, embeddings.

A stream sends each choice's new text (and the logprobs of its new tokens) once per engine step,
from the engine's DELTA outputs; a `ChoiceCursor` remembers where each choice's stream stands (the
tokens whose text is still held back, the text offset of the next token), so the pieces of a stream
add up to exactly the non-streamed response, which is built the same way from the final outputs.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, replace

import numpy as np

from llmasos.outputs import CompletionOutput, RequestOutput, ToolCall
from llmasos.serve.errors import APIError
from llmasos.tokenizer import Tokenizer
from llmasos.tools import ToolCallParser, ToolPlan


def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _top(alternatives: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(alternatives.items(), key=lambda item: -item[1])[:k]


def chat_logprobs(tokenizer: Tokenizer, completion: CompletionOutput, k: int) -> dict | None:
    """`choices[].logprobs` of a chat completion, for the completion's tokens."""
    if completion.logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict:
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = [
        {
            **entry(token_id, alternatives[token_id]),
            "top_logprobs": [entry(i, lp) for i, lp in _top(alternatives, k)],
        }
        for token_id, alternatives in zip(completion.token_ids, completion.logprobs)
    ]
    return {"content": content}


def completion_logprobs(
    tokenizer: Tokenizer, completion: CompletionOutput, k: int, offset: int
) -> dict | None:
    """`choices[].logprobs` of a (legacy) completion; offset is where its text starts."""
    if completion.logprobs is None:
        return None
    result: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, alternatives in zip(completion.token_ids, completion.logprobs):
        text = _token_text(tokenizer, token_id)
        result["tokens"].append(text)
        result["token_logprobs"].append(alternatives[token_id])
        result["top_logprobs"].append({_token_text(tokenizer, i): lp for i, lp in _top(alternatives, k)})
        result["text_offset"].append(offset)
        offset += len(text)
    return result


@dataclass
class ChoiceCursor:
    """How much of one choice has been sent, and the tokens of deltas that brought no text yet."""

    offset: int = 0  # the text_offset of the choice's next token (legacy completions' logprobs)
    started: bool = False
    finished: bool = False
    held: CompletionOutput | None = None  # tokens (and logprobs) whose text is still to come
    parser: ToolCallParser | None = None  # a chat stream with tools: its calls read as they come

    def news(self, delta: CompletionOutput) -> CompletionOutput | None:
        """What to send of `delta`, with the tokens held from earlier deltas; None: nothing yet."""
        if self.finished:
            return None
        if self.held is not None:
            held, self.held = self.held, None
            logprobs = None if delta.logprobs is None else (held.logprobs or []) + delta.logprobs
            delta = replace(delta, token_ids=held.token_ids + delta.token_ids, logprobs=logprobs)
        if not self.started or delta.text or delta.finish_reason is not None:
            return delta
        self.held = delta
        return None


class ResponseBuilder:
    """The bodies of one chat or completion call; choice index = prompt index * n + output index."""

    def __init__(
        self,
        *,
        chat: bool,
        tokenizer: Tokenizer,
        response_id: str,
        created: int,
        model: str,
        n: int,
        num_logprobs: int,
        echo_prompts: list[str] | None = None,
        tool_plan: ToolPlan | None = None,
    ):
        self.chat, self.tokenizer, self.n, self.k = chat, tokenizer, n, num_logprobs
        self.tool_plan = tool_plan
        self.echo_prompts = echo_prompts
        self.header = {"id": response_id, "created": created, "model": model}
        self.cursors: dict[int, ChoiceCursor] = {}

    def _choices(self, prompt_index: int, out: RequestOutput):
        for completion in out.outputs:
            yield prompt_index * self.n + completion.index, completion

    def _choice(self, index: int, completion: CompletionOutput, cursor: ChoiceCursor, stream: bool) -> dict:
        """The choice entry of `completion`, which follows what `cursor` says was sent: a delta in a
        stream, the whole completion in a response."""
        text = completion.text
        finish = "stop" if completion.finish_reason == "abort" else completion.finish_reason
        if self.chat:
            message, finish = self._message(completion, cursor, stream, finish)
            if not cursor.started:
                message = {"role": "assistant", **message}
            entry = {
                "index": index,
                ("delta" if stream else "message"): message,
                "logprobs": chat_logprobs(self.tokenizer, completion, self.k),
            }
        else:
            echo = self.echo_prompts[index // self.n] if self.echo_prompts and not cursor.started else ""
            logprobs = completion_logprobs(self.tokenizer, completion, self.k, len(echo) + cursor.offset)
            if logprobs and logprobs["tokens"]:
                cursor.offset = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
            entry = {"index": index, "text": echo + text, "logprobs": logprobs}
        entry["finish_reason"] = finish
        cursor.started, cursor.finished = True, finish is not None
        return entry

    def _message(
        self, completion: CompletionOutput, cursor: ChoiceCursor, stream: bool, finish: str | None
    ) -> tuple[dict, str | None]:
        """A chat choice's message (or delta) and finish reason: with tools, the content and the calls
        read out of the text, and "tool_calls" when the reply made calls and ended on its own."""
        if self.tool_plan is None:
            return {"content": completion.text}, finish
        if not stream:
            read = self.tool_plan.read(completion)
            if not read.tool_calls:
                return {"content": read.text}, finish
            calls = [_tool_call(call) for call in read.tool_calls]
            return {
                "content": read.text or None,
                "tool_calls": calls,
            }, "tool_calls" if finish == "stop" else finish
        cursor.parser = cursor.parser or self.tool_plan.parser()
        delta = cursor.parser.feed(completion.text)
        if finish is not None:
            delta.content += cursor.parser.finish().content
        message = {"content": delta.content} if delta.content else {}
        if delta.calls:
            message["tool_calls"] = [call.as_openai() for call in delta.calls]
        return message, "tool_calls" if finish == "stop" and cursor.parser.calls else finish

    def response(self, finals: dict[int, RequestOutput], usage: dict) -> dict:
        choices = [
            self._choice(i, completion, ChoiceCursor(), stream=False)
            for prompt_index, out in finals.items()
            for i, completion in self._choices(prompt_index, out)
        ]
        choices.sort(key=lambda c: c["index"])
        kind = "chat.completion" if self.chat else "text_completion"
        return {"object": kind, **self.header, "choices": choices, "usage": usage}

    def chunk(self, prompt_index: int, out: RequestOutput, include_usage: bool) -> dict | None:
        """The stream chunk for this step's news (`out` is a DELTA output), or None when there is none."""
        choices = []
        for i, completion in self._choices(prompt_index, out):
            cursor = self.cursors.setdefault(i, ChoiceCursor())
            news = cursor.news(completion)
            if news is not None:
                choice = self._choice(i, news, cursor, stream=True)
                if choice.get("delta") != {} or choice["finish_reason"] or choice["logprobs"]:
                    choices.append(choice)  # not a delta whose text the tool call parser holds back
        if not choices:
            return None
        return self._chunk(choices, {"usage": None} if include_usage else {})

    def usage_chunk(self, usage: dict) -> dict:
        return self._chunk([], {"usage": usage})

    def _chunk(self, choices: list[dict], extra: dict) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"object": kind, **self.header, "choices": choices, **extra}


def _tool_call(call: ToolCall) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def embedding_data(vectors: list[list[float]], dimensions: int | None, encoding_format: str) -> list[dict]:
    """`data` of an embeddings response; `dimensions` keeps the first components, re-normalized."""
    data = []
    for i, values in enumerate(vectors):
        vector = np.asarray(values, dtype=np.float32)
        if dimensions is not None:
            if not 1 <= dimensions <= len(vector):
                raise APIError(
                    400, f"dimensions must be between 1 and {len(vector)} for this model", param="dimensions"
                )
            vector = vector[:dimensions] / max(float(np.linalg.norm(vector[:dimensions])), 1e-12)
        encoded = (
            base64.b64encode(vector.tobytes()).decode() if encoding_format == "base64" else vector.tolist()
        )
        data.append({"object": "embedding", "index": i, "embedding": encoded})
    return data
