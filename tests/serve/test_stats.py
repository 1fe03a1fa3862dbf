"""GET /api/stats and its stream: the Monitor's windows with synthetic events and a fake clock, then a
real server on loopback whose numbers move under a burst of requests and return to idle."""

import json
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from llmasos.outputs import CompletionOutput, RequestMetrics, RequestOutput
from llmasos.safety.findings import Finding, Verdict
from llmasos.serve.keys import KeyStore
from llmasos.serve.metrics import ServerMetrics
from llmasos.serve.monitor import Monitor, PerSecond, Recent

from serving import LiveServer, server_config, slow_engine

EMAIL = "john.doe@example.com"


class Clock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- the collector, with synthetic events ---------------------------------------------------------------


def test_per_second_counts_roll_over_their_window():
    counts = PerSecond(5)
    counts.add(100.2, 5)
    counts.add(100.9, 3)
    counts.add(102.5, 7)
    assert counts.series(102.7) == [0, 0, 8, 0, 7]  # seconds 98..102, the last one in progress
    assert counts.series(106.1) == [7, 0, 0, 0, 0]  # 102..106: 100 has left the window
    counts.add(107.0, 1)  # lands in 102's slot, which it resets
    assert counts.series(107.5) == [0, 0, 0, 0, 1]
    assert counts.series(112.0) == [0] * 5 and counts.total == 16


def test_recent_percentiles_cover_the_window_and_the_newest_samples():
    window = Recent(seconds=10, max_samples=1000)
    assert window.percentiles(0.0) == {"p50": None, "p90": None, "p99": None, "count": 0}
    rng = np.random.default_rng(0)
    old, new = rng.exponential(5.0, 300), rng.exponential(0.1, 200)
    for i, value in enumerate(old):
        window.add(i / 100, float(value))  # t in [0, 3)
    for i, value in enumerate(new):
        window.add(20 + i / 100, float(value))  # t in [20, 22)
    figures = window.percentiles(25.0)  # the old ones have left the window
    assert figures["count"] == 200
    assert [figures["p50"], figures["p90"], figures["p99"]] == pytest.approx(np.percentile(new, [50, 90, 99]))

    bounded = Recent(seconds=60, max_samples=50)
    for i in range(120):
        bounded.add(float(i) / 10, float(i))
    kept = bounded.percentiles(12.0)  # the newest 50: 70..119
    assert kept["count"] == 50 and [kept["p50"], kept["p90"], kept["p99"]] == pytest.approx(
        [94.5, 114.1, 118.51]
    )


def delta(tokens: int, last: float, finished: bool = False) -> RequestOutput:
    """A DELTA output of request "r": 5 prompt tokens of which 2 came from the prefix cache,
    arrived at 10.0, first token at 11.0."""
    times = RequestMetrics(10.0, 10.5, 11.0, last if finished else None, 0, last_token_time=last)
    completion = CompletionOutput(0, "x" * tokens, list(range(tokens)), "length" if finished else None)
    return RequestOutput(
        "r", None, [1, 2, 3, 4, 5], [completion], finished, num_cached_tokens=2, metrics=times
    )


def test_a_request_counts_its_prompt_once_and_every_token_and_gap():
    clock = Clock(100.2)
    monitor, metrics = Monitor(window_s=60, clock=clock), ServerMetrics()
    progress = None
    for tokens, last, now in ((1, 11.0, 100.2), (2, 11.4, 100.6), (0, 11.4, 101.1), (1, 11.5, 101.3)):
        clock.now = now
        out = delta(tokens, last, finished=now == 101.3)
        before, progress = progress, metrics.observe_delta("m", out, progress)
        monitor.observe_delta(out, before, progress)
    clock.now = 101.5
    traffic = monitor.traffic()
    tokens = traffic["tokens"]
    assert tokens["decode"][-2:] == [3, 1] and sum(tokens["decode"]) == 4  # seconds 100 and 101
    assert tokens["prefill"][-2:] == [3, 0] and tokens["cached"][-2:] == [2, 0]
    assert tokens["totals"] == {"prefill": 3, "cached": 2, "decode": 4}
    assert len(tokens["decode"]) == 60 and tokens["per_s"]["decode"] == pytest.approx(3 / 10)
    assert traffic["prefix_cache_hit_rate"] == pytest.approx(2 / 5)
    latency = traffic["latency"]
    assert latency["ttft_s"]["count"] == 1 and latency["ttft_s"]["p50"] == pytest.approx(1.0)
    # 11.0 -> 11.4 over two engine steps, then 11.4 -> 11.5: the same gaps /metrics observes
    assert latency["itl_s"]["count"] == 3
    assert latency["itl_s"]["p50"] == pytest.approx(0.2) and latency["itl_s"]["p99"] == pytest.approx(0.2)
    clock.now = 200.0  # long after: the windows are empty, the totals stay
    later = monitor.traffic()
    assert sum(later["tokens"]["decode"]) == 0 and later["tokens"]["totals"]["decode"] == 4
    assert later["latency"]["itl_s"]["count"] == 0 and later["prefix_cache_hit_rate"] is None


