"""GET /metrics: vLLM's Prometheus metrics under an `llmasos:` prefix, one series per model.

Every figure comes from timestamps the engine took (RequestMetrics, all time.monotonic()) or from
its running totals (EngineStats), never from clocks read in the HTTP layer, so the numbers say
what the engine did and not how long FastAPI took to hand an output over. Dashboards written for
vLLM work after replacing `vllm:` with `llmasos:`.

Counting follows vLLM v1: prompt tokens are counted once a request has its first token (its
prefill is done), generation tokens as they stream, and a request counts as a success when its
finished output arrives, labelled with its finish reason ("stop", "length" or "abort").

Speculative decoding's counters are vLLM's spec_decode ones, for the models whose engine drafts:
acceptance rate = accepted_tokens / draft_tokens, tokens per forward = 1 + accepted_tokens / drafts
(a draft here is one sequence's verify step).
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from llmasos.kernel.engine import EngineStats
from llmasos.outputs import RequestMetrics, RequestOutput

# vLLM's buckets, so that the same dashboards and SLO thresholds apply
# fmt: off
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0]
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
# fmt: on
PREFIX = "llmasos:"


@dataclass
class _Totals:
    """The engine's running totals at the last update, to turn them into counter increments."""

    num_preemptions: int = 0
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0
    prefix_disk_hit_tokens: int = 0
    spec_drafts: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0


