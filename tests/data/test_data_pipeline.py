"""`data prepare` on small labelled data: every planted secret scrubbed, planted eval overlaps found
and none on disjoint text, planted near-duplicates found at the threshold, chat problems by line."""

import json
import random

import pytest

from llmasos.data.pipeline.run import prepare
from llmasos.data.pipeline.steps import words
from llmasos.data.store import DatasetStore
from llmasos.errors import LLMasOSError

VOCABULARY = [f"w{i}" for i in range(2000)]
PLANTED = {  # category -> values hidden in the documents
    "email": ["jane.roe@example.org", "ops-team@corp.example.com"],
    "phone": ["+1 415-555-0132", "+44 20 7946 0018"],
    "api_key": ["AKIAIOSFODNN7EXAMPLE", "ghp_abcdefghijklmnopqrstuvwxyz0123456789"],
    "credit_card": ["4111 1111 1111 1111"],
}


def prose(rng, n=60):
    return " ".join(rng.choice(VOCABULARY) for _ in range(n))


@pytest.fixture
def store(tmp_path):
    return DatasetStore(tmp_path / "home")


def add(store, tmp_path, name, rows):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return store.import_path(path, name)


def recipe(tmp_path, *steps, column=None):
    path = tmp_path / "recipe.yaml"
    data = {**({"column": column} if column else {}), "steps": list(steps)}
    path.write_text(json.dumps(data))  # JSON is YAML
    return str(path)


def texts(store, name, column="text"):
    return [row[column] for row in store.rows(name)]


def test_scrub_redacts_every_planted_secret_and_counts_them(store, tmp_path):
    rng = random.Random(0)
    values = [(category, v) for category, vs in PLANTED.items() for v in vs]
    rows = [{"text": f"{prose(rng, 20)} contact {value} today. {prose(rng, 10)}"} for _, value in values]
    rows += [{"text": prose(rng)} for _ in range(5)]
    add(store, tmp_path, "raw", rows)
    made = prepare(store, "raw", recipe(tmp_path, {"scrub": {}}), "clean", progress=False)
    cleaned = "\n".join(texts(store, "clean"))
    assert made.rows == len(rows) and not [v for _, v in values if v in cleaned]
    counts = made.report["steps"]["1. scrub"]
    for category, vs in PLANTED.items():
        assert counts[f"found:{category}"] == len(vs), (category, counts)
    strict = recipe(tmp_path, {"scrub": {"action": "block"}})
    blocked = prepare(store, "raw", strict, "strict", progress=False)
    assert texts(store, "strict") == [r["text"] for r in rows[len(values) :]] and blocked.rows == 5


