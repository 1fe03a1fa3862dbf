"""ServerMetrics: synthetic engine outputs and stats in, exact Prometheus text out."""

import dataclasses

import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmasos import LLM, SamplingParams
from llmasos.kernel.core import AgentStats, EngineStats
from llmasos.kernel.speculative import SpeculativeStats
from llmasos.outputs import CompletionOutput, RequestMetrics, RequestOutput, RequestOutputKind
from llmasos.serve.metrics import OutputProgress, ServerMetrics

from tiny import save_tiny_model


def samples(metrics: ServerMetrics) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of everything render() exposes."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(metrics: ServerMetrics, name: str, model: str = "m", **labels: str) -> float:
    return samples(metrics)[(name, tuple(sorted({"model_name": model, **labels}.items())))]


def output(tokens: int, *, finished: bool = False, last: float | None = None, reason: str | None = None):
    """Request "r": 5 prompt tokens, arrived at 10.0, scheduled at 10.5, first token at 11.0."""
    times = RequestMetrics(
        arrival_time=10.0,
        first_scheduled_time=10.5,
        first_token_time=11.0 if tokens else None,
        finished_time=last if finished else None,
        num_preemptions=0,
        last_token_time=last,
    )
    completion = CompletionOutput(0, "x" * tokens, list(range(tokens)), reason if finished else None)
    return RequestOutput("r", "hello", [1, 2, 3, 4, 5], [completion], finished, metrics=times)


def observe(metrics: ServerMetrics, model: str, stream: list[RequestOutput]) -> None:
    """Feed one request's outputs, written cumulative here, as the deltas the server's engine gives."""
    progress, sent = None, 0
    for out in stream:
        completion = dataclasses.replace(out.outputs[0], token_ids=out.outputs[0].token_ids[sent:])
        sent = len(out.outputs[0].token_ids)
        progress = metrics.observe_delta(model, dataclasses.replace(out, outputs=[completion]), progress)


def stats(running=2, waiting=1, usage=0.25, preemptions=0, queried=0, hits=0) -> EngineStats:
    return EngineStats(running, waiting, usage, preemptions, queried, hits)


def test_one_request_streamed_token_by_token():
    metrics = ServerMetrics()
    stream = [
        output(1, last=11.0),
        output(2, last=11.5),
        output(4, last=12.5),  # two steps in one output: 0.5 s each
        output(5, finished=True, last=13.0, reason="length"),
    ]
    observe(metrics, "m", stream)

    assert value(metrics, "llmasos:prompt_tokens_total") == 5
    assert value(metrics, "llmasos:generation_tokens_total") == 5
    assert value(metrics, "llmasos:request_success_total", finished_reason="length") == 1
    assert value(metrics, "llmasos:inter_token_latency_seconds_count") == 4
    assert value(metrics, "llmasos:inter_token_latency_seconds_sum") == pytest.approx(2.0)
    assert value(metrics, "llmasos:inter_token_latency_seconds_bucket", le="0.5") == 4
    assert value(metrics, "llmasos:inter_token_latency_seconds_bucket", le="0.4") == 0
    assert value(metrics, "llmasos:time_to_first_token_seconds_count") == 1
    assert value(metrics, "llmasos:time_to_first_token_seconds_sum") == pytest.approx(1.0)
    assert value(metrics, "llmasos:request_queue_time_seconds_sum") == pytest.approx(0.5)
    assert value(metrics, "llmasos:e2e_request_latency_seconds_sum") == pytest.approx(3.0)
    assert value(metrics, "llmasos:e2e_request_latency_seconds_bucket", le="2.5") == 0
    assert value(metrics, "llmasos:e2e_request_latency_seconds_bucket", le="5.0") == 1


def test_a_single_output_with_several_tokens_measures_from_the_first_token():
    metrics = ServerMetrics()
    observe(metrics, "m", [output(3, finished=True, last=12.0, reason="stop")])
    assert value(metrics, "llmasos:inter_token_latency_seconds_count") == 2
    assert value(metrics, "llmasos:inter_token_latency_seconds_sum") == pytest.approx(1.0)
    assert value(metrics, "llmasos:request_success_total", finished_reason="stop") == 1


def test_request_aborted_before_its_first_token():
    metrics = ServerMetrics()
    aborted = output(0, finished=True, reason="abort")
    aborted.metrics.first_scheduled_time = None
    aborted.metrics.finished_time = 10.25
    observe(metrics, "m", [aborted])

    assert value(metrics, "llmasos:request_success_total", finished_reason="abort") == 1
    assert value(metrics, "llmasos:prompt_tokens_total") == 0  # never prefilled
    assert value(metrics, "llmasos:time_to_first_token_seconds_count") == 0
    assert value(metrics, "llmasos:request_queue_time_seconds_count") == 0
    assert value(metrics, "llmasos:e2e_request_latency_seconds_sum") == pytest.approx(0.25)


def test_engine_stats_set_gauges_and_grow_counters_by_differences():
    metrics = ServerMetrics()
    metrics.update_engine("m", stats(preemptions=2, queried=100, hits=40))
    metrics.update_engine("m", stats(running=3, waiting=0, usage=0.5, preemptions=3, queried=160, hits=72))

    assert value(metrics, "llmasos:num_requests_running") == 3
    assert value(metrics, "llmasos:num_requests_waiting") == 0
    assert value(metrics, "llmasos:kv_cache_usage_perc") == 0.5
    assert value(metrics, "llmasos:num_preemptions_total") == 3
    assert value(metrics, "llmasos:prefix_cache_queries_total") == 160
    assert value(metrics, "llmasos:prefix_cache_hits_total") == 72

    metrics.update_engine("m", stats(preemptions=1, queried=10, hits=5))  # a reloaded engine counts from 0
    assert value(metrics, "llmasos:num_preemptions_total") == 4
    assert value(metrics, "llmasos:prefix_cache_queries_total") == 170
    assert value(metrics, "llmasos:prefix_cache_hits_total") == 77


