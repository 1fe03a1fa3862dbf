"""OpenAI response bodies built from engine outputs: whole responses, stream chunks, embeddings.

A stream sends each choice's new text (and the logprobs of its new tokens) once per engine step;
a `ChoiceCursor` remembers how much of each choice has gone out, so the pieces of a stream add up
to exactly the non-streamed response.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np

from llmasos.outputs import CompletionOutput, RequestOutput
from llmasos.serve.errors import APIError
from llmasos.tokenizer import Tokenizer


def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _top(alternatives: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(alternatives.items(), key=lambda item: -item[1])[:k]


def chat_logprobs(tokenizer: Tokenizer, completion: CompletionOutput, start: int, k: int) -> dict | None:
    """`choices[].logprobs` of a chat completion, for the tokens from `start` on."""
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
        for token_id, alternatives in zip(completion.token_ids[start:], completion.logprobs[start:])
    ]
    return {"content": content}


def completion_logprobs(
    tokenizer: Tokenizer, completion: CompletionOutput, start: int, k: int, offset: int
) -> dict | None:
    """`choices[].logprobs` of a (legacy) completion; offset is where the new text starts."""
    if completion.logprobs is None:
        return None
    result: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, alternatives in zip(completion.token_ids[start:], completion.logprobs[start:]):
        text = _token_text(tokenizer, token_id)
        result["tokens"].append(text)
        result["token_logprobs"].append(alternatives[token_id])
        result["top_logprobs"].append({_token_text(tokenizer, i): lp for i, lp in _top(alternatives, k)})
        result["text_offset"].append(offset)
        offset += len(text)
    return result


@dataclass
class ChoiceCursor:
    """How much of one choice has been sent."""

    text: int = 0
    tokens: int = 0
    started: bool = False
    finished: bool = False

    def has_news(self, completion: CompletionOutput) -> bool:
        if self.finished:
            return False
        return not self.started or len(completion.text) > self.text or completion.finish_reason is not None


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
    ):
        self.chat, self.tokenizer, self.n, self.k = chat, tokenizer, n, num_logprobs
        self.echo_prompts = echo_prompts
        self.header = {"id": response_id, "created": created, "model": model}
        self.cursors: dict[int, ChoiceCursor] = {}

    def _choices(self, prompt_index: int, out: RequestOutput):
        for completion in out.outputs:
            yield prompt_index * self.n + completion.index, completion

    def _choice(self, index: int, completion: CompletionOutput, cursor: ChoiceCursor, stream: bool) -> dict:
        text = completion.text[cursor.text :]
        finish = "stop" if completion.finish_reason == "abort" else completion.finish_reason
        if self.chat:
            message = {"content": text} if cursor.started else {"role": "assistant", "content": text}
            entry = {
                "index": index,
                ("delta" if stream else "message"): message,
                "logprobs": chat_logprobs(self.tokenizer, completion, cursor.tokens, self.k),
            }
        else:
            echo = self.echo_prompts[index // self.n] if self.echo_prompts and not cursor.started else ""
            offset = len(echo) + cursor.text
            entry = {
                "index": index,
                "text": echo + text,
                "logprobs": completion_logprobs(self.tokenizer, completion, cursor.tokens, self.k, offset),
            }
        entry["finish_reason"] = finish
        cursor.text, cursor.tokens = len(completion.text), len(completion.token_ids)
        cursor.started, cursor.finished = True, finish is not None
        return entry

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
        """The stream chunk for this step's news, or None when there is none."""
        choices = []
        for i, completion in self._choices(prompt_index, out):
            cursor = self.cursors.setdefault(i, ChoiceCursor())
            if cursor.has_news(completion):
                choices.append(self._choice(i, completion, cursor, stream=True))
        if not choices:
            return None
        return self._chunk(choices, {"usage": None} if include_usage else {})

    def usage_chunk(self, usage: dict) -> dict:
        return self._chunk([], {"usage": usage})

    def _chunk(self, choices: list[dict], extra: dict) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"object": kind, **self.header, "choices": choices, **extra}


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
