"""`llmasos bench` (C1-C4): every system runs in a process of its own, gets the same token ids, and
a system whose process crashes becomes a row that says so while the other rows still print. The
systems here are stand-ins (bench_systems.py) and, end to end, LLMasOS itself on a tiny model; no
figure is checked against a threshold: the machine is shared."""

import importlib.util
import json
import random

import pytest

from llmasos.bench.common import Row, add_speedups, print_table
from llmasos.bench.cpu import REPEATS, SYSTEMS, Workload, c4_cold_start, measure_in_processes, run_bench
from llmasos.bench.isolate import run_isolated
from llmasos.errors import LLMasOSError
from llmasos.store import ModelStore

from tiny import save_tiny_model


def make_workload(workloads: list[str]) -> Workload:
    ids = random.Random(0)

    def prompt(n: int) -> list[int]:
        return [ids.randrange(1000) for _ in range(n)]

    return Workload(
        model="none",
        model_dir="/nonexistent",
        activation_bits=16,
        workloads=workloads,
        warmup=prompt(5),
        chat=prompt(12),
        long_prompts=[prompt(40) for _ in range(REPEATS)],
        batch=[prompt(8 + i) for i in range(4)],
    )


@pytest.fixture
def record_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_RECORD_DIR", str(tmp_path))
    return tmp_path


def test_every_process_is_sent_the_same_token_ids(record_dir):
    workload = make_workload(["C1", "C2", "C3"])
    systems = {"LLMasOS": "bench_systems:Ours", "peer": "bench_systems:Peer"}
    rows, notes = measure_in_processes(systems, workload, timeout=120)

    expected = [["decode", workload.warmup]] + [["decode", workload.chat]] * REPEATS
    expected += [["prefill", p] for p in workload.long_prompts] + [["batch", workload.batch]]
    for name in ("LLMasOS", "peer"):
        calls = [json.loads(line) for line in (record_dir / f"{name}.jsonl").read_text().splitlines()]
        assert calls == expected, name
    assert notes == []
    labels = ["C1 decode", "C2 prompt", "C3 concurrency"]
    expected_rows = [(w, "LLMasOS") for w in labels] + [(w, "peer") for w in labels[:2]]
    expected_rows += [("C3 concurrency", "peer single-request"), ("C3 concurrency", "peer batched")]
    assert [(r.workload, r.system) for r in rows] == expected_rows
    assert all(r.value is not None and r.value > 0 for r in rows)


def test_a_crash_keeps_the_rows_finished_before_it_and_says_how_it_died(record_dir, capsys):
    workload = make_workload(["C1", "C2", "C3"])
    systems = {"LLMasOS": "bench_systems:Ours", "crasher": "bench_systems:SegfaultsInC2"}
    rows, notes = measure_in_processes(systems, workload, timeout=120)
    crasher = {r.workload: r for r in rows if r.system == "crasher"}

    assert crasher["C1 decode"].value is not None  # measured before the crash
    for workload_name in ("C2 prompt", "C3 concurrency"):
        assert crasher[workload_name].value is None
        assert crasher[workload_name].note == "crashed (SIGSEGV)"
    assert len(notes) == 1 and notes[0].startswith("crasher: crashed (SIGSEGV); its last output: ")
    assert "bench_systems.py" in notes[0]  # faulthandler's stack of the crash: where it died
    assert [r.system for r in rows if r.value is not None].count("LLMasOS") == 3  # C1, C2, C3

    add_speedups(rows)
    assert all(r.speedup is None for r in crasher.values() if r.value is None)
    assert crasher["C1 decode"].speedup is not None
    print_table(rows, "none", {"command": "test"}, notes)
    table = capsys.readouterr().out
    assert "crashed (SIGSEGV)" in table and "n/a" in table and "LLMasOS" in table


def test_a_process_past_its_time_is_stopped_and_reported():
    run = run_isolated("bench_systems:sleeps", {}, timeout=1)
    assert run.failure == "timed out after 1 s" and run.results == []


def test_a_failing_process_keeps_its_results_and_its_error():
    run = run_isolated("bench_systems:fails", {"value": 7}, timeout=120)
    assert run.results == [{"first": 7}]
    assert run.failure == "failed (exit 1)"
    assert "ValueError: no second result for 7" in run.last_lines()


def test_a_bad_system_path_is_named_in_the_failure():
    run = run_isolated("bench_systems:NoSuchThing", {}, timeout=120)
    assert run.failure == "failed (exit 1)" and "cannot load 'bench_systems:NoSuchThing'" in run.last_lines()


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is not None, reason="llama.cpp would start")
def test_a_cold_start_that_fails_is_a_row_without_a_figure():
    """C4's processes report the same way: here llama.cpp's, where llama-cpp-python is missing."""
    row, why = c4_cold_start("llama.cpp", make_workload([]), "", timeout=120)
    assert row == Row("C4 cold start", "llama.cpp", None, "s", "failed (exit 1)")
    assert why.startswith("llama.cpp C4: failed (exit 1); its last output: ")
    assert "No module named 'llama_cpp'" in why


@pytest.fixture
def tiny_store(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path / "home"))
    ModelStore().import_path(save_tiny_model(tmp_path / "llama", "llama"), "tiny")


@pytest.mark.slow
def test_llmasos_is_measured_beside_a_peer_that_segfaults(tiny_store, record_dir, tmp_path, capsys):
    """The real LLMasOS system on a tiny model, in its own process, beside a peer whose process
    segfaults in its warm-up: the table prints LLMasOS's figure and the crash."""
    systems = {**SYSTEMS, "crasher": "bench_systems:SegfaultsAtOnce"}
    output = tmp_path / "table.md"
    rows = run_bench("tiny", ["C1"], ["crasher"], output, systems=systems)

    ours, crasher = rows
    assert (ours.workload, ours.system) == ("C1 decode", "LLMasOS") and ours.value > 0
    assert crasher == Row("C1 decode", "crasher", None, "tok/s", "crashed (SIGSEGV)")
    table = capsys.readouterr().out
    assert "crashed (SIGSEGV)" in table and "LLMasOS" in table
    markdown = output.read_text()
    assert "| C1 decode | crasher | n/a |  | crashed (SIGSEGV) |" in markdown
    assert "- crasher: crashed (SIGSEGV); its last output:" in markdown


def test_an_unknown_peer_names_the_known_ones():
    with pytest.raises(LLMasOSError, match="unknown peer vllm; choose from transformers, llama.cpp"):
        run_bench("tiny", ["C1"], ["vllm"])
