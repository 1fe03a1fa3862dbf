"""Every failure as an OpenAI error object: `{"error": {"message", "type", "param", "code"}}`.

Handlers raise `APIError` (or an `LLMasOSError`, which is the user's to fix: a 400); the app turns
each into the same JSON shape with its status, including validation errors and errors in the
middle of a stream. Messages are bounded so a huge body is never echoed back.
"""

from __future__ import annotations

import json
import logging

from fastapi.responses import JSONResponse

from llmasos.errors import ContextLengthError, EngineDeadError, LLMasOSError, ModelNotFoundError

log = logging.getLogger("llmasos.serve")

MAX_MESSAGE_CHARS = 500

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after

    def body(self) -> dict:
        message = self.message
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 3] + "..."
        error_type = ERROR_TYPES.get(self.status, "server_error")
        return {"error": {"message": message, "type": error_type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)

    def sse(self) -> str:
        """The error as a server-sent event, for failures after a stream has begun."""
        return f"data: {json.dumps(self.body())}\n\n"


def user_error(exc: LLMasOSError, prompt_param: str = "prompt") -> APIError:
    """A mistake the user can fix, as a 400 (but a dead engine, 503); a request too long for the context
    gets OpenAI's code and names what to change: the prompt (`prompt_param`: "messages" for a chat) or
    max_tokens."""
    if isinstance(exc, ContextLengthError):
        param = prompt_param if exc.param == "prompt" else exc.param
        return APIError(400, str(exc), param=param, code="context_length_exceeded")
    if isinstance(exc, ModelNotFoundError):
        return APIError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, EngineDeadError):  # not the user's mistake: the model's engine is gone
        return APIError(503, str(exc), code="engine_dead")
    return APIError(400, str(exc))


def as_api_error(exc: Exception) -> APIError:
    """Errors as the client sees them: its own mistakes as 400s, anything else a logged 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, LLMasOSError):
        return user_error(exc)
    log.error("unexpected error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}; see the server log")


def validation_error(errors: list[dict]) -> APIError:
    """A 422 naming the first bad field, without the offending input (which may be huge)."""
    first = errors[0] if errors else {}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    what = first.get("msg", "invalid request body")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    message = f"{param}: {what}{more}" if param else f"{what}{more}"
    return APIError(422, message, param=param, code="invalid_value")