def test_guard_verdicts_are_tallied_by_stage_action_and_category():
    monitor = Monitor()
    found = (Finding("email", 0, 5, 1.0, "regex"), Finding("email", 9, 14, 1.0, "regex"))
    verdicts = [
        Verdict("redact", found, "", {"email": "redact"}, stage="input"),
        Verdict("allow", (), "", {}, stage="output"),
        Verdict(
            "block", (Finding("credit_card", 0, 4, 1.0, "luhn"),), "", {"credit_card": "block"}, "output"
        ),
    ]
    for verdict in verdicts:
        monitor.guard_verdict(verdict.audit_record("alice", "req"))
    assert monitor.guards() == {
        "verdicts": {"input": {"redact": 1}, "output": {"allow": 1, "block": 1}},
        "categories": {"credit_card": {"block": 1}, "email": {"redact": 1}},
    }


# -- a live server --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secrets(store):
    keys = KeyStore(store.home / "keys.json")
    return {
        "root": keys.add("root", admin=True)[1],
        "alice": keys.add("alice", requests_per_minute=4)[1],
        "bob": keys.add("bob", token_budget=10_000)[1],
    }


@pytest.fixture(scope="module")
def server(store, secrets):
    (store.home / "policy.yaml").write_text("default: {default_action: redact}\n")
    with LiveServer(server_config(["tiny"], store.home, guard_policy=store.home / "policy.yaml")) as server:
        yield server


def stats(server, secret: str) -> dict:
    response = httpx.get(f"{server.url}/api/stats", headers={"Authorization": f"Bearer {secret}"})
    assert response.status_code == 200, response.text
    return response.json()


def complete(server, secret: str, prompt: str, max_tokens: int = 6):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=secret, max_retries=0)
    return client.completions.create(
        model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}
    )


def wait_until(condition, what: str, limit_s: float = 30.0):
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.01)


def wait_for(server, secret: str, condition, what: str) -> dict:
    """The first snapshot that meets `condition`."""
    seen = []
    wait_until(lambda: condition(seen.append(stats(server, secret)) or seen[-1]), what)
    return seen[-1]


def test_stats_need_a_key_when_keys_exist(server, secrets):
    for path in ("/api/stats", "/api/stats/stream"):
        response = httpx.get(f"{server.url}{path}")
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    wrong = httpx.get(f"{server.url}/api/stats", headers={"Authorization": "Bearer sk-llmasos-wrong"})
    assert wrong.status_code == 401


