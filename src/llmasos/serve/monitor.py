"""The live numbers of a running server, kept as events happen, for GET /api/stats (serve/stats.py).

The Gateway calls a hook where a request is admitted or refused, where its tokens are charged to its
key, where each DELTA output arrives (beside `ServerMetrics.observe_delta`) and where a guard verdict
is audited. Each hook is O(1) and allocates next to nothing, because it runs on the path of every
token: a tokens/s series is a ring of per-second counters, a latency window a bounded deque. The
work of reading (a series, sorting a window for its percentiles) is done by the reader, once per
snapshot, so a dashboard polling every second costs the token path nothing.

Everything runs on the event loop except `guard_verdict`, which the input guards call from a worker
thread (the gateway checks prompts off the loop): the guard tallies alone take a lock.

Prometheus histograms (/metrics) cannot answer "p99 over the last minute" and their buckets blur
small latencies, so the windows here keep the samples themselves (the newest `max_samples`).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from llmasos.outputs import RequestOutput
from llmasos.serve.keys import ApiKey
from llmasos.serve.metrics import OutputProgress

WINDOW_S = 300  # the tokens/s series: the last 5 minutes, one point per second
LATENCY_WINDOW_S = 60  # percentiles over the last minute
MAX_SAMPLES = 20_000  # latency samples kept per window at most (the newest): bounds memory and sorting
RATE_OVER_S = 10  # the headline tokens/s: the mean of the last complete seconds
PERCENTILES = (50, 90, 99)


class PerSecond:
    """Counts per second over the last `seconds` seconds: a ring of counters, each stamped with the
    second it counts, so that a slot left from an older lap reads as zero. O(1) to add."""

    def __init__(self, seconds: int):
        self.seconds = seconds
        self.counts = [0] * seconds
        self.stamps = [-1] * seconds
        self.total = 0  # since the start

    def add(self, now: float, count: int) -> None:
        second = int(now)
        slot = second % self.seconds
        if self.stamps[slot] != second:
            self.stamps[slot], self.counts[slot] = second, 0
        self.counts[slot] += count
        self.total += count

    def series(self, now: float) -> list[int]:
        """Oldest first; the last point is the second in progress."""
        last = int(now)
        return [
            self.counts[s % self.seconds] if self.stamps[s % self.seconds] == s else 0
            for s in range(last - self.seconds + 1, last + 1)
        ]


class Recent:
    """The samples of the last `seconds` seconds (at most `max_samples`, the newest), for percentiles."""

    def __init__(self, seconds: float, max_samples: int):
        self.seconds = seconds
        self.samples: deque[tuple[float, float]] = deque(maxlen=max_samples)

    def add(self, now: float, value: float) -> None:
        self.samples.append((now, value))

    def percentiles(self, now: float) -> dict:
        """p50, p90 and p99 (seconds; None when there is no sample) and the number of samples."""
        while self.samples and self.samples[0][0] <= now - self.seconds:
            self.samples.popleft()
        values = [value for _, value in self.samples]
        figures = np.percentile(values, PERCENTILES).tolist() if values else [None] * len(PERCENTILES)
        return {**{f"p{p}": f for p, f in zip(PERCENTILES, figures)}, "count": len(values)}


@dataclass
class KeyUsage:
    """One key's calls since the server started (key None: the calls of an open server)."""

    requests: int = 0  # admitted
    tokens: int = 0  # prompt + completion, as charged
    rate_limited: int = 0  # refused with a 429 (rate limit or budget)


