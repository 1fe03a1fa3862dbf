"""`data prepare --tasks N`: the per-record steps in worker processes, the dedup steps in order in
the parent. Exact and near duplicates planted across batches are removed as with one task: the same
rows, digest and report for --tasks 1 and 2; a failure or an interrupt registers nothing."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from llmasos.cli import app
from llmasos.data.pipeline import steps
from llmasos.data.pipeline.run import prepare
from llmasos.data.store import DatasetStore, readers
from llmasos.errors import LLMasOSError

SENTENCES = [
    "The committee met on Tuesday to review the budget for the coming year.",
    "Several members argued that the library deserved more money this time.",
    "Others pointed out that the roads need repair before the winter arrives.",
    "After a long discussion, the chair proposed a small compromise for everyone.",
    "La bibliothèque ouvre à neuf heures du matin et ferme tard le jeudi soir.",
    "Die Bibliothek öffnet um neun Uhr morgens und schließt donnerstags spät.",
]
RECIPE = [
    {"language_id": {"min_score": 0.01}},
    {"scrub": {"action": "redact"}},
    {"exact_dedup": {}},
    {"near_dedup": {"threshold": 0.7, "ngram": 3}},
    {"language_id": {"languages": ["en", "fr"], "min_score": 0.01}},  # after the dedup steps: a 3rd stage
    {"c4_quality": {"filter_no_terminal_punct": False, "min_num_sentences": 1}},
]


def corpus(rows=120):
    """Documents of English, French or German sentences; copies and near copies of earlier rows
    (from earlier batches too: batches are 7 rows), and e-mail addresses to scrub."""
    rng, made = random.Random(7), []
    for i in range(rows):
        if i > 10 and i % 9 == 0:
            made.append(made[rng.randrange(i - 10)])  # an exact copy, usually in an earlier batch
        elif i > 10 and i % 11 == 0:
            words = made[rng.randrange(i - 10)].split()
            words[rng.randrange(len(words))] = "changed"
            made.append(" ".join(words))  # a near copy
        else:
            lang = rng.choice([0, 0, 0, 1, 2])
            pool = SENTENCES[:4] if lang == 0 else [SENTENCES[3 + lang]] * 4
            text = " ".join(rng.choice(pool) + f" Item {i}-{rng.randrange(10**6)}." for _ in range(6))
            made.append(text + (f" Write to user{i}@example.org." if i % 5 == 0 else ""))
    return [{"id": i, "text": t} for i, t in enumerate(made)]


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "BATCH_ROWS", 7)  # many batches: duplicates cross batch bounds
    store = DatasetStore(tmp_path / "home")
    path = tmp_path / "raw.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in corpus()))
    store.import_path(path, "raw")
    (tmp_path / "recipe.yaml").write_text(json.dumps({"steps": RECIPE}))
    return store


@pytest.mark.slow
def test_two_tasks_keep_the_rows_digest_and_report_of_one(store, tmp_path):
    recipe = str(tmp_path / "recipe.yaml")
    one = prepare(store, "raw", recipe, "one", progress=False, tasks=1)
    two = prepare(store, "raw", recipe, "two", progress=False, tasks=2)
    assert two.digest == one.digest and two.report == one.report
    assert list(store.rows("two")) == list(store.rows("one"))
    counts = one.report["steps"]
    assert counts["3. exact_dedup"]["removed:duplicate"] >= 10
    assert counts["4. near_dedup"]["removed:near_duplicate"] >= 5
    assert counts["2. scrub"]["found:email"] >= 10 and counts["5. language_id"]["removed:language_de"] >= 5
    kept = [r["text"] for r in store.rows("one")]
    assert len(kept) == len(set(kept)) and not any("@example.org" in t for t in kept)


@pytest.mark.slow
def test_a_failing_worker_or_an_interrupt_registers_nothing(store, tmp_path, monkeypatch):
    failing = tmp_path / "failing.yaml"
    failing.write_text(json.dumps({"steps": [{"chat_format": {"column": "text", "action": "fail"}}]}))
    with pytest.raises(LLMasOSError, match="line 1: not a conversation"):
        prepare(store, "raw", str(failing), "broken", progress=False, tasks=2)
    calls = []

    def interrupted(self, rows):
        calls.append(len(rows))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return rows

    monkeypatch.setattr(steps.ExactDedup, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(store, "raw", str(tmp_path / "recipe.yaml"), "stopped", progress=False, tasks=2)
    assert [m.name for m in store.list()] == ["raw"]


def test_cli_tasks_flag_and_its_bounds(store, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path / "home"))
    recipe = tmp_path / "small.yaml"
    recipe.write_text(json.dumps({"steps": [{"exact_dedup": {}}, {"language_id": {"languages": ["fr"]}}]}))
    run = CliRunner().invoke
    result = run(app, ["data", "prepare", "raw", "--recipe", str(recipe), "--name", "fr", "--tasks", "2"])
    assert result.exit_code == 0, result.output
    assert {r["language"] for r in DatasetStore(tmp_path / "home").rows("fr")} == {"fr"}
    result = run(app, ["data", "prepare", "raw", "--recipe", str(recipe), "--name", "x", "--tasks", "0"])
    assert result.exit_code != 0 and "--tasks" in result.output


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


@pytest.mark.slow
def test_ctrl_c_during_a_parallel_run_registers_nothing_and_leaves_no_worker(tmp_path):
    home = tmp_path / "home"
    rows = tmp_path / "many.jsonl"  # ~40 batches of 4096 short rows: minutes of scrubbing
    rows.write_text(
        "".join(json.dumps({"text": f"row {i} mail u{i}@example.org"}) + "\n" for i in range(160_000))
    )
    DatasetStore(home).import_path(rows, "many")
    recipe = tmp_path / "scrub.yaml"
    recipe.write_text(json.dumps({"steps": [{"scrub": {}}, {"exact_dedup": {}}]}))
    env = {**os.environ, "LLMASOS_HOME": str(home)}
    command = [sys.executable, "-m", "llmasos", "data", "prepare", "many", "--recipe", str(recipe),
               "--name", "out", "--tasks", "2"]  # fmt: skip
    run = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    staged = home / "tmp"  # the new dataset's shard is written there as batches come out
    while run.poll() is None and not any(p.is_file() and p.stat().st_size for p in staged.rglob("*")):
        time.sleep(0.2)
    workers = _children(run.pid)
    assert run.poll() is None and len(workers) >= 2, run.stderr.read().decode()[-2000:]
    os.killpg(run.pid, signal.SIGINT)  # as Ctrl-C does: the whole process group
    _, err = run.communicate(timeout=120)
    assert run.returncode != 0 and "Traceback" not in err.decode(), err.decode()[-3000:]  # a clean stop
    assert [m.name for m in DatasetStore(home).list()] == ["many"]
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            for _ in range(100):  # a worker may take a moment to see its queue closed
                os.kill(pid, 0)
                time.sleep(0.1)
