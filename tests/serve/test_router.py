"""Replicas behind the cache-aware router: the routing policy as pure Python, then
`llmasos serve --replicas 2` for real: the openai client through it, prefix affinity against
round-robin on sessions that share long prefixes, a replica SIGKILLed under load, and no process
left behind after SIGTERM."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import httpx
import openai
import psutil
import pytest
import uvicorn
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from llmasos.kernel.core import EngineStats
from llmasos.kernel.speculative import SpeculativeStats
from llmasos.serve.metrics import ServerMetrics
from llmasos.serve.replicas import Supervisor
from llmasos.serve.router import create_router_app, merge_metrics, merge_stats, route_key
from llmasos.serve.routing import CHUNK_CHARS, NoReplica, PrefixAffinity, ReplicaLoad, RoundRobin, RouteKey
from llmasos.store import ModelStore

from tiny import CORPUS, save_tiny_model, widen_context


# -- the policy, without servers ---------------------------------------------------------------------
def replicas(n: int) -> list[ReplicaLoad]:
    return [ReplicaLoad(healthy=True) for _ in range(n)]


def send(policy, key: RouteKey) -> int:
    """Route as the router does: count the request as routed (it finishes at once: in_flight is 0)."""
    index = policy.choose(key)
    policy.replicas[index].routed += 1
    return index


def long_text(seed: int, chunks: int = 4) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefgh ") for _ in range(chunks * CHUNK_CHARS))


def test_new_prefixes_spread_and_a_seen_prefix_returns_to_its_replica():
    policy = PrefixAffinity(replicas(3))
    first = [send(policy, RouteKey(long_text(s))) for s in range(6)]
    assert sorted(first) == [0, 0, 1, 1, 2, 2]  # nothing matched anywhere: fewest requests first
    for s in range(6):  # a later turn: the earlier prompt and more
        assert send(policy, RouteKey(long_text(s) + " and the next question")) == first[s]


def test_the_longest_match_wins():
    policy = PrefixAffinity(replicas(2))
    base = long_text(0, chunks=2)
    policy.replicas[0].remember(RouteKey(base).chunk_hashes()[:1])  # one chunk of it
    policy.replicas[1].remember(RouteKey(base).chunk_hashes())  # both chunks
    policy.replicas[1].routed = 10  # busier over time, idle now: the cache still decides
    assert policy.choose(RouteKey(base + "x" * CHUNK_CHARS)) == 1


def test_a_replica_past_the_load_bound_gets_no_more_of_its_prefixes():
    policy = PrefixAffinity(replicas(2))
    text = long_text(1)
    assert send(policy, RouteKey(text)) == 0
    policy.replicas[0].in_flight = 4  # 4 + 1 > 1.25 * 5 / 2 + 1
    assert policy.choose(RouteKey(text)) == 1
    other = RouteKey(long_text(5))
    policy.replicas[0].remember(other.chunk_hashes())
    policy.replicas[0].in_flight = 1  # busier than replica 1, but within the bound: the cache wins
    assert policy.choose(other) == 0


def test_agents_stick_and_keys_keep_their_prefixes_apart():
    policy = PrefixAffinity(replicas(2))
    text = long_text(2)
    assert send(policy, RouteKey(text, salt="alice")) == 0
    assert send(policy, RouteKey(text, salt="bob")) == 1  # another key: another cache, no match
    assert send(policy, RouteKey(long_text(3), salt="bob", agent="planner")) == 0
    # the agent's next turn starts with other text (a tool result), yet goes where its blocks are
    assert send(policy, RouteKey(text, salt="bob", agent="planner")) == 0
    assert send(policy, RouteKey(long_text(4), salt="alice", agent="planner")) == 1  # alice's planner


def test_unhealthy_and_failed_replicas_are_skipped():
    for policy in (PrefixAffinity(replicas(3)), RoundRobin(replicas(3))):
        policy.replicas[1].healthy = False
        chosen = {policy.choose(RouteKey(long_text(s)), exclude=frozenset({0})) for s in range(4)}
        assert chosen == {2}
        for r in policy.replicas:
            r.healthy = False
        with pytest.raises(NoReplica):
            policy.choose(RouteKey("x"))


def test_round_robin_ignores_prefixes():
    policy = RoundRobin(replicas(2))
    assert [send(policy, RouteKey(long_text(0))) for _ in range(4)] == [0, 1, 0, 1]


def test_route_key_reads_the_prompt_agent_and_key():
    chat = {
        "model": "m",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "user": "u",
    }
    key = route_key({"authorization": "Bearer sk-1"}, json.dumps(chat).encode())
    assert key.text == "m\nuser\nhi\n" and key.agent == "u" and key.salt
    assert route_key({"authorization": "Bearer sk-2"}, b"{}").salt != key.salt
    chat["metadata"] = {"agent": "a"}
    assert route_key({"x-agent": "h"}, json.dumps(chat).encode()).agent == "a"
    assert route_key({"x-agent": "h"}, b'{"prompt": [1, 2]}').agent == "h"
    assert route_key({}, b'{"prompt": [[1, 2], [3]]}').text == "\n1 2"
    assert route_key({}, b"not json").text == "\n"


def test_metrics_and_stats_are_merged_per_replica():
    def exposition(hits: int) -> str:
        registry = CollectorRegistry()
        Counter("llmasos:prefix_cache_hits", "Hits.", ["model_name"], registry=registry).labels("tiny").inc(
            hits
        )
        return generate_latest(registry).decode()

    def replica_metrics(accepted: int) -> str:  # a replica's own /metrics, its engine drafting
        metrics = ServerMetrics()
        stats = EngineStats(0, 0, 0.0, 0, 0, 0, speculative=SpeculativeStats(10, 40, accepted))
        metrics.update_engine("tiny", stats)
        return metrics.render()[0].decode()

    merged = merge_metrics([(0, exposition(3)), (1, exposition(5))])
    text = generate_latest(SimpleNamespace(collect=lambda: merged)).decode()
    assert text.count("# TYPE llmasos:prefix_cache_hits_total counter") == 1  # one family, both replicas
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    totals = {(s.labels["replica"], s.value) for s in samples if s.name == "llmasos:prefix_cache_hits_total"}
    assert totals == {("0", 3), ("1", 5)}

    merged = merge_metrics([(0, replica_metrics(12)), (1, replica_metrics(30))])
    text = generate_latest(SimpleNamespace(collect=lambda: merged)).decode()
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    accepted = {(s.labels["replica"], s.value) for s in samples if s.name.endswith("accepted_tokens_total")}
    assert accepted == {("0", 12), ("1", 30)}

    def snapshot(n: int) -> dict:
        series = {"prefill": [n, 0], "cached": [n, n], "decode": [1, 1]}
        return {
            "time": n,
            "uptime_s": n,
            "models": [{"model": "tiny"}],
            "requests": {"running": n, "waiting": 0},
            "tokens": {**series, "window_s": 2, "per_s": {"decode": n}, "totals": {"decode": n}},
            "latency": {"ttft_s": {"p50": n, "p90": n, "p99": n, "count": 1}, "itl_s": None},
            "keys": [
                {
                    "key": "k",
                    "requests": n,
                    "tokens": n,
                    "rate_limited": 0,
                    "tokens_used": n,
                    "budget_left": None,
                }
            ],
            "guards": {"enabled": False, "verdicts": {"input": {"allow": n}}, "categories": {}},
        }

    stats = merge_stats([(0, snapshot(1)), (1, snapshot(2))])
    assert stats["requests"]["running"] == 3 and stats["tokens"]["cached"] == [3, 3]
    assert stats["prefix_cache_hit_rate"] == 6 / 9 and stats["latency"]["ttft_s"] == {
        "p50": 2,
        "p90": 2,
        "p99": 2,
        "count": 2,
    }
    assert [r["replica"] for r in stats["models"]] == [0, 1] and stats["keys"][0]["requests"] == 3
    assert stats["guards"]["verdicts"] == {"input": {"allow": 3}}


# -- a real router over two real replicas ---------------------------------------------------------------
KV_CACHE_GIB = "0.002"  # about 260 blocks of 16 tokens per replica: half its sessions fit, not all
SESSIONS, TURNS = 64, 8  # the workload


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    """`llmasos serve tiny --replicas 2` on a free port: (process, url), once both replicas are ready."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMASOS_HOME", str(home))
        model = widen_context(save_tiny_model(tmp_path_factory.mktemp("llama"), "llama"))  # 8 turns fit
        ModelStore().import_path(model, "tiny")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "llmasos", "serve", "tiny", "--replicas", "2", "--port", str(port)]
    command += ["--kv-cache-gib", KV_CACHE_GIB, "--shutdown-timeout", "10"]
    log = open(home / "router.log", "w")  # noqa: SIM115 - closed after the module
    process = subprocess.Popen(command, env={**os.environ, "LLMASOS_HOME": str(home)}, stdout=log, stderr=log)
    try:
        wait_for(lambda: process.poll() is None and all_ready(url), what="both replicas ready", log=home)
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        log.close()