def test_agents_get_a_series_each_until_their_model_is_forgotten():
    metrics = ServerMetrics()
    row = AgentStats(blocks=5, pinned=3, swapped=2, turns=4, attained_service=120, running=1, waiting=0)
    metrics.update_engine("m", EngineStats(1, 0, 0.1, 0, 0, 0, agents={"planner": row}))
    for name, expected in [("kv_blocks", 5), ("pinned_blocks", 3), ("swapped_blocks", 2), ("turns", 4)]:
        assert value(metrics, f"llmasos:agent_{name}", model="m", agent="planner") == expected
    assert value(metrics, "llmasos:agent_attained_service_tokens", model="m", agent="planner") == 120
    metrics.forget_model("m")
    assert not [s for s, labels in samples(metrics) if dict(labels).get("agent")]


def test_speculative_counters_only_for_drafting_engines_grow_by_differences():
    metrics = ServerMetrics()
    metrics.update_engine("plain", stats())
    metrics.update_engine("m", dataclasses.replace(stats(), speculative=SpeculativeStats(4, 16, 9)))
    metrics.update_engine("m", dataclasses.replace(stats(), speculative=SpeculativeStats(10, 40, 30)))
    assert value(metrics, "llmasos:spec_decode_num_drafts_total") == 10
    assert value(metrics, "llmasos:spec_decode_num_draft_tokens_total") == 40
    assert value(metrics, "llmasos:spec_decode_num_accepted_tokens_total") == 30
    plain = [
        name for name, labels in samples(metrics) if "spec" in name and dict(labels)["model_name"] == "plain"
    ]
    assert not plain

    reloaded = SpeculativeStats(1, 4, 2)
    metrics.update_engine("m", dataclasses.replace(stats(), speculative=reloaded))
    assert value(metrics, "llmasos:spec_decode_num_accepted_tokens_total") == 32
    metrics.forget_model("m")
    assert not [name for name, _ in samples(metrics) if "spec" in name]


def test_models_are_counted_apart_and_forgotten():
    metrics = ServerMetrics()
    metrics.update_engine("a", stats(queried=10))
    metrics.update_engine("b", stats(queried=7))
    metrics.update_engine("a", stats(queried=12))
    observe(metrics, "a", [output(2, finished=True, last=11.5, reason="stop")])
    observe(metrics, "b", [output(1, finished=True, last=11.0, reason="length")])
    assert value(metrics, "llmasos:prefix_cache_queries_total", model="a") == 12
    assert value(metrics, "llmasos:prefix_cache_queries_total", model="b") == 7

    metrics.forget_model("a")
    models = {dict(labels).get("model_name") for _, labels in samples(metrics)}
    assert models == {"b"}
    assert value(metrics, "llmasos:request_success_total", model="b", finished_reason="length") == 1

    metrics.update_engine("a", stats(queried=3))  # loaded again: a fresh series
    assert value(metrics, "llmasos:prefix_cache_queries_total", model="a") == 3
    metrics.forget_model("never-loaded")


def test_registries_are_separate():
    first, second = ServerMetrics(), ServerMetrics()
    first.update_engine("m", stats(preemptions=5))
    assert value(first, "llmasos:num_preemptions_total") == 5
    assert ("llmasos:num_preemptions_total", (("model_name", "m"),)) not in samples(second)


def test_real_engine_outputs_add_up(tmp_path):
    """The engine's own outputs: one ITL per token after the first, spanning first to last token."""
    llm = LLM(str(save_tiny_model(tmp_path, "llama")), device="cpu", block_size=4, num_kv_blocks=64)
    engine, metrics = llm.engine, ServerMetrics()
    params = SamplingParams(max_tokens=6, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    ids = [engine.add_request(p, params) for p in ("Hi", "Hello there")]
    progress: dict[str, OutputProgress] = {}
    finals = []
    while engine.has_unfinished():
        for out in engine.step():
            progress[out.request_id] = metrics.observe_delta("tiny", out, progress.get(out.request_id))
            finals += [out] if out.finished else []
        metrics.update_engine("tiny", engine.stats())

    assert sorted(o.request_id for o in finals) == sorted(ids)
    assert value(metrics, "llmasos:generation_tokens_total", "tiny") == 12
    assert value(metrics, "llmasos:prompt_tokens_total", "tiny") == sum(
        len(o.prompt_token_ids) for o in finals
    )
    assert value(metrics, "llmasos:inter_token_latency_seconds_count", "tiny") == 10
    spans = sum(o.metrics.last_token_time - o.metrics.first_token_time for o in finals)
    assert value(metrics, "llmasos:inter_token_latency_seconds_sum", "tiny") == pytest.approx(spans)
    ttfts = sum(o.metrics.first_token_time - o.metrics.arrival_time for o in finals)
    assert value(metrics, "llmasos:time_to_first_token_seconds_sum", "tiny") == pytest.approx(ttfts)
    assert value(metrics, "llmasos:request_success_total", "tiny", finished_reason="length") == 2
    assert value(metrics, "llmasos:num_requests_running", "tiny") == 0
