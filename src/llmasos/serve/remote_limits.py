"""Rate limits for replicas on other machines: the router serves admissions from its file of shared
windows (serve/shared_limits.py) over HTTP, and replicas that cannot open that file admit through it.

SQLite's locks hold on one machine's file system only, so a replica that a Ray actor runs on another
machine cannot share the router's limits.sqlite. The router adds two routes on its own host and port,
POST /internal/limits/admit and /internal/limits/record, which run the same SharedRateLimiter (and so
the same limits.decide) on the router's machine. Every call must carry the server's secret (made at
the router's start, given to the replicas in their environment, never on a command line): without it
a route answers 403 and touches nothing, so a client of the public port can neither read nor fill a
key's window.

The replica keeps checking API keys itself (the same keys file) and sends the key's name and limits
with each admission. It awaits the answer within ADMIT_TIMEOUT_S; a router that does not answer, or
refuses the secret, refuses the request with a 503 that names the cause: a key is never admitted
without its limit. A finished request's tokens are sent in the background: if the router cannot be
reached then, that charge is lost (and logged), not the answer.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import asdict

import httpx
from fastapi import FastAPI, Header
from pydantic import BaseModel

from llmasos.serve.errors import APIError
from llmasos.serve.keys import ApiKey
from llmasos.serve.limits import Decision, Window, decide
from llmasos.serve.shared_limits import SharedRateLimiter

log = logging.getLogger("llmasos.serve.remote_limits")

PATH = "/internal/limits"
SECRET_HEADER = "X-LLMasOS-Limits-Secret"
SECRET_ENV = "LLMASOS_LIMITS_SECRET"  # how the router gives the replicas the secret
ADMIT_TIMEOUT_S = 5.0  # a router's admission is a few SQLite rows: more than this is a router in trouble


class KeyLimits(BaseModel):
    """What `limits.decide` reads of a key: sent by the replica, which authenticated the caller."""

    name: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    token_budget: int | None = None
    tokens_used: int = 0

    @classmethod
    def of(cls, key: ApiKey) -> KeyLimits:
        return cls(**{name: getattr(key, name) for name in cls.model_fields})

    def key(self) -> ApiKey:
        return ApiKey(hash="", **self.model_dump())


class AdmitBody(BaseModel):
    key: KeyLimits
    estimated_tokens: int = 0


class RecordBody(BaseModel):
    key: KeyLimits
    tokens: int


def add_limits_routes(app: FastAPI, store: SharedRateLimiter, secret: str) -> None:
    """The router's side: admissions and records on `store`, for callers that hold `secret`. Add them
    before any catch-all route."""

    def check(given: str | None) -> None:
        if given is None or not hmac.compare_digest(given.encode(), secret.encode()):
            raise APIError(
                403,
                f"{PATH} is the replicas' own: it needs this server's limits secret ({SECRET_HEADER})",
                code="forbidden",
            )

    @app.post(PATH + "/admit")
    async def admit(body: AdmitBody, secret_given: str | None = Header(None, alias=SECRET_HEADER)) -> dict:
        check(secret_given)
        return asdict(store.admit(body.key.key(), body.estimated_tokens))

    @app.post(PATH + "/record")
    async def record(body: RecordBody, secret_given: str | None = Header(None, alias=SECRET_HEADER)) -> dict:
        check(secret_given)
        store.record(body.key.key(), body.tokens)
        return {}


class RemoteRateLimiter:
    """A replica's side: `SharedRateLimiter`'s admit (awaited) and record (sent in the background) over
    the router's routes at `url` (http://HOST:PORT)."""

    def __init__(self, url: str, secret: str, timeout_s: float = ADMIT_TIMEOUT_S):
        self.url = url.rstrip("/")
        self._client = httpx.AsyncClient(timeout=timeout_s, headers={SECRET_HEADER: secret})
        self._sending: set[asyncio.Task] = set()  # records in flight (a task nobody holds may be collected)

    async def admit(self, key: ApiKey, estimated_tokens: int = 0) -> Decision:
        """The router's `limits.decide` on the key's window as all replicas filled it; 503 if it cannot
        be had. A key without per-minute limits has no window: its budget is checked here, unasked."""
        if key.requests_per_minute is None and key.tokens_per_minute is None:
            return decide(Window(), key, estimated_tokens, time.time())
        body = AdmitBody(key=KeyLimits.of(key), estimated_tokens=estimated_tokens)
        return Decision(**await self._post("admit", body))

    def record(self, key: ApiKey, tokens: int) -> asyncio.Task | None:
        """Charge a finished request's tokens to the shared window, in the background (call it on the
        event loop); the task, for who must wait for it."""
        if key.tokens_per_minute is None:
            return None
        task = asyncio.get_running_loop().create_task(self._record(key, tokens))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)
        return task

    async def _record(self, key: ApiKey, tokens: int) -> None:
        try:
            await self._post("record", RecordBody(key=KeyLimits.of(key), tokens=tokens))
        except APIError as error:
            log.warning("%s; %d tokens of key %r were not counted", error.message, tokens, key.name)

    async def _post(self, what: str, body: BaseModel) -> dict:
        where = f"{self.url}{PATH}/{what}"
        try:
            response = await self._client.post(where, json=body.model_dump())
        except httpx.HTTPError as exc:
            raise self._unavailable(f"did not answer at {where} ({type(exc).__name__}: {exc})") from None
        if response.status_code != 200:
            raise self._unavailable(f"answered {response.status_code} at {where}: {response.text[:200]}")
        return response.json()

    @staticmethod
    def _unavailable(why: str) -> APIError:
        return APIError(
            503,
            f"the router keeps this server's rate limits and {why}, so no request is admitted; retry "
            "later, or check that the replicas reach the router's --host and --port",
            code="rate_limits_unavailable",
            retry_after=1,
        )

    async def aclose(self) -> None:
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
        await self._client.aclose()