def wait_for(condition, what: str, log=None, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            detail = (log / "router.log").read_text()[-3000:] if log else ""
            raise AssertionError(f"timed out waiting for {what}\n{detail}")
        time.sleep(0.25)


def replica_rows(url: str) -> list[dict]:
    return httpx.get(f"{url}/api/ps", timeout=30).json()["replicas"]


def all_ready(url: str) -> bool:
    try:
        return all(r["healthy"] for r in replica_rows(url))
    except (httpx.HTTPError, KeyError, ValueError):
        return False


def prefix_cache(url: str) -> tuple[float, float]:
    """(hit tokens, queried tokens) summed over the replicas, from the router's merged /metrics."""
    totals = {"llmasos:prefix_cache_hits": 0.0, "llmasos:prefix_cache_queries": 0.0}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name.removesuffix("_total") in totals:
                totals[sample.name.removesuffix("_total")] += sample.value
    return totals["llmasos:prefix_cache_hits"], totals["llmasos:prefix_cache_queries"]


def run_sessions(url: str, seed: int) -> tuple[float, list[int]]:
    """SESSIONS chats of TURNS turns, each starting with its own long document, turn by turn in a shuffled
    order of sessions (as users come back); returns the prefix-cache hit rate over the workload and the
    requests each replica got."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    words, rng = " ".join(CORPUS).split(), random.Random(seed)
    chats = [
        [{"role": "system", "content": " ".join(rng.choice(words) for _ in range(56))}]
        for _ in range(SESSIONS)
    ]
    hits, queries = prefix_cache(url)
    routed = [r["routed"] for r in replica_rows(url)]
    for turn in range(TURNS):
        for chat in rng.sample(chats, len(chats)):
            chat.append({"role": "user", "content": f"Hi {turn}"})
            client.chat.completions.create(model="tiny", messages=chat, max_tokens=4)
            # the random model's answer may be any bytes, many tokens each: a plain one keeps the chat short
            chat.append({"role": "assistant", "content": "Ok."})
    new_hits, new_queries = prefix_cache(url)
    routed = [r["routed"] - before for r, before in zip(replica_rows(url), routed)]
    return (new_hits - hits) / (new_queries - queries), routed


@contextmanager
def round_robin_router(url: str) -> Iterator[str]:
    """A second router, round-robin, in this process, over the same two replica processes."""
    ports = [int(r["url"].rsplit(":", 1)[1]) for r in replica_rows(url)]
    server = uvicorn.Server(
        uvicorn.Config(create_router_app(Supervisor.attach(ports), "round-robin"), log_level="warning")
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    other = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        wait_for(lambda: server.started and all_ready(other), what="the round-robin router")
        yield other
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def chat_and_stream_through(url: str) -> None:
    """A chat answer (5 tokens) and a streamed completion (6) through the `openai` client: the router
    passes the stream on event by event, several text events, then the usage."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    always = {"ignore_eos": True}
    chat = [{"role": "user", "content": "Hi"}]
    answer = client.chat.completions.create(model="tiny", messages=chat, max_tokens=5, extra_body=always)
    assert answer.usage.completion_tokens == 5
    stream = client.completions.create(
        model="tiny",
        prompt="Once upon",
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=always,
    )
    chunks = list(stream)
    assert len([c for c in chunks if c.choices]) > 1 and chunks[-1].usage.completion_tokens == 6


def merged_samples(url: str) -> list:
    """The router's /metrics samples, after checking that /v1/ps and llmasos:replica_up show both
    replicas, each under its `replica` label."""
    ps = httpx.get(f"{url}/v1/ps").json()
    assert sorted(row["replica"] for row in ps["models"]) == [0, 1]
    samples = [s for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text) for s in f.samples]
    up = {s.labels["replica"]: s.value for s in samples if s.name == "llmasos:replica_up"}
    assert up == {"0": 1.0, "1": 1.0}
    return samples


