"""`llmasos bench guards`: the shape and sanity of its figures (never their size: the machine is
shared), the texts it measures on, and the with/without-guards load against real servers."""

from typer.testing import CliRunner

from llmasos.bench.guards import (
    ALL_GUARDS,
    STAGES,
    GuardBenchResult,
    deltas,
    format_table,
    make_texts,
    measure_latency,
    measure_throughput,
)
from llmasos.cli import app
from llmasos.safety import GuardPipeline, Policy, default_guards

PII_AND_SECRETS = {
    g for guard in default_guards() if guard.name in ("pii", "secrets") for g in guard.categories
}


def test_texts_with_pii_carry_some_and_texts_without_carry_none():
    pipeline = GuardPipeline(default_guards(), Policy())
    for answers in (False, True):
        with_pii = [pipeline.check_input(t).findings for t in make_texts(20, True, answers)]
        assert all(with_pii) and {f.category for fs in with_pii for f in fs} <= PII_AND_SECRETS
        assert not any(pipeline.check_input(t).findings for t in make_texts(20, False, answers))
    text = make_texts(1, True, answers=True)[0]
    assert "".join(deltas(text)) == text and max(len(d.strip()) for d in deltas(text)) <= 4


def test_latency_covers_every_guard_stage_and_kind_of_text():
    latencies = measure_latency(3)
    systems = [guard.name for guard in default_guards()] + [ALL_GUARDS]
    assert [(lat.stage, lat.pii, lat.system) for lat in latencies] == [
        (stage, pii, system) for stage in STAGES for pii in (True, False) for system in systems
    ]
    for lat in latencies:
        assert lat.per_request.count == 3 and 0 < lat.per_request.p50 <= lat.per_request.p99
        assert (lat.per_delta is not None) == (lat.stage == "streamed output") and lat.mean_chars > 100
        if lat.per_delta is not None:
            assert lat.per_delta.count > 3 * 20 and lat.per_delta.p99 <= lat.per_request.p99


def test_the_same_load_runs_against_a_server_without_and_with_guards(store, tmp_path):
    plain, guarded, verdicts = measure_throughput(
        "tiny", None, num_requests=4, max_concurrency=2, prompt_len=8, output_len=4,
        serve_flags=["--kv-cache-gib", "0.01"],
    )  # fmt: skip
    for run in (plain, guarded):
        assert (run.completed, run.failed, run.output_tokens) == (4, 0, 16)
    assert verdicts == 2 * (4 + 1)  # input and output of each request, the untimed test one too
    result = GuardBenchResult("tiny", measure_latency(2), plain, guarded, verdicts)
    assert result.throughput_ratio == guarded.output_throughput / plain.output_throughput > 0
    rows = format_table(result, tmp_path / "guards.md")
    throughput = [row for row in rows if row.workload == "G3 output throughput"]
    assert [row.system for row in throughput] == ["LLMasOS server, no guards", "LLMasOS server, guard policy"]
    assert throughput[0].speedup is None and throughput[1].speedup == result.throughput_ratio
    assert "| G3 output throughput | LLMasOS server, guard policy |" in (tmp_path / "guards.md").read_text()


def test_the_command_prints_and_writes_the_table(tmp_path):
    output = tmp_path / "guards.md"
    result = CliRunner().invoke(
        app, ["bench", "guards", "--texts", "2", "--no-throughput", "--output", str(output)]
    )
    assert result.exit_code == 0, result.output
    table = output.read_text()
    assert table.count("| guards p50, ") == len(STAGES) * 2 * (len(default_guards()) + 1)
    assert "G3" not in table


def test_the_labelled_mode_prints_precision_and_recall_per_format_and_provider(tmp_path):
    from llmasos.bench.guards import measure_labelled
    from llmasos.bench.secrets_labelled import labelled_cases

    output = tmp_path / "labelled.md"
    result = CliRunner().invoke(app, ["bench", "guards", "--labelled", "--output", str(output)])
    assert result.exit_code == 0, result.output
    table = output.read_text()
    cases = labelled_cases()
    for fmt in {c.format for c in cases}:
        assert f"| secrets, {fmt} | precision |" in table and f"| secrets, {fmt} | recall |" in table
    for provider in {c.provider for c in cases if c.provider}:
        assert f"| secrets, provider {provider} | recall |" in table
    total = measure_labelled().total
    assert f"| secrets, all formats | recall | {total.recall * 100:.1f} % |" in table
    assert f"{total.positives} positives, {total.negatives} negatives" in table
    assert "guards p50" not in table and "G3" not in table