class ServerMetrics:
    """The server's metrics, in a registry of their own (not prometheus_client's global one), so
    that a process can hold several servers, and tests can make as many as they like."""

    def __init__(self):
        self.registry = CollectorRegistry()
        model = ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(PREFIX + name, doc, model, registry=self.registry)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, [*model, *extra], registry=self.registry)

        def histogram(name: str, doc: str, buckets: list[float]) -> Histogram:
            return Histogram(PREFIX + name, doc, model, buckets=buckets, registry=self.registry)

        self.running = gauge("num_requests_running", "Number of requests in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Number of requests waiting to be scheduled.")
        self.kv_cache_usage = gauge("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.preemptions = counter("num_preemptions", "Cumulative number of preemptions from the engine.")
        self.prefix_queries = counter(
            "prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."
        )
        self.prefix_hits = counter(
            "prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        )
        self.prefix_disk_hits = counter(
            "prefix_cache_disk_hits",
            "Prefix cache hits read back from the disk cache (kv_disk_cache_gb), in tokens.",
        )
        self.kv_disk_cache_bytes = gauge(
            "kv_disk_cache_bytes", "Bytes of KV blocks in the disk cache's folder (0 without one)."
        )
        # speculative decoding, only for the models whose engine drafts (vLLM's names)
        self.spec_counters = {
            field_name: counter("spec_decode_" + name, doc)
            for field_name, name, doc in (
                ("spec_drafts", "num_drafts", "Number of spec decoding drafts (sequence verify steps)."),
                ("spec_draft_tokens", "num_draft_tokens", "Number of draft tokens."),
                ("spec_accepted_tokens", "num_accepted_tokens", "Number of accepted tokens."),
            )
        }
        self._speculating: set[str] = set()  # models with spec_decode series, to remove them
        self.prompt_tokens = counter("prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Number of generation tokens processed.")
        self.request_success = counter(
            "request_success", "Count of successfully processed requests.", ("finished_reason",)
        )
        self.ttft = histogram(
            "time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self.itl = histogram(
            "inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.queue_time = histogram(
            "request_queue_time_seconds",
            "Histogram of time spent waiting before first scheduled, in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        self._per_model = (
            self.running,
            self.waiting,
            self.kv_cache_usage,
            self.preemptions,
            self.prefix_queries,
            self.prefix_hits,
            self.prefix_disk_hits,
            self.kv_disk_cache_bytes,
            self.prompt_tokens,
            self.generation_tokens,
            self.ttft,
            self.itl,
            self.e2e,
            self.queue_time,
        )  # every metric labelled by model alone
        # agents (kernel processes), a series per model and agent, from EngineStats.agents
        self.agent_gauges = {
            field_name: Gauge(PREFIX + "agent_" + name, doc, [*model, "agent"], registry=self.registry)
            for field_name, name, doc in (
                ("blocks", "kv_blocks", "KV-cache blocks the agent holds, pinned ones included."),
                ("pinned", "pinned_blocks", "KV-cache blocks kept pinned for the agent's next turn."),
                ("swapped", "swapped_blocks", "The agent's blocks swapped out to CPU memory."),
                ("turns", "turns", "The agent's finished turns (sequences)."),
                ("attained_service", "attained_service_tokens", "Tokens computed for the agent."),
            )
        }
        self._agents: dict[str, set[str]] = {}  # agents seen per model, to remove their series
        self._totals: dict[str, _Totals] = {}  # the models seen, and their engine totals at the last update
        self._reasons: dict[str, set[str]] = {}  # finish reasons seen per model, to remove their series

    def observe_delta(
        self, model: str, delta: RequestOutput, before: OutputProgress | None
    ) -> OutputProgress:
        """Call with every DELTA RequestOutput the server receives and what this returned for the
        request's previous one (None for its first); returns what to pass with the next. Between the
        two: new tokens, and the inter-token latency spread evenly over them (the engine may have
        stepped more than once in between)."""
        counts = dict(before.tokens) if before is not None else {}
        for completion in delta.outputs:
            counts[completion.index] = counts.get(completion.index, 0) + len(completion.token_ids)
        now = OutputProgress(counts, delta.metrics)
        self._observe(model, delta, now, before)
        return now

    def _observe(
        self, model: str, output: RequestOutput, now: OutputProgress, before: OutputProgress | None
    ) -> None:
        self._see(model)
        new_tokens = now.num_tokens - (before.num_tokens if before else 0)
        if new_tokens > 0:
            self.generation_tokens.labels(model).inc(new_tokens)
        if (before is None or before.num_tokens == 0) and now.num_tokens > 0:
            self.prompt_tokens.labels(model).inc(len(output.prompt_token_ids))
        gap, gaps = now.token_gaps(before)
        for _ in range(gaps):
            self.itl.labels(model).observe(gap)
        if output.finished:
            self._observe_finished(model, output)

    def _observe_finished(self, model: str, output: RequestOutput) -> None:
        reason = output.outputs[0].finish_reason if output.outputs else None
        reason = reason or "abort"
        self._reasons.setdefault(model, set()).add(reason)
        self.request_success.labels(model, reason).inc()
        times = output.metrics
        if times is None:
            return
        if times.first_token_time is not None:
            self.ttft.labels(model).observe(times.first_token_time - times.arrival_time)
        if times.first_scheduled_time is not None:
            self.queue_time.labels(model).observe(times.first_scheduled_time - times.arrival_time)
        if times.finished_time is not None:
            self.e2e.labels(model).observe(times.finished_time - times.arrival_time)

    def update_engine(self, model: str, stats: EngineStats) -> None:
        """Gauges from the engine's state now; counters grow by what its totals grew since the last
        update of this model. Totals lower than last time mean a new engine (the model was
        reloaded): its totals count from zero, so all of them are new."""
        self.running.labels(model).set(stats.num_running)
        self.waiting.labels(model).set(stats.num_waiting)
        self.kv_cache_usage.labels(model).set(stats.kv_cache_usage)
        self.kv_disk_cache_bytes.labels(model).set(stats.kv_disk_cache_bytes or 0)
        self._see(model)
        for agent, row in stats.agents.items():
            for field_name, metric in self.agent_gauges.items():
                metric.labels(model, agent).set(getattr(row, field_name))
        self._agents.setdefault(model, set()).update(stats.agents)
        last = self._totals[model]
        spec = stats.speculative
        now = _Totals(
            stats.num_preemptions,
            stats.prefix_queried_tokens,
            stats.prefix_hit_tokens,
            stats.prefix_disk_hit_tokens,
            *((spec.num_drafts, spec.num_draft_tokens, spec.num_accepted_tokens) if spec else ()),
        )
        if any(a < b for a, b in zip(astuple(now), astuple(last))):
            last = _Totals()
        self.preemptions.labels(model).inc(now.num_preemptions - last.num_preemptions)
        self.prefix_queries.labels(model).inc(now.prefix_queried_tokens - last.prefix_queried_tokens)
        self.prefix_hits.labels(model).inc(now.prefix_hit_tokens - last.prefix_hit_tokens)
        self.prefix_disk_hits.labels(model).inc(now.prefix_disk_hit_tokens - last.prefix_disk_hit_tokens)
        if spec is not None:
            self._speculating.add(model)
            for field_name, metric in self.spec_counters.items():
                metric.labels(model).inc(getattr(now, field_name) - getattr(last, field_name))
        self._totals[model] = now

    def forget_model(self, model: str) -> None:
        """Remove the unloaded model's series, so that /metrics lists only models being served."""
        if self._totals.pop(model, None) is None:
            return
        for metric in self._per_model:
            metric.remove(model)
        for reason in self._reasons.pop(model, set()):
            self.request_success.remove(model, reason)
        for agent in self._agents.pop(model, set()):
            for metric in self.agent_gauges.values():
                metric.remove(model, agent)
        if model in self._speculating:
            self._speculating.remove(model)
            for metric in self.spec_counters.values():
                metric.remove(model)

    def _see(self, model: str) -> None:
        """Create every series of a model the first time it is seen, at zero, so that rate() and
        dashboards have a starting point instead of a series that appears with its first event."""
        if model not in self._totals:
            self._totals[model] = _Totals()
            for metric in self._per_model:
                metric.labels(model)

    def render(self) -> tuple[bytes, str]:
        """The body and content type of GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


@dataclass
class OutputProgress:
    """How far one request's outputs have come: tokens per completion index, the latest timestamps."""

    tokens: dict[int, int]
    metrics: RequestMetrics | None

    @property
    def num_tokens(self) -> int:
        return sum(self.tokens.values())

    @property
    def steps(self) -> int:
        """Engine steps that produced tokens: with n > 1 every sequence gains one token per step."""
        return max(self.tokens.values(), default=0)

    def token_gaps(self, before: OutputProgress | None) -> tuple[float, int]:
        """The inter-token latency since `before` (the request's previous progress), spread evenly over
        the engine steps in between, for the engine may have stepped more than once: (seconds per gap,
        number of gaps). Measured from the previous output's newest token, or from the very first token."""
        times = self.metrics
        if times is None or times.last_token_time is None or self.steps <= 1:
            return 0.0, 0
        had_tokens = before is not None and before.metrics is not None and before.steps > 0
        since, steps_before = (
            (before.metrics.last_token_time, before.steps) if had_tokens else (times.first_token_time, 1)
        )
        gaps = self.steps - steps_before
        return ((times.last_token_time - since) / gaps, gaps) if gaps > 0 else (0.0, 0)