def test_a_burst_moves_the_numbers_and_they_return_to_idle(server, secrets, monkeypatch):
    idle = stats(server, secrets["root"])
    (model,) = idle["models"]
    assert model["model"] == "tiny" and model["running"] == 0
    assert model["kv_blocks"]["used"] == 0 and model["kv_blocks"]["total"] == 512
    assert idle["tokens"]["totals"]["decode"] == 0 and idle["latency"]["ttft_s"]["count"] == 0

    # one slow request: while it runs, it holds KV blocks
    slow_engine(server, monkeypatch, seconds_per_step=0.05)
    answers = []
    slow = threading.Thread(
        target=lambda: answers.append(complete(server, secrets["bob"], "the slow one " * 8, 40))
    )
    slow.start()
    busy = wait_for(
        server,
        secrets["root"],
        lambda s: s["models"][0]["kv_blocks"]["used"] > 0 and s["models"][0]["running"] == 1,
        "a running request holding KV blocks",
    )
    assert busy["requests"]["running"] == 1 and busy["models"][0]["in_flight"] == 1
    slow.join()
    assert answers[0].usage.completion_tokens == 40
    monkeypatch.undo()

    # a burst: alice may send 4 a minute, so the 5th and 6th are refused with a 429
    refused = []
    for i in range(6):
        try:
            answers.append(complete(server, secrets["alice"], f"number {i} of the burst"))
        except openai.RateLimitError:
            refused.append(i)
    assert refused == [4, 5]
    prompt = f"a prompt long enough to fill whole KV blocks, sent twice, by bob who writes to {EMAIL}"
    answers += [complete(server, secrets["bob"], prompt) for _ in range(2)]

    after = wait_for(server, secrets["root"], lambda s: s["models"][0]["kv_blocks"]["used"] == 0, "idle")
    model = after["models"][0]
    assert model["running"] == 0 and model["waiting"] == 0 and after["requests"]["running"] == 0
    assert model["kv_blocks"]["cached"] > 0  # the finished prompts' blocks stay reusable
    blocks = model["kv_blocks"]
    assert blocks["used"] + blocks["cached"] + blocks["free"] == blocks["total"]

    tokens = after["tokens"]
    generated = sum(a.usage.completion_tokens for a in answers)
    assert tokens["totals"]["decode"] == generated == sum(tokens["decode"])  # all within the window
    assert tokens["totals"]["cached"] > 0  # bob's second prompt came from the prefix cache
    prompts = sum(a.usage.prompt_tokens for a in answers)
    assert (
        tokens["totals"]["prefill"] + tokens["totals"]["cached"]
        == prompts
        == sum(tokens["prefill"]) + sum(tokens["cached"])
    )
    assert after["prefix_cache_hit_rate"] > 0 and model["prefix_cache_hit_rate"] > 0
    ttft, itl = after["latency"]["ttft_s"], after["latency"]["itl_s"]
    assert ttft["count"] == len(answers) and 0 < ttft["p50"] <= ttft["p90"] <= ttft["p99"]
    assert itl["count"] > 0 and itl["p50"] > 0

    assert after["requests"]["admitted"] == len(answers) and after["requests"]["rate_limited"] == 2
    rows = {row["key"]: row for row in after["keys"]}
    assert set(rows) == {"root", "alice", "bob"}  # an admin key sees every key
    alice, bob = rows["alice"], rows["bob"]
    assert (alice["requests"], alice["rate_limited"]) == (4, 2)
    assert alice["tokens"] == sum(a.usage.total_tokens for a in answers[1:5])
    assert bob["requests"] == 3 and bob["tokens"] == bob["tokens_used"] > 0
    assert bob["budget_left"] == 10_000 - bob["tokens_used"] and alice["budget_left"] is None
    assert rows["root"]["requests"] == 0

    # the guards checked every prompt (the refused ones too: they run first) and every answer;
    # bob's last two prompts held an e-mail address
    guards = after["guards"]
    assert guards["enabled"] and guards["verdicts"]["input"]["redact"] == 2
    assert guards["categories"]["email"] == {"redact": 2}
    assert sum(guards["verdicts"]["input"].values()) == len(answers) + len(refused)
    assert sum(guards["verdicts"]["output"].values()) == len(answers)

    own = stats(server, secrets["alice"])["keys"]  # a key that is not an admin key sees its own row
    assert [row["key"] for row in own] == ["alice"]


def read_events(response: httpx.Response, count: int) -> list[dict]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append(json.loads(line.removeprefix("data: ")))
            if len(events) == count:
                break
    return events


def test_the_stream_yields_a_snapshot_a_second(server, secrets):
    headers = {"Authorization": f"Bearer {secrets['alice']}"}
    with httpx.stream("GET", f"{server.url}/api/stats/stream", headers=headers, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        first, second = read_events(response, 2)
    assert second["time"] > first["time"] and first["models"][0]["model"] == "tiny"
    assert [row["key"] for row in second["keys"]] == ["alice"]
    assert stats(server, secrets["root"])["models"][0]["running"] == 0  # the server goes on


def test_an_open_server_counts_its_callers_as_one_row_and_ends_streams_at_shutdown(tmp_path, store):
    home = tmp_path / "open"
    home.mkdir()
    events, failures = [], []

    def watch(url: str) -> None:
        try:
            with httpx.stream("GET", f"{url}/api/stats/stream", timeout=30) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(json.loads(line.removeprefix("data: ")))
        except httpx.HTTPError as exc:
            failures.append(exc)

    with LiveServer(server_config(["tiny"], home)) as server:
        complete(server, "any", "hello there")
        snapshot = httpx.get(f"{server.url}/api/stats").json()
        (row,) = snapshot["keys"]
        assert row["key"] is None and row["requests"] == 1 and row["tokens"] > 0
        assert snapshot["guards"] == {"enabled": False, "verdicts": {}, "categories": {}}
        watcher = threading.Thread(target=watch, args=(server.url,))
        watcher.start()
        wait_until(lambda: events, "a streamed snapshot")
    watcher.join(timeout=30)
    assert not watcher.is_alive() and not failures  # the stream ended, not cut
    assert events[0]["keys"][0]["requests"] == 1