class Monitor:
    """The collector the Gateway owns; `clock` (seconds, monotonic) is replaceable for tests."""

    def __init__(
        self,
        window_s: int = WINDOW_S,
        latency_window_s: float = LATENCY_WINDOW_S,
        max_samples: int = MAX_SAMPLES,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.clock = clock
        self.prefill = PerSecond(window_s)  # prompt tokens computed
        self.cached = PerSecond(window_s)  # prompt tokens taken from the prefix cache
        self.decode = PerSecond(window_s)  # tokens generated
        self.ttft = Recent(latency_window_s, max_samples)
        self.itl = Recent(latency_window_s, max_samples)
        self.keys: dict[str | None, KeyUsage] = {}
        self.queue_full = 0  # 503s: a model's queue had no room
        self._guard_lock = threading.Lock()
        self._verdicts: dict[str, Counter] = {}  # stage -> action -> verdicts
        self._categories: dict[str, Counter] = {}  # category -> action -> verdicts that found it

    # -- hooks (the Gateway's) ----------------------------------------------------------------------
    def admitted(self, key: ApiKey | None) -> None:
        self._usage(key).requests += 1

    def refused(self, key: ApiKey | None, status: int) -> None:
        """A 429 (the key's limits) or a 503 (the model's queue is full)."""
        if status == 429:
            self._usage(key).rate_limited += 1
        else:
            self.queue_full += 1

    def charged(self, key: ApiKey | None, tokens: int) -> None:
        self._usage(key).tokens += tokens

    def observe_delta(self, delta: RequestOutput, before: OutputProgress | None, now: OutputProgress) -> None:
        """With what `ServerMetrics.observe_delta` returned for this delta (`now`) and for the previous
        one of the request (`before`). Prompt tokens count when the first tokens arrive (the prefill
        is done then), as vLLM counts them; latencies come from the engine's timestamps."""
        clock = self.clock()
        had = before.num_tokens if before is not None else 0
        new_tokens = now.num_tokens - had
        if new_tokens <= 0:
            return
        self.decode.add(clock, new_tokens)
        times = now.metrics
        if had == 0:
            cached = delta.num_cached_tokens
            self.cached.add(clock, cached)
            self.prefill.add(clock, len(delta.prompt_token_ids) - cached)
            if times is not None and times.first_token_time is not None:
                self.ttft.add(clock, times.first_token_time - times.arrival_time)
        gap, gaps = now.token_gaps(before)
        for _ in range(gaps):
            self.itl.add(clock, gap)

    def guard_verdict(self, record: dict) -> None:
        """A guard verdict's audit record (`Verdict.audit_record`); called from worker threads too."""
        with self._guard_lock:
            self._verdicts.setdefault(record["stage"], Counter())[record["action"]] += 1
            for category, found in record["categories"].items():
                self._categories.setdefault(category, Counter())[found["action"]] += 1

    # -- reading (once per snapshot) ----------------------------------------------------------------
    def traffic(self) -> dict:
        """Tokens per second, latency percentiles and the prefix cache's share of prompt tokens."""
        now = self.clock()
        series = {
            name: counter.series(now)
            for name, counter in (("prefill", self.prefill), ("cached", self.cached), ("decode", self.decode))
        }
        computed, cached = sum(series["prefill"]), sum(series["cached"])
        return {
            "tokens": {
                "window_s": self.prefill.seconds,
                "resolution_s": 1,
                **series,
                "per_s": {
                    name: sum(points[-RATE_OVER_S - 1 : -1]) / RATE_OVER_S for name, points in series.items()
                },
                "totals": {
                    "prefill": self.prefill.total,
                    "cached": self.cached.total,
                    "decode": self.decode.total,
                },
            },
            "latency": {
                "window_s": self.ttft.seconds,
                "ttft_s": self.ttft.percentiles(now),
                "itl_s": self.itl.percentiles(now),
            },
            "prefix_cache_hit_rate": cached / (computed + cached) if computed + cached else None,
        }

    def guards(self) -> dict:
        with self._guard_lock:
            return {
                "verdicts": {stage: dict(actions) for stage, actions in sorted(self._verdicts.items())},
                "categories": {c: dict(actions) for c, actions in sorted(self._categories.items())},
            }

    def _usage(self, key: ApiKey | None) -> KeyUsage:
        name = key.name if key is not None else None
        usage = self.keys.get(name)
        if usage is None:
            usage = self.keys[name] = KeyUsage()
        return usage