@pytest.mark.slow
def test_the_openai_client_through_the_router(router):
    _, url = router
    chat_and_stream_through(url)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    samples = merged_samples(url)
    generated = [s for s in samples if s.name == "llmasos:generation_tokens_total"]
    assert (
        sorted(s.labels["replica"] for s in generated) == ["0", "1"] and sum(s.value for s in generated) == 11
    )
    assert httpx.get(f"{url}/api/stats").json()["tokens"]["totals"]["decode"] == 11
    missing = httpx.post(f"{url}/v1/completions", json={"model": "nope", "prompt": "x"})
    assert (
        missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    )  # the replica's


@pytest.mark.slow
def test_prefix_affinity_doubles_the_cache_hits_of_round_robin_and_stays_balanced(router):
    _, url = router
    affinity, routed = run_sessions(url, seed=1)
    with round_robin_router(url) as other:
        round_robin, _ = run_sessions(other, seed=2)
    print(f"prefix-cache hit rate: affinity {affinity:.2f}, round-robin {round_robin:.2f}; routed {routed}")
    assert affinity >= 2 * round_robin
    assert max(routed) <= 1.5 * sum(routed) / len(routed)


def ask(url: str, i: int, results: list[str]) -> None:
    """A long completion (every third one streamed); appends "answer", "error CODE" (the status's, or
    an error event's mid-stream) or "transport error ..." to results."""
    body = {
        "model": "tiny",
        "prompt": f"Once {i}",
        "max_tokens": 150,
        "ignore_eos": True,
        "stream": i % 3 == 0,
    }
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
            text = response.read().decode()
    except httpx.HTTPError as exc:
        results.append(f"transport error {exc!r}")
        return
    if response.status_code != 200:
        results.append(f"error {response.json()['error']['code']}")
    elif '"error"' in text:
        assert text.rstrip().endswith("data: [DONE]")
        results.append("error " + json.loads(text.split("data: ")[-2])["error"]["code"])
    else:
        results.append("answer")


