"""Sharing one machine: API keys and limits, the audit log, metrics, several models under a memory
budget with keep-alive, /health and /ready, `llmasos ps`, and SIGTERM on a real `llmasos serve`."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmasos.serve.keys import KeyStore
from llmasos.serve.registry import RegistryConfig
from llmasos.store import ModelStore

from serving import ENGINE, LiveServer, serve_process, server_config, slow_engine
from tiny import save_tiny_model
from tiny_families import save_t5

CHAT = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMASOS_HOME", str(home))
        store = ModelStore()
        store.import_path(save_tiny_model(tmp_path_factory.mktemp("llama"), "llama"), "tiny")
        store.import_path(save_tiny_model(tmp_path_factory.mktemp("qwen2"), "qwen2"), "tiny-qwen")
        store.import_path(save_t5(tmp_path_factory.mktemp("t5")), "tiny-t5")
        yield home


def client(server, key="unused"):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def metrics(server, key=None) -> dict[tuple[str, tuple], float]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    text = httpx.get(f"{server.url}/metrics", headers=headers).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_keys_models_limits_and_audit(home):
    keys = KeyStore(home / "keys.json")
    _, alice = keys.add("alice", models=["tiny"], requests_per_minute=2)
    _, bob = keys.add("bob", token_budget=20)
    with LiveServer(server_config(["tiny", "tiny-qwen"], home, audit_prompts=True)) as server:
        assert httpx.get(f"{server.url}/health").status_code == 200  # the one open route
        with pytest.raises(openai.AuthenticationError) as info:
            client(server, "sk-wrong").models.list()
        assert info.value.body["type"] == "authentication_error"
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
        assert httpx.get(f"{server.url}/metrics").status_code == 401

        as_alice = client(server, alice)
        assert [m.id for m in as_alice.models.list()] == ["tiny"]
        with pytest.raises(openai.PermissionDeniedError):
            as_alice.chat.completions.create(model="tiny-qwen", messages=CHAT, max_tokens=2)
        as_alice.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "secret"}], max_tokens=2
        )
        as_alice.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2)
        with pytest.raises(openai.RateLimitError) as info:  # the 403 did not count: 3rd in a minute
            as_alice.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2)
        assert int(info.value.response.headers["retry-after"]) >= 1
        assert "requests per minute" in info.value.body["message"]

        as_bob = client(server, bob)
        as_bob.completions.create(
            model="tiny-qwen", prompt="Once upon a time", max_tokens=8
        )  # over budget now
        with pytest.raises(openai.RateLimitError) as info:
            as_bob.completions.create(model="tiny-qwen", prompt="Once", max_tokens=16)
        assert "budget" in info.value.body["message"]

        keys.revoke("bob")  # takes effect on the running server
        with pytest.raises(openai.AuthenticationError):
            as_bob.models.list()
    assert 8 < KeyStore(home / "keys.json").list()[1].tokens_used < 20  # usage persisted at shutdown

    records = [json.loads(line) for line in (home / "audit.jsonl").read_text().splitlines()]
    chats = [r for r in records if r["route"] == "/v1/chat/completions"]
    assert [(r["key"], r["status"]) for r in chats] == [
        ("alice", 403),
        ("alice", 200),
        ("alice", 200),
        ("alice", 429),
    ]
    assert chats[1]["completion_tokens"] == 2 and chats[1]["prompt_tokens"] > 0 and chats[1]["latency_s"] > 0
    assert "secret" in json.dumps(chats[1]["prompt"])
    assert any(r["status"] == 401 and r["key"] is None for r in records)
    os.remove(home / "keys.json")


def test_one_tenant_cannot_hit_another_tenants_prefix_cache(home):
    keys = KeyStore(home / "keys.json")
    _, carol = keys.add("carol")
    _, dave = keys.add("dave")
    prompt = "A private prompt that is long enough to fill several blocks of the KV cache. " * 2
    try:
        with LiveServer(server_config(["tiny"], home)) as server:

            def cached(key):
                response = client(server, key).completions.create(model="tiny", prompt=prompt, max_tokens=1)
                return response.usage.prompt_tokens_details.cached_tokens

            assert cached(carol) == 0
            assert cached(dave) == 0  # the same prompt, another key: no hit, nothing learned by timing
            assert cached(carol) > 0
    finally:
        os.remove(home / "keys.json")


def test_metrics_follow_the_requests(home):
    with LiveServer(server_config(["tiny"], home)) as server:
        api = client(server)
        shared = "The same long prefix for every request, to hit the prefix cache. " * 2
        for i in range(3):
            api.completions.create(
                model="tiny", prompt=shared + str(i), max_tokens=5, extra_body={"ignore_eos": True}
            )
        stream = api.completions.create(
            model="tiny",
            prompt="Hi",
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        assert [chunk for chunk in stream][-1].usage.completion_tokens == 4
        m = metrics(server)
        label = (("model_name", "tiny"),)
        assert m[("llmasos:generation_tokens_total", label)] == 3 * 5 + 4
        assert (
            m[("llmasos:request_success_total", (("finished_reason", "length"), ("model_name", "tiny")))] == 4
        )
        assert m[("llmasos:time_to_first_token_seconds_count", label)] == 4
        assert m[("llmasos:e2e_request_latency_seconds_count", label)] == 4
        assert m[("llmasos:inter_token_latency_seconds_count", label)] == 3 * 4 + 3
        assert m[("llmasos:prefix_cache_hits_total", label)] > 0
        assert (
            m[("llmasos:num_requests_running", label)] == 0 and m[("llmasos:kv_cache_usage_perc", label)] == 0
        )


def test_models_load_on_use_and_unload_lru_under_a_budget_and_when_idle(home):
    one_model = 2 * 2**20  # a tiny model plus its 512-block cache takes about 1.4 MiB
    registry = RegistryConfig(["tiny", "tiny-qwen"], ENGINE, memory_budget_bytes=one_model, keep_alive_s=-1)
    with LiveServer(server_config([], home, registry=registry, preload=False)) as server:
        loaded = server.state.registry.loaded
        assert httpx.get(f"{server.url}/ready").status_code == 200 and not loaded
        api = client(server)
        api.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2)
        assert list(loaded) == ["tiny"]
        api.chat.completions.create(model="tiny-qwen", messages=CHAT, max_tokens=2)
        assert list(loaded) == ["tiny-qwen"]  # tiny was the least recently used: unloaded to make room
        ps = httpx.get(f"{server.url}/v1/ps").json()
        assert [row["model"] for row in ps["models"]] == ["tiny-qwen"] and ps["memory_bytes"] <= one_model

    registry = RegistryConfig(["tiny"], ENGINE, keep_alive_s=0.5)
    with LiveServer(server_config(["tiny"], home, registry=registry)) as server:
        assert httpx.get(f"{server.url}/ready").json()["models"] == ["tiny"]  # preloaded
        client(server).chat.completions.create(model="tiny", messages=CHAT, max_tokens=2)
        deadline = time.monotonic() + 10
        while server.state.registry.loaded and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not server.state.registry.loaded  # idle past its keep-alive
        assert httpx.get(f"{server.url}/ready").status_code == 503  # a named model is no longer loaded
        client(server).chat.completions.create(model="tiny", messages=CHAT, max_tokens=2)  # loads again


def test_a_model_the_server_does_not_serve_is_refused_before_anything_is_unloaded(home):
    one_model = 2 * 2**20
    registry = RegistryConfig(["tiny", "tiny-t5"], ENGINE, memory_budget_bytes=one_model, keep_alive_s=-1)
    with LiveServer(server_config([], home, registry=registry, preload=False)) as server:
        api = client(server)
        api.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2)
        with pytest.raises(openai.BadRequestError) as info:
            api.chat.completions.create(model="tiny-t5", messages=CHAT, max_tokens=2)
        assert info.value.body["code"] == "model_not_supported" and info.value.body["param"] == "model"
        assert "seq2seq" in info.value.body["message"] and "llmasos.LLM" in info.value.body["message"]
        assert list(server.state.registry.loaded) == ["tiny"]  # the idle decoder was not evicted for it


def test_a_full_queue_gets_503_with_retry_after(home, monkeypatch):
    with LiveServer(server_config(["tiny"], home, max_queue=0)) as server:
        monkeypatch.setattr(server.state.config.registry.engine, "max_num_seqs", 1)  # the admission bound
        slow_engine(server, monkeypatch)  # 150 tokens take 3 s
        body = {"model": "tiny", "prompt": "Hi", "max_tokens": 150, "ignore_eos": True}
        slow = threading.Thread(
            target=httpx.post, args=(f"{server.url}/v1/completions",), kwargs={"json": body, "timeout": 60}
        )
        slow.start()
        model = server.state.registry.loaded["tiny"]
        deadline = time.monotonic() + 10
        while model.in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = httpx.post(f"{server.url}/v1/completions", json={**body, "max_tokens": 1}, timeout=60)
        slow.join()
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"
        assert httpx.post(f"{server.url}/v1/completions", json={**body, "max_tokens": 1}).status_code == 200


def test_idle_connections_are_closed(home):
    import socket

    with LiveServer(server_config(["tiny"], home), idle_timeout_s=1) as server:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
            response = b""
            while not response.endswith(b'{"status":"ok"}'):  # headers and body may come in two reads
                response += conn.recv(4096)
            assert response.startswith(b"HTTP/1.1 200")
            # the server closes the idle keep-alive connection (else recv times out after 10 s)
            assert conn.recv(4096) == b""


@pytest.mark.slow
def test_llmasos_serve_ps_and_sigterm_drain_a_running_request(home, tmp_path):
    with socket_port() as port:
        pass
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "LLMASOS_HOME": str(home), "LLMASOS_HOST": f"127.0.0.1:{port}"}
    with serve_process(["tiny", "--kv-cache-gib", "0.01"], env, port) as process:
        ps = subprocess.run([sys.executable, "-m", "llmasos", "ps"], env=env, capture_output=True, text=True)
        assert ps.returncode == 0 and "tiny" in ps.stdout and "MEMORY" in ps.stdout

        body = {
            "model": "tiny",
            "prompt": "Hi",
            "max_tokens": 120,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        events = []

        def stream():
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
                events.extend(line for line in response.iter_lines() if line.startswith("data:"))

        reader = threading.Thread(target=stream)
        reader.start()
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        reader.join(timeout=60)
        # uvicorn drains, then re-raises the signal so the exit status says SIGTERM, as it should
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
        assert events[-1] == "data: [DONE]"  # the running request was finished, not cut
        assert json.loads(events[-2][5:])["usage"]["completion_tokens"] == 120
    ps = subprocess.run([sys.executable, "-m", "llmasos", "ps"], env=env, capture_output=True, text=True)
    assert ps.returncode == 0 and "no LLMasOS server answers" in ps.stderr and "Traceback" not in ps.stderr


class socket_port:
    """A free port on 127.0.0.1."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.sock.close()
