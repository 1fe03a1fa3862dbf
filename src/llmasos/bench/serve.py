"""Workload G3 of BENCHMARKS.md: an OpenAI-compatible server under Poisson arrivals, measured from
the client the way vLLM's `bench serve` measures it.

Each request streams `/v1/completions` with `ignore_eos` (a vLLM extension) so that it generates
exactly `output_len` tokens, and asks for a final usage chunk so that token counts are the
server's own. Times are time.perf_counter() on the client, taken as each chunk arrives:

- TTFT: request sent to the first chunk carrying text.
- ITL: the gaps between successive chunks carrying text.
- TPOT: (latency - TTFT) / (output tokens - 1), per request; latency ends at the last text chunk.
- request throughput: completed requests / wall time of the run; output throughput: generated
  tokens / the same wall time.

The peer is the kernel itself: `offline_throughput` runs the same requests through
`LLM.generate` at the same concurrency, so the ratio says what the HTTP server costs (goal: at
most 10%, a ratio of 0.90 or more). That ratio means something only when the server is kept busy
(request_rate=inf). With `poll_stats_s` a dashboard is open meanwhile: GET /api/stats every that many
seconds, as the console and `llmasos top` poll it; the ratio of the runs with and without says what
watching costs (goal: at most 2%, a ratio of 0.98 or more). Prompts are random common English words,
about one token each in the BPE tokenizers of the benchmark models; the server tokenizes them and
reports how many tokens it saw.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from llmasos.bench.common import Row, report
from llmasos.errors import LLMasOSError

WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more write "
    "go see number no way could people my than first water been call who oil its now find long down day did "
    "get come made may part"
).split()


@dataclass
class Summary:
    """Mean, median and 99th percentile of one per-request (or per-chunk) figure, in seconds."""

    mean: float
    p50: float
    p99: float
    count: int

    @classmethod
    def of(cls, values: list[float]) -> Summary:
        if not values:
            return cls(math.nan, math.nan, math.nan, 0)
        p50, p99 = np.percentile(values, [50, 99])
        return cls(float(np.mean(values)), float(p50), float(p99), len(values))


@dataclass
class RequestResult:
    ok: bool
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0  # request sent to the last chunk carrying text
    itl: list[float] = field(default_factory=list)


@dataclass
class ServeBenchResult:
    model: str
    num_requests: int
    request_rate: float
    max_concurrency: int | None
    prompt_len: int
    output_len: int
    completed: int
    failed: int
    duration: float  # wall seconds from the first request sent to the last one done
    prompt_tokens: int  # over completed requests, as the server counted them
    output_tokens: int
    ttft: Summary
    tpot: Summary
    itl: Summary
    e2e: Summary
    errors: list[str]  # the distinct errors of failed requests, at most 5
    stats_polls: list[float] = field(default_factory=list)  # seconds each GET /api/stats took (poll_stats_s)

    @property
    def request_throughput(self) -> float:
        return self.completed / self.duration

    @property
    def output_throughput(self) -> float:
        return self.output_tokens / self.duration


def make_prompts(num_requests: int, prompt_len: int, seed: int = 0) -> list[str]:
    """Random words rather than random token ids, because the server takes text; different per
    request from the first word on, so that no request hits another's prefix cache."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=prompt_len)) for _ in range(num_requests)]


def run_serve_bench(
    base_url: str,
    model: str,
    num_requests: int,
    request_rate: float = math.inf,
    max_concurrency: int | None = None,
    prompt_len: int = 512,
    output_len: int = 256,
    api_key: str | None = None,
    seed: int = 0,
    poll_stats_s: float | None = None,
) -> ServeBenchResult:
    """Send one untimed test request (it fails loudly if the server or model is wrong), then
    `num_requests` requests with exponential gaps of mean 1/request_rate (inf: all at once), at
    most `max_concurrency` in flight (None: no limit); with `poll_stats_s`, GET /api/stats every
    that many seconds meanwhile, as an open dashboard does."""
    return asyncio.run(
        _bench(
            base_url,
            model,
            num_requests,
            request_rate,
            max_concurrency,
            prompt_len,
            output_len,
            api_key,
            seed,
            poll_stats_s,
        )
    )


