"""Bad input gets the right OpenAI error object (or a clean cancel), and the server keeps serving.

Raw HTTP through httpx, because a client library would refuse to send most of these."""

import time

import httpx
import pytest

from serving import LiveServer, server_config, slow_engine

GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def server(store):
    with LiveServer(server_config(["tiny"], store.home, max_body_bytes=2**20)) as server:
        yield server


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def assert_error(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert len(error["message"]) <= 500
    for word in words:
        assert word in error["message"]
    return error


def assert_still_serving(http) -> None:
    response = http.post("/v1/chat/completions", json=GOOD)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4


def engine_is_idle(server, timeout: float = 10.0) -> bool:
    """No request running or waiting, and every KV block free (cached prefixes count as free)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        llm = server.state.registry.loaded["tiny"].served
        stats = llm.engine.stats()
        if not llm.engine.requests and stats.num_running == 0 and stats.kv_cache_usage == 0:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({**GOOD, "model": "nope"}, 404, ["'nope'", "GET /v1/models"]),
        ({**GOOD, "messages": []}, 400, ["messages is empty"]),
        ({**GOOD, "max_tokens": 0}, 400, ["max_tokens"]),
        ({**GOOD, "max_tokens": 10**9}, 400, ["context length", "max_tokens"]),
        ({**GOOD, "temperature": -1}, 400, ["temperature"]),
        ({**GOOD, "top_p": 1.5}, 400, ["top_p"]),
        ({**GOOD, "n": 0}, 400, ["n="]),
        ({**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, ["at most 4"]),
        ({**GOOD, "temperature": "hot"}, 422, ["temperature"]),
        ({**GOOD, "messages": "Hi"}, 422, ["messages"]),
        ({"messages": GOOD["messages"]}, 422, ["model"]),
        ({**GOOD, "messages": [{"role": "wizard", "content": "Hi"}]}, 422, ["role"]),
        ({**GOOD, "logprobs": False, "top_logprobs": 2}, 400, ["top_logprobs"]),
        ({**GOOD, "response_format": {"type": "json_schema"}}, 400, ["json_schema"]),
        ({**GOOD, "model": "x" * 100_000}, 404, []),
    ],
)
def test_invalid_requests_get_openai_errors(http, body, status, words):
    assert_error(http.post("/v1/chat/completions", json=body), status, *words)
    assert_still_serving(http)


def test_requests_too_long_for_the_context_are_context_length_exceeded(http):
    long_chat = {**GOOD, "messages": [{"role": "user", "content": "Hello " * 300}]}
    long_prompt = {"model": "tiny", "prompt": "Hello " * 300, "max_tokens": 4}
    for path, body, param in [
        ("/v1/chat/completions", long_chat, "messages"),
        ("/v1/completions", long_prompt, "prompt"),
        ("/v1/chat/completions", {**GOOD, "max_tokens": 10**9}, "max_tokens"),
    ]:
        error = assert_error(http.post(path, json=body), 400, "context")
        assert (error["code"], error["param"]) == ("context_length_exceeded", param)
    assert_still_serving(http)


def test_malformed_json_invalid_utf8_and_huge_bodies(http):
    headers = {"content-type": "application/json"}
    assert_error(
        http.post("/v1/chat/completions", content=b'{"model": "tiny", ', headers=headers), 400, "JSON"
    )
    bad_utf8 = b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}'
    assert http.post("/v1/chat/completions", content=bad_utf8, headers=headers).status_code == 400
    huge = b'{"model": "tiny", "prompt": "' + b"a" * (20 * 2**20) + b'"}'
    assert_error(http.post("/v1/completions", content=huge, headers=headers), 413, "bytes")
    assert_error(http.get("/v1/nothing"), 404, "/v1/nothing")
    assert_error(http.get("/v1/chat/completions"), 405)
    assert_still_serving(http)


def test_a_stream_cut_by_the_client_frees_its_blocks(server, http, monkeypatch):
    slow_engine(server, monkeypatch)
    engine = server.state.registry.loaded["tiny"].served.engine
    steps_before = engine.num_steps
    body = {**GOOD, "max_tokens": 200, "stream": True, "ignore_eos": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    # the connection is closed here, mid-answer
    assert engine_is_idle(server)
    assert engine.num_steps - steps_before < 150  # aborted long before its 200 tokens
    monkeypatch.undo()
    assert_still_serving(http)


def test_a_non_streaming_client_that_leaves_cancels_its_request(server, http, monkeypatch):
    slow_engine(server, monkeypatch)
    engine = server.state.registry.loaded["tiny"].served.engine
    steps_before = engine.num_steps
    with pytest.raises(httpx.ReadTimeout):  # 200 tokens take 4 s; the client gives up after 1 s
        httpx.post(
            f"{server.url}/v1/chat/completions",
            json={**GOOD, "max_tokens": 200, "ignore_eos": True},
            timeout=1,
        )
    assert engine_is_idle(server)
    assert engine.num_steps - steps_before < 150  # aborted long before its 200 tokens
    monkeypatch.undo()
    assert_still_serving(http)


def test_errors_in_the_middle_of_a_stream_are_error_events(server, http, monkeypatch):
    slow_engine(server, monkeypatch)  # 200 tokens take 4 s
    monkeypatch.setattr(server.state.config, "request_timeout_s", 0.5)
    body = {**GOOD, "max_tokens": 200, "stream": True, "ignore_eos": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        events = [line for line in response.iter_lines() if line.startswith("data:")]
    assert events[-1] == "data: [DONE]" and '"error"' in events[-2] and "timeout" in events[-2]
    assert engine_is_idle(server)
    monkeypatch.undo()
    assert_still_serving(http)


def test_a_dead_engine_is_a_503_not_the_users_mistake():
    from llmasos.errors import EngineDeadError, InvalidRequestError
    from llmasos.serve.errors import user_error

    dead = user_error(EngineDeadError("a tensor-parallel worker process died (rank 1)"))
    assert (dead.status, dead.code) == (503, "engine_dead") and "rank 1" in dead.message
    assert user_error(InvalidRequestError("bad")).status == 400