def test_decontamination_finds_planted_overlaps_and_none_on_disjoint_text(store, tmp_path):
    rng = random.Random(1)
    eval_rows = [{"question": prose(rng, 40), "answer": "w1"} for _ in range(3)]
    (tmp_path / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
    leaked = " ".join(words(eval_rows[1]["question"])[10:24])  # 14 words of a test question
    rows = [{"text": prose(rng)} for _ in range(10)]
    rows[3] = {"text": f"{prose(rng, 15)} {leaked} {prose(rng, 15)}"}
    rows[7] = {"text": " ".join(words(eval_rows[2]["question"])[:13])}  # exactly one 13-gram
    add(store, tmp_path, "train", rows)
    steps = recipe(tmp_path, {"decontaminate": {"against": [str(tmp_path / "task.jsonl")]}})
    made = prepare(store, "train", steps, "decon", progress=False)
    report = made.report["steps"]["1. decontaminate"]
    assert report[f"removed:{tmp_path / 'task.jsonl'}"] == 2 and made.rows == 8
    assert [e.split(" shares")[0] for e in report["examples"]] == ["line 4", "line 8"]
    # 12 shared words are not a 13-gram: disjoint enough, nothing removed
    add(store, tmp_path, "near", [{"text": " ".join(words(eval_rows[0]["question"])[:12])}, rows[0]])
    assert prepare(store, "near", steps, "near-decon", progress=False).rows == 2


def jaccard(a, b, n=5):
    grams = [{tuple(words(t)[i : i + n]) for i in range(len(words(t)) - n + 1)} for t in (a, b)]
    return len(grams[0] & grams[1]) / len(grams[0] | grams[1])


def edit(rng, text, changes):
    tokens = text.split()
    for i in rng.sample(range(len(tokens)), changes):
        tokens[i] = rng.choice(VOCABULARY)
    return " ".join(tokens)


def test_near_dedup_removes_paraphrases_above_the_threshold_only(store, tmp_path):
    rng = random.Random(2)
    originals = [prose(rng, 200) for _ in range(6)]
    close = [edit(rng, t, 2) for t in originals[:3]]  # Jaccard about 0.9
    far = [edit(rng, t, 20) for t in originals[3:]]  # Jaccard about 0.4
    assert min(jaccard(a, b) for a, b in zip(originals, close)) > 0.8
    assert max(jaccard(a, b) for a, b in zip(originals[3:], far)) < 0.6
    add(store, tmp_path, "docs", [{"text": t} for t in [*originals, *close, *far]])
    made = prepare(store, "docs", recipe(tmp_path, {"near_dedup": {"threshold": 0.7}}), "dd", progress=False)
    assert texts(store, "dd") == [*originals, *far]
    assert made.report["steps"]["1. near_dedup"]["removed:near_duplicate"] == 3


def test_exact_dedup_and_a_datatrove_filter_with_lineage(store, tmp_path):
    rng = random.Random(3)
    good = (
        "The committee met on Tuesday to review the budget for the coming year. Several members argued "
        "that the library deserved more money, since its reading rooms are full every afternoon. Others "
        "pointed out that the roads need repair before winter arrives. After a long discussion, the chair "
        "proposed a compromise: a small increase for the library, paid for by delaying new office furniture."
    )
    rows = [{"text": good}, {"text": good.upper()}, {"text": "buy now " * 40}, {"text": prose(rng)}]
    parent = add(store, tmp_path, "web", rows)
    steps = recipe(tmp_path, {"exact_dedup": {}}, {"gopher_repetition": {}})
    made = prepare(store, "web", steps, "web-clean", progress=False)
    assert texts(store, "web-clean") == [good, rows[3]["text"]]
    assert made.report["steps"]["1. exact_dedup"]["removed:duplicate"] == 1
    repetition = made.report["steps"]["2. gopher_repetition"]
    assert sum(v for k, v in repetition.items() if k.startswith("removed")) == 1
    assert made.lineage["sources"] == [{"source": "dataset:web", "digest": parent.digest}]
    assert made.lineage["recipe"]["digest"].startswith("sha256:")
    assert made.lineage["recipe"]["steps"] == ["exact_dedup", "gopher_repetition"]


def test_chat_format_reports_problems_by_line(store, tmp_path):
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rows = [
        {"messages": good},
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]},
        {"messages": [{"role": "robot", "content": "a"}]},
    ]
    add(store, tmp_path, "chat", rows)
    checks = recipe(tmp_path, {"chat_format": {"column": "messages"}})
    made = prepare(store, "chat", checks, "ok", progress=False)
    examples = made.report["steps"]["1. chat_format"]["examples"]
    assert made.rows == 1 and [e.split(":")[0] for e in examples] == ["line 2", "line 3", "line 4"]
    assert "no alternation" in examples[0] and "empty turn" in examples[1] and "unknown role" in examples[2]
    failing = recipe(tmp_path, {"chat_format": {"column": "messages", "action": "fail"}})
    with pytest.raises(LLMasOSError, match="line 2: no alternation"):
        prepare(store, "chat", failing, "nope", progress=False)
    assert not store.has("nope")


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ({"dedupe": {}}, r"step 2 \(dedupe\): unknown step"),
        ({"near_dedup": {"threshold": 2}}, r"step 2 \(near_dedup\): field 'threshold' must be a number"),
        ({"scrub": {"style": "reversible"}}, r"step 2 \(scrub\): field 'style' must be one of"),
        ({"decontaminate": {"against": ["missing.jsonl"]}}, r"step 2 \(decontaminate\): .*does not exist"),
        ({"c4_quality": {"min_words": 3}}, r"step 2: step c4_quality: unknown field 'min_words'"),
    ],
)
def test_bad_recipes_fail_before_any_work_naming_step_and_field(store, tmp_path, step, message):
    add(store, tmp_path, "raw", [{"text": "x"}])
    with pytest.raises(LLMasOSError, match=message):
        prepare(store, "raw", recipe(tmp_path, {"exact_dedup": {}}, step), "out", progress=False)
    assert [m.name for m in store.list()] == ["raw"]
