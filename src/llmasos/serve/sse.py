"""Server-sent events: the streaming response every stream of the server goes out as, and the typed
events of the Responses API.

Chat and completion streams send bare `data:` lines; the Responses API names each event
(`event: response.output_text.delta`) and numbers it (`sequence_number`), as OpenAI does, so a
client can tell a missed event from a late one.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from fastapi.responses import StreamingResponse

from llmasos.serve.errors import APIError


class ClosingStream(StreamingResponse):
    """A streaming response that runs on_close however it ends, even if its body never started
    (a client gone before the first byte), so the model's in-flight count is never leaked."""

    def __init__(self, content, *, on_close: Callable[[], None], **kwargs):
        super().__init__(content, media_type="text/event-stream", **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class TypedEvents:
    """The typed events of one response stream, numbered from 0."""

    def __init__(self):
        self.sequence_number = 0

    def event(self, kind: str, **fields) -> str:
        data = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

    def error(self, error: APIError) -> str:
        """OpenAI's `error` event; it also holds the error object, which the `openai` client raises."""
        body = error.body()["error"]
        return self.event(
            "error", code=body["code"], message=body["message"], param=body["param"], error=body
        )
