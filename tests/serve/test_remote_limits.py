"""Rate limits over the network (serve/remote_limits.py): the router's app on loopback with its limits
routes, replicas' clients admitting through it. Two clients racing for one key's places get exactly
its limit between them; a token count recorded through one holds the other back; a caller without the
secret is refused and changes nothing; a router out of reach refuses the request with a 503 naming
the cause, through a real server's gateway too."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import httpx
import pytest

from llmasos.serve.errors import APIError
from llmasos.serve.keys import ApiKey, KeyStore
from llmasos.serve.remote_limits import PATH, SECRET_HEADER, RemoteRateLimiter
from llmasos.serve.replicas import Supervisor
from llmasos.serve.router import create_router_app
from llmasos.serve.shared_limits import SharedRateLimiter

from serving import LiveApp, LiveServer, server_config

SECRET = "the-servers-secret"


class LiveRouter(LiveApp):
    """The router's app (no replicas) keeping limits in a file, under uvicorn in a thread."""

    def __init__(self, path: Path):
        self.store = SharedRateLimiter(path)
        super().__init__(create_router_app(Supervisor.attach([]), limits=(self.store, SECRET)))

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self.store.close()


@pytest.fixture
def router(tmp_path):
    with LiveRouter(tmp_path / "limits.sqlite") as router:
        yield router


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once it is closed


def test_two_replicas_clients_admit_exactly_the_limit_between_them(router):
    key = ApiKey(name="alice", hash="sha256:a", requests_per_minute=7)

    async def race() -> list[bool]:
        clients = [RemoteRateLimiter(router.url, SECRET) for _ in range(2)]
        try:
            decisions = await asyncio.gather(*(clients[i % 2].admit(key) for i in range(20)))
            last = await clients[1].admit(key)
        finally:
            for client in clients:
                await client.aclose()
        assert not last.allowed and last.retry_after is not None
        assert "key 'alice' is limited to 7 requests per minute; retry in" in last.message
        return [d.allowed for d in decisions]

    assert sum(asyncio.run(race())) == 7
    other = ApiKey(name="bob", hash="sha256:b", requests_per_minute=7)
    assert router.store.admit(other).allowed  # keys apart; the router's file is the one window


def test_tokens_recorded_through_one_replica_hold_the_other_back(router):
    key = ApiKey(name="carol", hash="sha256:c", tokens_per_minute=100)

    async def run() -> None:
        first, second = RemoteRateLimiter(router.url, SECRET), RemoteRateLimiter(router.url, SECRET)
        try:
            assert (await first.admit(key, 60)).allowed
            await first.record(key, 90)
            refused = await second.admit(key, 20)
            assert not refused.allowed and "limited to 100 tokens per minute" in refused.message
            assert (await second.admit(key, 10)).allowed
            budget = ApiKey(name="dan", hash="sha256:d", token_budget=50, tokens_used=45)
            spent = await second.admit(budget, 10)  # decide's budget check, on the limits the replica sent
            assert not spent.allowed and "used 45 of its budget of 50 tokens" in spent.message
        finally:
            await first.aclose()
            await second.aclose()

    asyncio.run(run())


def test_without_the_secret_nothing_is_admitted_or_counted(router):
    key = ApiKey(name="erin", hash="sha256:e", requests_per_minute=1)
    body = {"key": {"name": "erin", "requests_per_minute": 1}, "estimated_tokens": 0}
    for headers in ({}, {SECRET_HEADER: "a-guess"}):
        refused = httpx.post(f"{router.url}{PATH}/admit", json=body, headers=headers)
        assert refused.status_code == 403 and SECRET_HEADER in refused.json()["error"]["message"]
        record = {"key": body["key"], "tokens": 5}
        assert httpx.post(f"{router.url}{PATH}/record", json=record, headers=headers).status_code == 403

    async def wrong_secret() -> None:
        client = RemoteRateLimiter(router.url, "a-guess")
        try:
            with pytest.raises(APIError) as refused:
                await client.admit(key)
        finally:
            await client.aclose()
        assert refused.value.status == 503 and refused.value.code == "rate_limits_unavailable"
        assert "answered 403" in refused.value.message

    asyncio.run(wrong_secret())
    assert router.store.admit(key).allowed  # the refused calls took no place in the window


def test_an_unreachable_router_refuses_limited_keys_with_a_503_naming_it():
    async def run() -> APIError:
        client = RemoteRateLimiter(dead_url(), SECRET)
        try:
            with pytest.raises(APIError) as refused:
                await client.admit(ApiKey(name="f", hash="sha256:f", requests_per_minute=3))
            # a key without per-minute limits has no window to ask for: only its budget, decided here
            assert (await client.admit(ApiKey(name="g", hash="sha256:g"), 10**6)).allowed
            broke = await client.admit(ApiKey(name="h", hash="sha256:h", token_budget=5, tokens_used=5))
            assert not broke.allowed and "used 5 of its budget of 5 tokens" in broke.message
        finally:
            await client.aclose()
        return refused.value

    error = asyncio.run(run())
    assert error.status == 503 and error.retry_after == 1
    assert "the router keeps this server's rate limits and did not answer at" in error.message
    assert "ConnectError" in error.message


def test_a_server_admits_through_the_router_and_refuses_without_it(store, router):
    """The gateway's admission path, awaited: a key's limit from the router's window (429 with its
    message); the same server pointed at no router answers 503 naming why, and admits nothing."""
    home = Path(os.environ["LLMASOS_HOME"])
    keys = KeyStore(home / "keys.json")
    secret = keys.add("rpm", requests_per_minute=2)[1]
    auth = {"Authorization": f"Bearer {secret}"}
    body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 2}
    config = server_config(["tiny"], home, shared_limits_url=router.url, limits_secret=SECRET)
    with LiveServer(config) as server:
        codes = [
            httpx.post(f"{server.url}/v1/completions", json=body, headers=auth, timeout=60) for _ in range(3)
        ]
    assert [c.status_code for c in codes] == [200, 200, 429]
    assert "key 'rpm' is limited to 2 requests per minute" in codes[-1].json()["error"]["message"]

    config = server_config(["tiny"], home, shared_limits_url=dead_url(), limits_secret=SECRET)
    with LiveServer(config) as server:
        refused = httpx.post(f"{server.url}/v1/completions", json=body, headers=auth, timeout=60)
    error = refused.json()["error"]
    assert refused.status_code == 503 and error["code"] == "rate_limits_unavailable"
    assert "did not answer" in error["message"] and refused.headers["retry-after"] == "1"
