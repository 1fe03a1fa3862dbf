"""Two plain ASGI middlewares: a request body limit, and the audit record of every request.

Plain ASGI rather than Starlette's BaseHTTPMiddleware, which buffers streams and gets in the way
of cancelling a request when its client disconnects.
"""

from __future__ import annotations

import time

from llmasos.serve.errors import APIError

DRAIN_LIMIT = 256 * 2**20  # read (and drop) an oversized body up to this, so the client sees the 413


async def _send_error(send, error: APIError) -> None:
    response = error.response()
    await send(
        {"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers}
    )
    await send({"type": "http.response.body", "body": response.body})


class BodyLimit:
    """413 for a body over max_bytes; otherwise the body is read here once and replayed to the app.

    After the replay, `receive` is the client's again, so the app still sees `http.disconnect`.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size <= self.max_bytes:
                chunks.append(body)
            if not message.get("more_body") or size > DRAIN_LIMIT:
                break
        if size > self.max_bytes:
            error = APIError(
                413,
                f"the request body is {size} bytes or more; this server takes at most {self.max_bytes} "
                "(llmasos serve --max-body-mb)",
                code="request_too_large",
            )
            return await _send_error(send, error)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


class AuditTrail:
    """One audit record per request, written after its response ends (streams included).

    Handlers put what they know (key name, model, token counts, prompt) in `request.state`, which
    Starlette keeps in `scope["state"]`.
    """

    def __init__(self, app, audit_log):
        self.app, self.audit_log = app, audit_log

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in ("/health", "/metrics"):
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        state = scope.setdefault("state", {})
        status = 500

        async def send_and_watch(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            self.audit_log.log(
                key=state.get("key_name"),
                model=state.get("model"),
                route=scope["path"],
                status=state.get("status", status),
                prompt_tokens=state.get("prompt_tokens", 0),
                completion_tokens=state.get("completion_tokens", 0),
                latency_s=time.perf_counter() - start,
                request_id=state.get("request_id"),
                prompt=state.get("prompt"),
            )
