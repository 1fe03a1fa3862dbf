"""The G3 client against a fake streaming server with known delays: counts exact, times bounded
from below only (the machine is shared; upper bounds would be flaky)."""

import asyncio
import json
import math
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from llmasos.bench.serve import format_table, make_prompts, offline_throughput, run_serve_bench, watch_cost
from llmasos.errors import LLMasOSError

from tiny import save_tiny_model

MODEL = "fake"
FIRST_TOKEN_DELAY = 0.05
TOKEN_GAP = 0.01


def fake_app(state: dict) -> FastAPI:
    """/v1/completions streaming one " tok" chunk per max_tokens, then usage and [DONE]; the
    prompt's token count is its word count. POSTs whose number is in state["fail"] get a 500."""
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        state["posts"] += 1
        state["payloads"].append(body)
        if body["model"] != MODEL:
            return JSONResponse({"error": {"message": f"model {body['model']} not found"}}, status_code=404)
        if state["posts"] in state["fail"]:
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        state["in_flight"] += 1
        state["peak"] = max(state["peak"], state["in_flight"])

        async def events():
            try:
                for i in range(body["max_tokens"]):
                    await asyncio.sleep(FIRST_TOKEN_DELAY if i == 0 else TOKEN_GAP)
                    chunk = {"choices": [{"index": 0, "text": " tok", "finish_reason": None}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                prompt_tokens = len(body["prompt"].split())
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": body["max_tokens"]}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                state["in_flight"] -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/api/stats")
    async def stats():
        state["stats_polls"] += 1
        return JSONResponse({"models": []}, status_code=state["stats_status"])

    return app


@pytest.fixture(scope="module")
def server():
    state: dict = {}
    config = uvicorn.Config(fake_app(state), host="127.0.0.1", port=0, log_level="warning")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started:
        assert time.monotonic() < deadline, "the fake server did not start"
        time.sleep(0.01)
    port = instance.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", state
    instance.should_exit = True
    thread.join()


@pytest.fixture
def fake(server):
    url, state = server
    state.update(posts=0, payloads=[], fail=set(), in_flight=0, peak=0, stats_polls=0, stats_status=200)
    return url, state


def test_figures_of_a_streamed_run(fake):
    url, state = fake
    result = run_serve_bench(url, MODEL, num_requests=6, max_concurrency=2, prompt_len=12, output_len=5)

    assert (result.completed, result.failed, result.errors) == (6, 0, [])
    assert result.prompt_tokens == 6 * 12
    assert result.output_tokens == 6 * 5
    assert result.output_throughput == pytest.approx(30 / result.duration)
    assert result.request_throughput == pytest.approx(6 / result.duration)
    assert (result.ttft.count, result.tpot.count, result.itl.count, result.e2e.count) == (6, 6, 6 * 4, 6)
    assert result.ttft.p50 >= FIRST_TOKEN_DELAY
    assert result.e2e.p50 >= FIRST_TOKEN_DELAY + 4 * TOKEN_GAP
    assert result.ttft.mean <= result.ttft.p99 and result.itl.p50 > 0
    # latency = TTFT + the ITLs of the request, so mean TPOT is mean ITL when every request has 5 tokens
    assert result.tpot.mean == pytest.approx(result.itl.mean)
    assert state["peak"] <= 2
    assert result.duration >= 3 * (FIRST_TOKEN_DELAY + 4 * TOKEN_GAP)  # 6 requests, 2 at a time

    assert state["posts"] == 7  # one untimed test request first
    sent = state["payloads"][-1]
    assert sent["ignore_eos"] is True and sent["stream"] is True and sent["max_tokens"] == 5
    assert sent["stream_options"] == {"include_usage": True} and sent["temperature"] == 0
    assert len({p["prompt"] for p in state["payloads"]}) == 7  # no shared prompts


def test_poisson_arrivals_without_a_concurrency_limit(fake):
    url, _ = fake
    result = run_serve_bench(
        url + "/v1", MODEL, num_requests=5, request_rate=50.0, prompt_len=4, output_len=2
    )
    assert (result.completed, result.failed, result.output_tokens) == (5, 0, 10)
    assert result.max_concurrency is None and result.itl.count == 5


def test_failed_requests_are_counted_not_timed(fake):
    url, state = fake
    state["fail"] = {3}  # the second timed request
    result = run_serve_bench(url, MODEL, num_requests=4, prompt_len=4, output_len=3)
    assert (result.completed, result.failed) == (3, 1)
    assert result.output_tokens == 9 and result.ttft.count == 3
    assert result.errors == ['HTTP 500: {"error":{"message":"boom"}}']


def test_a_wrong_model_stops_before_the_run(fake):
    url, state = fake
    with pytest.raises(LLMasOSError, match="serves the model 'other'"):
        run_serve_bench(url, "other", num_requests=3, prompt_len=4, output_len=2)
    assert state["posts"] == 1


def test_prompts_are_reproducible_words():
    prompts = make_prompts(3, 10, seed=1)
    assert prompts == make_prompts(3, 10, seed=1) != make_prompts(3, 10, seed=2)
    assert [len(p.split()) for p in prompts] == [10, 10, 10]


def test_table_with_the_kernel_as_peer(fake, tmp_path, capsys):
    url, _ = fake
    result = run_serve_bench(url, MODEL, num_requests=2, prompt_len=4, output_len=3)
    offline = offline_throughput(
        str(save_tiny_model(tmp_path / "m", "llama")), 2, 4, 3, max_concurrency=2, device="cpu", block_size=4
    )
    assert offline > 0 and not math.isinf(offline)

    rows = format_table(result, offline, output=tmp_path / "g3.md")
    kernel = [r for r in rows if r.system == "LLMasOS kernel, offline"]
    assert kernel[0].speedup == pytest.approx(result.output_throughput / offline)
    assert [r.workload for r in rows] == [
        "G3 output throughput",
        "G3 output throughput",
        "G3 request throughput",
        "G3 TTFT p50",
        "G3 TPOT p50",
        "G3 ITL p50",
    ]
    assert "G3 TTFT p50" in capsys.readouterr().out
    assert "| G3 ITL p50 | LLMasOS server |" in (tmp_path / "g3.md").read_text()


def test_a_dashboard_polls_during_half_the_runs_and_is_a_ratio_row(fake, capsys):
    url, state = fake
    load = dict(base_url=url, model=MODEL, num_requests=4, max_concurrency=2, prompt_len=4, output_len=5)
    watched = watch_cost(2, poll_stats_s=0.02, **load)  # without, with, with, without
    assert len(watched.plain) == len(watched.polled) == 2 and state["posts"] == 4 * 5
    assert all(run.completed == 4 for run in watched.plain + watched.polled)
    assert [run.stats_polls for run in watched.plain] == [[], []]
    polls = [t for run in watched.polled for t in run.stats_polls]
    assert all(run.stats_polls for run in watched.polled) and all(t > 0 for t in polls)
    assert state["stats_polls"] >= len(polls)  # one may have been in flight when its run ended
    tokens = sum(r.output_tokens for r in watched.polled), sum(r.output_tokens for r in watched.plain)
    seconds = sum(r.duration for r in watched.polled), sum(r.duration for r in watched.plain)
    assert watched.ratio == pytest.approx((tokens[0] / seconds[0]) / (tokens[1] / seconds[1]))

    rows = format_table(watched.plain[0], watched=watched)
    (polling,) = [r for r in rows if r.system == "LLMasOS server, dashboard polling"]
    assert polling.speedup == watched.ratio and polling.value == pytest.approx(tokens[0] / seconds[0])
    assert (
        "2 pairs, order alternating" in polling.note and f"{len(polls)} polls of /api/stats" in polling.note
    )
    assert "dashboard polling" in capsys.readouterr().out


def test_a_dashboard_refused_its_stats_fails_the_run(fake):
    url, state = fake
    state["stats_status"] = 401
    with pytest.raises(LLMasOSError, match="api/stats answered 401"):
        run_serve_bench(
            url, MODEL, num_requests=4, max_concurrency=2, prompt_len=4, output_len=5, poll_stats_s=1
        )
