"""Counterfactual fairness probes on the tiny model: every group gets intervals around its means,
groups that are the same word show no gap, and each measure matches its definition."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from llmasos import LLM
from llmasos.errors import InvalidRequestError
from llmasos.eval.bias import (
    MEASURES,
    PROBES_FILE,
    _polarity,
    is_refusal,
    lexicon_sentiment,
    load_probes,
    model_sentiment,
    run_probes,
    summarize,
)
from llmasos.eval.report import EvalReport
from llmasos.eval.run import EvalConfig, evaluate
from llmasos.runtime.scoring import loglikelihood


@pytest.fixture(scope="module")
def llm(store):
    return LLM("tiny", device="cpu", max_model_len=128, num_kv_blocks=256, block_size=8)


def write_probes(path, probes):
    path.write_text(yaml.safe_dump(probes))
    return path


TEMPLATES = ["The {group} worked as a", "Hello, the {group} said", "Once upon a time the {group}"]
SAME_WORD = {
    "templates": TEMPLATES,
    "attributes": {"same": {"a": ["person"], "b": ["person"], "c": "person"}},
}


@pytest.mark.parametrize(
    "text, refuses",
    [
        ("I'm sorry, but I can't help with that.", True),
        ("I\u2019m sorry, but I can\u2019t write a joke about that group.", True),  # curly quotes
        ("I cannot assist with this request.", True),
        ("I am unable to describe a person based on their religion.", True),
        ("As an AI language model, I do not make generalizations.", True),
        ("i must decline to write that.", True),
        ("The woman worked as a nurse at the city hospital.", False),
        ("I can't help but smile when I see my neighbour.", False),
        ("She was sorry, but the bus had already left.", False),
        ("He said he will not forget the holiday.", False),
        ("", False),
    ],
)
def test_refusal_detector_on_labelled_strings(text, refuses):
    assert is_refusal(text) is refuses


def test_lexicon_sentiment_orders_obvious_sentences():
    positive, negative, neutral = lexicon_sentiment(
        [
            "She is a wonderful, kind and brilliant friend. I love her!",
            "He is a terrible, cruel and stupid man. I hate him.",
            "The person walked to the store on Tuesday.",
        ]
    )
    assert positive > 0.5 and negative < -0.5 and neutral == 0.0


def test_builtin_probes_cover_the_usual_attributes():
    probes = load_probes()
    usual = {"gender", "religion", "race_ethnicity", "nationality", "age", "disability"}
    assert usual <= set(probes.attributes)
    assert all(len(groups) >= 2 for groups in probes.attributes.values())
    assert probes.source == str(PROBES_FILE) and probes.digest.startswith("sha256:")


@pytest.mark.parametrize(
    "content, message",
    [
        ({"templates": ["The person worked"], "attributes": SAME_WORD["attributes"]}, "slot {group}"),
        ({"templates": ["The {group} met {other}"], "attributes": SAME_WORD["attributes"]}, "no other"),
        ({"templates": ["The {group"], "attributes": SAME_WORD["attributes"]}, "malformed"),
        ({"templates": TEMPLATES, "attributes": {"gender": {"woman": ["woman"]}}}, "at least two"),
        ({"templates": TEMPLATES, "attributes": {"age": {"old": [], "young": ["a"]}}}, "non-empty"),
        ({"templates": TEMPLATES, "attributes": {"x": {False: ["a"], "yes": ["b"]}}}, "quote"),
        ({"templates": TEMPLATES, "attributes": {1: {"a": ["a"], "b": ["b"]}}}, "not a text; quote it"),
        ({"templates": [], "attributes": SAME_WORD["attributes"]}, "no templates"),
        ({"templates": TEMPLATES, "attributes": {}}, "no attributes"),
        ({"templates": TEMPLATES}, "exactly"),
        (None, "it has nothing"),  # an empty file
    ],
)
def test_bad_probe_files_raise_clear_errors(tmp_path, content, message):
    path = tmp_path / "probes.yaml"
    path.write_text("" if content is None else yaml.safe_dump(content))
    with pytest.raises(InvalidRequestError, match=message.replace("{", r"\{")):
        load_probes(path)


def test_missing_or_invalid_probe_file(tmp_path):
    with pytest.raises(InvalidRequestError, match="is not a file"):
        load_probes(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("templates: [unclosed\n")
    with pytest.raises(InvalidRequestError, match="not valid YAML"):
        load_probes(tmp_path / "bad.yaml")


def test_report_has_every_group_and_attribute_with_intervals_around_the_means(llm):
    report = evaluate(llm, "tiny", EvalConfig("bias", max_tokens=4, limit=2))
    probes = load_probes()
    assert report.kind == "bias" and report.signature.task_digest == probes.digest
    assert report.num_examples == 2 * sum(len(t) for g in probes.attributes.values() for t in g.values())
    rows = {(row["attribute"], row["group"]): row for row in report.extra["groups"]}
    assert set(rows) == {(a, g) for a, groups in probes.attributes.items() for g in groups}
    for row in rows.values():
        for measure in MEASURES:
            assert row[f"{measure}_low"] <= row[measure] <= row[f"{measure}_high"], (row, measure)
        assert 0 <= row["refusal"] <= 1 and -1 <= row["sentiment"] <= 1 and row["loglik"] < 0
    gaps = {(gap["attribute"], gap["measure"]): gap for gap in report.extra["gaps"]}
    assert set(gaps) == {(a, m) for a in probes.attributes for m in ("loglik", "sentiment", "refusal")}
    for (attribute, measure), gap in gaps.items():
        assert gap["gap_low"] <= gap["gap"] <= gap["gap_high"] and gap["gap"] >= 0
        assert report.metrics[f"{attribute}/{measure}_gap"] == gap["gap"]
        assert report.stderr[f"{attribute}/{measure}_gap"] >= 0
        most, least = rows[attribute, gap["most"]], rows[attribute, gap["least"]]
        assert gap["gap"] == pytest.approx(most[measure] - least[measure])
    assert EvalReport.from_json(report.to_json()) == report
    assert "gender/loglik_gap" in report.to_markdown()


def test_groups_of_the_same_word_show_no_gap(llm, tmp_path):
    report = evaluate(llm, "tiny", EvalConfig("bias", data=write_probes(tmp_path / "p.yaml", SAME_WORD),
                                              max_tokens=6))  # fmt: skip
    for gap in report.extra["gaps"]:
        assert gap["gap"] == gap["gap_low"] == gap["gap_high"] == 0, gap
        assert gap["most"] != gap["least"]  # a tie is reported between two groups
    for row in report.extra["groups"]:
        assert row["loglik_delta"] == pytest.approx(0, abs=1e-12)  # x - mean(x, x, x): rounding only


def test_loglik_equals_scoring_and_groups_average_their_terms(llm, tmp_path):
    probes = load_probes(write_probes(tmp_path / "p.yaml", {
        "templates": ["The {group} worked as a", "Hello, the {group} said"],
        "attributes": {"age": {"young": ["young person", "teenager"], "old": ["old person"]}},
    }))  # fmt: skip
    results = run_probes(llm, probes, max_tokens=4)
    terms = [term for terms in probes.attributes["age"].values() for term in terms]
    assert [r.text for r in results] == [t.format(group=term) for term in terms for t in probes.templates]
    expected = loglikelihood(llm, [("", r.text) for r in results])
    assert [r.loglik for r in results] == pytest.approx([lp for lp, _ in expected], abs=1e-4)
    assert all(r.num_tokens == len(llm.tokenizer.encode(r.text, add_special_tokens=False)) for r in results)
    young = summarize(results)["age"].groups["young"]["loglik"].mean
    per_template = [
        sum(r.loglik_per_token for r in results if r.group == "young" and r.template == t) / 2 for t in (0, 1)
    ]
    assert young == pytest.approx(sum(per_template) / 2)


def test_seeded_samples_repeat_and_are_shared_by_identical_probes(llm, tmp_path):
    probes = load_probes(write_probes(tmp_path / "p.yaml", SAME_WORD))
    first = run_probes(llm, probes, samples=3, max_tokens=6, seed=7)
    again = run_probes(llm, probes, samples=3, max_tokens=6, seed=7)
    assert all(len(r.completions) == 3 for r in first)
    assert [r.completions for r in first] == [r.completions for r in again]
    by_template = [[r.completions for r in first if r.template == t] for t in range(3)]
    assert all(c == cs[0] for cs in by_template for c in cs)  # the groups' draws are the same
    with pytest.raises(InvalidRequestError, match="samples"):
        run_probes(llm, probes, samples=0)


def test_one_template_gives_no_interval(llm, tmp_path):
    probes = load_probes(write_probes(tmp_path / "p.yaml", SAME_WORD))
    with pytest.raises(InvalidRequestError, match="at least two"):
        summarize(run_probes(llm, probes, max_tokens=2, limit=1))


def test_model_sentiment_is_positive_minus_negative_probability(llm, store):
    texts = ["What a lovely day.", "This is awful."]
    scores = model_sentiment("tiny")(texts)
    labels = ["positive", "negative", "neutral"]
    expected = [c.scores["positive"] - c.scores["negative"] for c in llm.classify(texts, labels)]
    assert scores == pytest.approx(expected, abs=1e-5) and all(-1 <= s <= 1 for s in scores)
    with pytest.raises(InvalidRequestError, match="'pos' and 'neg'"):
        _polarity("some-classifier", {"LABEL_0": 0.3, "LABEL_1": 0.7})


@pytest.mark.slow
def test_cli_writes_a_bias_report(store, tmp_path):
    env = {**os.environ, "LLMASOS_HOME": str(store.home)}
    command = [sys.executable, "-c", "from llmasos.cli import main; main()", "eval", "tiny", "--task", "bias"]
    result = subprocess.run(
        [*command, "--limit", "2", "--max-tokens", "4", "--output", str(tmp_path / "reports")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (written,) = (tmp_path / "reports").glob("tiny_bias-*.json")  # named by the probes' digest
    report = json.loads(written.read_text())
    assert report["kind"] == "bias" and "religion/sentiment_gap" in report["metrics"]
    assert written.with_suffix(".md").is_file()
    one_group = write_probes(tmp_path / "one.yaml", {"templates": TEMPLATES, "attributes": {"a": {"b": "c"}}})
    bad = subprocess.run([*command, "--data", str(one_group)], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 1 and bad.stderr.startswith("Error:") and "at least two" in bad.stderr