@pytest.mark.slow
def test_a_replica_killed_under_load_fails_no_request_silently_and_nothing_outlives_the_router(router):
    process, url = router
    before = replica_rows(url)
    results: list[str] = []
    threads = [threading.Thread(target=ask, args=(url, i, results)) for i in range(12)]
    for t in threads:
        t.start()
    wait_for(lambda: replica_rows(url)[0]["in_flight"] > 0, what="requests on replica 0")
    os.kill(before[0]["pid"], signal.SIGKILL)
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a request hung"
    print(sorted(results))
    assert len(results) == 12 and set(results) <= {"answer", "error replica_failed", "error no_replica"}
    assert "answer" in results
    retried = [s for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text) for s in f.samples]
    assert any(s.name == "llmasos:router_retries_total" and s.value >= 1 for s in retried)

    wait_for(lambda: all_ready(url), what="replica 0 restarted")
    after = replica_rows(url)
    assert after[0]["restarts"] == 1 and after[0]["pid"] != before[0]["pid"]
    pids = [r["pid"] for r in after]
    assert all(psutil.pid_exists(p) for p in pids)

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    left = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert left == [], f"replicas outlived the router: {left}"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--replica-executor", "bogus"], "unknown --replica-executor 'bogus': use one of local, ray"),
        (
            ["--replica-executor", "ray", "--ray-placement", "DIAGONAL"],
            "unknown --ray-placement 'DIAGONAL' for replicas: use one of",
        ),
    ],
)
def test_a_bad_replica_executor_or_placement_is_refused_with_the_choices(flags, message):
    command = [sys.executable, "-m", "llmasos", "serve", "tiny", "--replicas", "2", *flags]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and message in result.stderr