async def _bench(
    base_url: str,
    model: str,
    num_requests: int,
    request_rate: float,
    max_concurrency: int | None,
    prompt_len: int,
    output_len: int,
    api_key: str | None,
    seed: int,
    poll_stats_s: float | None,
) -> ServeBenchResult:
    root = base_url.rstrip("/").removesuffix("/v1")
    url = root + "/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    warmup, *prompts = make_prompts(num_requests + 1, prompt_len, seed)
    gaps = random.Random(seed + 1)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    def payload(prompt: str) -> dict:
        return {
            "model": model,
            "prompt": prompt,
            "max_tokens": output_len,
            "ignore_eos": True,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    # no pool limit: requests wait on the semaphore above, never for a connection inside a timing;
    # the read timeout bounds a silent server, not a long request (it applies between chunks)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def send(prompt: str) -> RequestResult:
            if limit is None:
                return await _stream(client, url, payload(prompt), headers)
            async with limit:
                return await _stream(client, url, payload(prompt), headers)

        test = await send(warmup)
        if not test.ok:
            raise LLMasOSError(
                f"the test request to {url} failed: {test.error}. Check that the server is running there "
                f"and serves the model {model!r}"
            )
        polls: list[float] = []
        dashboard = (
            asyncio.create_task(_poll_stats(root, headers, poll_stats_s, polls)) if poll_stats_s else None
        )
        start = time.perf_counter()
        tasks = []
        for i, prompt in enumerate(prompts):
            tasks.append(asyncio.create_task(send(prompt)))
            if request_rate != math.inf and i + 1 < len(prompts):
                await asyncio.sleep(gaps.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        if dashboard is not None:
            if dashboard.done():
                dashboard.result()  # a poll failed: raise it, for the comparison would mean nothing
            dashboard.cancel()

    done = [r for r in results if r.ok]
    return ServeBenchResult(
        model=model,
        num_requests=num_requests,
        request_rate=request_rate,
        max_concurrency=max_concurrency,
        prompt_len=prompt_len,
        output_len=output_len,
        completed=len(done),
        failed=len(results) - len(done),
        duration=duration,
        prompt_tokens=sum(r.prompt_tokens for r in done),
        output_tokens=sum(r.output_tokens for r in done),
        ttft=Summary.of([r.ttft for r in done]),
        tpot=Summary.of([(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]),
        itl=Summary.of([gap for r in done for gap in r.itl]),
        e2e=Summary.of([r.latency for r in done]),
        errors=list(dict.fromkeys(r.error for r in results if not r.ok))[:5],
        stats_polls=polls,
    )


async def _poll_stats(root: str, headers: dict, every_s: float, polls: list[float]) -> None:
    """What an open dashboard does: GET /api/stats, read the JSON, wait; the time each answer took
    goes to `polls`. A client of its own, as a browser tab would be."""
    async with httpx.AsyncClient(base_url=root, headers=headers, timeout=httpx.Timeout(30.0)) as client:
        while True:
            sent = time.perf_counter()
            response = await client.get("/api/stats")
            if response.status_code != 200:
                raise LLMasOSError(
                    f"GET {root}/api/stats answered {response.status_code}: {response.text[:300]}"
                )
            response.json()
            polls.append(time.perf_counter() - sent)
            await asyncio.sleep(every_s)


@dataclass
class Watched:
    """The same load without and with a dashboard polling, in pairs whose order alternates (AB, BA,
    AB, ...) so that the machine's drift (warm-up, other processes' load) weighs on both alike."""

    plain: list[ServeBenchResult]
    polled: list[ServeBenchResult]

    @property
    def ratio(self) -> float:
        """Output throughput with / without, each pooled over its runs (tokens / seconds)."""
        return _pooled(self.polled) / _pooled(self.plain)


def _pooled(runs: list[ServeBenchResult]) -> float:
    return sum(r.output_tokens for r in runs) / sum(r.duration for r in runs)


def watch_cost(pairs: int, poll_stats_s: float = 1.0, **load: object) -> Watched:
    """`run_serve_bench(**load)` 2 * `pairs` times, half of them with GET /api/stats every
    `poll_stats_s` seconds meanwhile."""
    watched = Watched([], [])
    for i in range(pairs):
        for polling in (False, True) if i % 2 == 0 else (True, False):
            run = run_serve_bench(**load, poll_stats_s=poll_stats_s if polling else None)
            (watched.polled if polling else watched.plain).append(run)
    return watched


async def _stream(client: httpx.AsyncClient, url: str, payload: dict, headers: dict) -> RequestResult:
    """One streamed request. The clock is read as soon as a line arrives, before parsing it."""
    result = RequestResult(ok=False)
    chunks = 0
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                return RequestResult(ok=False, error=f"HTTP {response.status_code}: {body[:300]}")
            async for line in response.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return RequestResult(
                        ok=False, error=f"error in stream: {json.dumps(chunk['error'])[:300]}"
                    )
                if any(choice.get("text") for choice in chunk.get("choices") or []):
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    chunks, last = chunks + 1, now
                if usage := chunk.get("usage"):
                    result.prompt_tokens = usage["prompt_tokens"]
                    result.output_tokens = usage["completion_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        return RequestResult(ok=False, error=f"{type(e).__name__}: {e}")
    if chunks == 0:
        return RequestResult(ok=False, error="the stream carried no text")
    result.ok = True
    result.latency = last - start
    result.output_tokens = result.output_tokens or chunks  # a server without usage: one token per chunk
    return result


def offline_throughput(
    model: str,
    num_requests: int,
    prompt_len: int,
    output_len: int,
    max_concurrency: int | None,
    seed: int = 0,
    **config: object,
) -> float:
    """Generated tokens per second of the same requests (the same warm-up first, untimed) through
    `LLM.generate`, at most `max_concurrency` sequences at once: the ceiling the server is held
    to. `config` goes to the engine (e.g. device="cpu")."""
    from llmasos import LLM, SamplingParams

    if max_concurrency:
        config["max_num_seqs"] = max_concurrency
    llm = LLM(model, **config)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    warmup, *prompts = make_prompts(num_requests + 1, prompt_len, seed)
    llm.generate([warmup], params)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    return sum(len(o.outputs[0].token_ids) for o in outputs) / (time.perf_counter() - start)


def format_table(
    result: ServeBenchResult,
    offline_tok_s: float | None = None,
    output: Path | None = None,
    watched: Watched | None = None,
) -> list[Row]:
    """Print the one table of the run (and write it as Markdown to `output` if given). The kernel's
    row carries the ratio server / kernel in the speed-up column; the dashboard's (`watched`), the
    ratio with / without polling."""
    server = "LLMasOS server"
    done = f"{result.completed} done, {result.failed} failed in {result.duration:.1f} s"
    rows = [Row("G3 output throughput", server, result.output_throughput, "tok/s", done)]
    if watched is not None:
        polls = [t for run in watched.polled for t in run.stats_polls]
        pairs = [a.output_throughput / b.output_throughput for a, b in zip(watched.polled, watched.plain)]
        note = (
            f"{len(pairs)} pairs, order alternating; pooled without: {_pooled(watched.plain):.1f} tok/s; "
            f"pair ratios {min(pairs):.3f}-{max(pairs):.3f}; {len(polls)} polls of /api/stats, "
            f"p50 {Summary.of(polls).p50 * 1000:.1f} ms; speed-up = with / without, goal >= 0.98"
        )
        system = "LLMasOS server, dashboard polling"
        rows.append(
            Row("G3 output throughput", system, _pooled(watched.polled), "tok/s", note, watched.ratio)
        )
    if offline_tok_s:
        note = "the same requests via LLM.generate; speed-up = server / kernel, goal >= 0.90"
        ratio = result.output_throughput / offline_tok_s
        rows.append(
            Row("G3 output throughput", "LLMasOS kernel, offline", offline_tok_s, "tok/s", note, ratio)
        )
    rows.append(Row("G3 request throughput", server, result.request_throughput, "req/s"))
    for name, summary in (("TTFT", result.ttft), ("TPOT", result.tpot), ("ITL", result.itl)):
        note = f"mean {summary.mean * 1000:.1f} ms, p99 {summary.p99 * 1000:.1f} ms, {summary.count} samples"
        rows.append(Row(f"G3 {name} p50", server, summary.p50 * 1000, "ms", note))
    concurrency = result.max_concurrency or "unlimited"
    notes = [
        f"{result.num_requests} requests of {result.prompt_len} words -> {result.output_len} tokens "
        f"(server counted {result.prompt_tokens / max(result.completed, 1):.0f} prompt tokens each), "
        f"request rate {result.request_rate}/s, max concurrency {concurrency}",
        *[f"failed: {error}" for error in result.errors],
        *[
            f"failed (dashboard polling): {e}"
            for run in (watched.polled if watched else [])
            for e in run.errors
        ],
    ]
    report(rows, result.model, notes, output)
    return rows
