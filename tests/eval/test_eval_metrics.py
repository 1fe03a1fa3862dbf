"""Evaluation without a model: metrics against the libraries and hand calculations, task files
and their errors, reports."""

from __future__ import annotations

import hashlib
import json

import pytest

from llmasos.errors import LLMasOSError
from llmasos.eval import (
    EvalReport,
    EvalSignature,
    GenerationExample,
    bleu,
    classification_metrics,
    exact_match,
    file_digest,
    load_task,
    multiple_choice_metrics,
    rouge,
    token_f1,
)

HYPOTHESES = [
    "the cat is sitting on the mat",
    "a quick brown fox jumps over a lazy dog",
    "It rains.\nThe streets are wet today.",
]
REFERENCES = [
    "the cat sat on the mat",
    "the quick brown fox jumped over the lazy dog",
    "The streets are wet.\nIt rained today.",
]
SECOND_REFERENCES = ["there is a cat on the mat", "a fast brown fox leaps over a dog", "It is raining."]


def test_bleu_equals_sacrebleu_with_its_signature():
    import sacrebleu

    expected = sacrebleu.metrics.BLEU()
    score = expected.corpus_score(HYPOTHESES, [REFERENCES]).score
    result = bleu(HYPOTHESES, REFERENCES)
    assert result.score == pytest.approx(score)
    assert 0 < result.score < 100
    assert result.signature == str(expected.get_signature())
    assert result.signature.startswith("nrefs:1|")


def test_bleu_with_several_references_per_example():
    import sacrebleu

    refs = [list(pair) for pair in zip(REFERENCES, SECOND_REFERENCES)]
    expected = sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES, SECOND_REFERENCES]).score
    assert bleu(HYPOTHESES, refs).score == pytest.approx(expected)


def test_rouge_equals_rouge_score_and_lsum_splits_on_newlines():
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    pairs = [scorer.score(ref, hyp) for hyp, ref in zip(HYPOTHESES, REFERENCES)]
    result = rouge(HYPOTHESES, REFERENCES)
    assert set(result) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    for kind, value in result.items():
        assert value == pytest.approx(sum(p[kind].fmeasure for p in pairs) / len(pairs))
    # the third pair has its sentences swapped across lines: only the summary-level LCS sees both
    assert result["rougeLsum"] > result["rougeL"]


def test_rouge_takes_the_best_reference():
    single = rouge(HYPOTHESES[:1], [SECOND_REFERENCES[0]])["rouge1"]
    best = rouge(HYPOTHESES[:1], [[SECOND_REFERENCES[0], REFERENCES[0]]])["rouge1"]
    assert best == rouge(HYPOTHESES[:1], [REFERENCES[0]])["rouge1"] > single


def test_exact_match_and_token_f1_by_hand():
    predictions = ["The Eiffel Tower!", "Paris", "London"]
    references = ["eiffel tower", ["paris, france", "Paris"], "Paris"]
    em = exact_match(predictions, references)
    assert em.score == pytest.approx(2 / 3)
    # sample std of [1, 1, 0] is sqrt(1/3); over sqrt(3) gives 1/3
    assert em.stderr == pytest.approx(1 / 3)

    # "cat sat on mat" vs "cat sat": P 2/4, R 1 -> 2/3; "blue" vs best of "red"/"blue sky": 2/3;
    # "new york city" vs "york": P 1/3, R 1 -> 1/2
    f1 = token_f1(
        ["the cat sat on the mat", "blue", "New York City"], ["a cat sat", ["red", "blue sky"], "york"]
    )
    assert f1.score == pytest.approx((2 / 3 + 2 / 3 + 1 / 2) / 3)


def test_classification_metrics_by_hand():
    labels = ["a", "a", "a", "b", "b", "c"]
    predictions = ["a", "a", "b", "b", "c", "c"]
    result = classification_metrics(predictions, labels, ["a", "b", "c"])
    assert result.labels == ["a", "b", "c"]
    assert result.confusion == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert result.accuracy.score == pytest.approx(4 / 6)
    # F1 = 2TP / (predicted + actual): a 4/5, b 2/4, c 2/3
    assert result.macro_f1 == pytest.approx((4 / 5 + 2 / 4 + 2 / 3) / 3)


def test_classification_macro_f1_agrees_with_scikit_learn_on_an_unpredicted_label():
    from sklearn.metrics import f1_score

    labels, predictions = ["x", "y", "y", "z"], ["x", "x", "y", "x"]
    result = classification_metrics(predictions, labels)
    assert result.labels == ["x", "y", "z"]
    assert result.macro_f1 == pytest.approx(f1_score(labels, predictions, average="macro", zero_division=0))


def test_multiple_choice_acc_and_acc_norm_like_lm_eval():
    from lm_eval.api.metrics import mean_stderr

    # example 0: the long right answer loses on raw log-likelihood but wins per character
    # (-2/1 < -10/20); example 1: both pick the right answer; example 2: a tie goes to the first
    logprobs = [[-2.0, -10.0], [-1.0, -3.0], [-4.0, -4.0, -9.0]]
    texts = [["a", "a much longer answer"], ["yes", "no"], ["red", "red", "green"]]
    result = multiple_choice_metrics(logprobs, texts, [1, 0, 1])
    assert result["acc"].score == pytest.approx(1 / 3)
    assert result["acc_norm"].score == pytest.approx(2 / 3)
    assert result["acc"].stderr == pytest.approx(mean_stderr([0.0, 1.0, 0.0]))
    assert result["acc_norm"].stderr == pytest.approx(mean_stderr([1.0, 1.0, 0.0]))


def test_one_example_has_no_stderr():
    assert multiple_choice_metrics([[-1.0, -2.0]], [["a", "b"]], [0])["acc"].stderr is None


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: bleu(["a"], ["a", "b"]), "1 hypotheses but 2 references"),
        (lambda: rouge(["a"], ["  "]), "reference 0 is empty"),
        (lambda: token_f1([], []), "no hypotheses"),
        (lambda: classification_metrics(["a"], ["a"], ["a"]), "has one label"),
        (lambda: classification_metrics(["z"], ["a"], ["a", "b"]), "prediction 'z' of example 0"),
        (lambda: multiple_choice_metrics([[-1.0, -2.0]], [["a", "b"]], [2]), "give 0 to 1"),
        (lambda: multiple_choice_metrics([[-1.0]], [["a", "b"]], [0]), "one log-likelihood per choice"),
    ],
)
def test_metrics_reject_bad_input(call, message):
    with pytest.raises(LLMasOSError, match=message):
        call()


def write_lines(path, *lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_a_multiple_choice_file_with_known_answers_scores_100_percent(tmp_path):
    task = load_task(
        write_lines(
            tmp_path / "mc.jsonl",
            {"context": "2 + 2 =", "choices": ["3", "4", "5"], "answer": 1},
            {"context": "The sky is", "choices": ["blue", "green"], "answer": "blue"},
        )
    )
    assert task.kind == "multiple_choice"
    assert [e.answer for e in task.examples] == [1, 0]
    # an oracle that gives the right continuation the highest log-likelihood
    logprobs = [[0.0 if i == e.answer else -5.0 for i in range(len(e.choices))] for e in task.examples]
    result = multiple_choice_metrics(
        logprobs, [e.choices for e in task.examples], [e.answer for e in task.examples]
    )
    assert result["acc"].score == result["acc_norm"].score == 1.0


def test_generation_and_classification_files(tmp_path):
    gen = load_task(
        write_lines(
            tmp_path / "gen.jsonl",
            {"prompt": "Say hi", "reference": "hi"},
            {"input": "Say bye", "references": ["bye", "goodbye"], "id": 7},
        )
    )
    assert gen.kind == "generation"
    assert gen.examples == (
        GenerationExample("Say hi", ("hi",)),
        GenerationExample("Say bye", ("bye", "goodbye")),
    )
    cls = load_task(
        write_lines(
            tmp_path / "cls.jsonl", {"text": "great", "label": "pos"}, {"text": "bad", "label": "neg"}
        )
    )
    assert (cls.kind, cls.labels) == ("classification", ("neg", "pos"))
    given = load_task(tmp_path / "cls.jsonl", labels=["pos", "neg", "neutral"])
    assert given.labels == ("pos", "neg", "neutral")


@pytest.mark.parametrize(
    ("lines", "kind", "message"),
    [
        (
            [{"context": "c", "choices": ["a", "b"], "answer": 0}, '{"context": "c", '],
            None,
            r"line 2: not valid JSON",
        ),
        (
            [{"context": "c", "choices": ["a", "b"], "answer": 0}, {"context": "c", "answer": 0}],
            None,
            r'line 2: the "choices" field is missing; a valid multiple_choice line looks like \{"context"',
        ),
        (
            [{"context": "c", "choices": ["a"], "answer": 0}],
            None,
            r'line 1: "choices" must be a list of at least 2',
        ),
        (
            [{"context": "c", "choices": ["a", "b"], "answer": 2}],
            None,
            r'"answer" 2 must be a choice index 0 to 1',
        ),
        (
            [{"context": "c", "choices": ["a", "b"], "answer": "z"}],
            None,
            r'"answer" "z" is not one of the choices',
        ),
        ([{"context": "c", "choices": ["a", "b"]}], None, r'the "answer" field is missing'),
        ([{"context": " ", "choices": ["a", "b"], "answer": 0}], None, r'line 1: "context" is empty'),
        (
            [{"context": "c", "choices": ["a", ""], "answer": 0}],
            None,
            r'"choices"\[1\] must be a non-empty string',
        ),
        ([{"prompt": "p", "reference": ""}], None, r'"reference" is empty'),
        ([{"prompt": "p", "references": []}], None, r'"references" must be a list of at least 1'),
        ([{"prompt": "p", "input": "q", "reference": "r"}], None, r"not both"),
        ([{"text": "t", "label": "pos"}, {"text": "u", "label": "pos"}], None, r"has one label"),
        ([{"text": "t", "label": 1}], None, r'"label" must be a string, got int'),
        ([{"question": "q"}], None, r"line 1: cannot tell the task kind"),
        ([{"text": "t"}], "classification", r'the "label" field is missing'),
        ([{"text": "t", "label": "a"}], "regression", r"unknown task kind 'regression'"),
        (["[1, 2]"], None, r"line 1: expected a JSON object"),
        ([], None, r"is empty; it needs at least one"),
    ],
)
def test_task_file_errors_name_the_problem(tmp_path, lines, kind, message):
    path = write_lines(tmp_path / "task.jsonl", *lines)
    with pytest.raises(LLMasOSError, match=message) as error:
        load_task(path, kind=kind)
    assert str(path) in str(error.value) or "unknown task kind" in str(error.value)


def test_labels_outside_the_given_set_and_a_missing_file(tmp_path):
    path = write_lines(tmp_path / "cls.jsonl", {"text": "a", "label": "pos"}, {"text": "b", "label": "meh"})
    with pytest.raises(LLMasOSError, match=r'line 2: "label" "meh" is not in the label set'):
        load_task(path, labels=["pos", "neg"])
    with pytest.raises(LLMasOSError, match="a label set is for classification tasks"):
        load_task(write_lines(tmp_path / "gen.jsonl", {"prompt": "p", "reference": "r"}), labels=["a", "b"])
    with pytest.raises(LLMasOSError, match="does not exist"):
        load_task(tmp_path / "missing.jsonl")


def test_few_shot_is_seeded_and_never_shows_the_scored_example(tmp_path):
    lines = [{"prompt": f"p{i}", "reference": f"r{i}"} for i in range(6)]
    task = load_task(write_lines(tmp_path / "gen.jsonl", *lines))
    for index in range(6):
        shots = task.few_shot(index, 3, seed=1)
        assert len(shots) == 3 and task.examples[index] not in shots
        assert len(set(shots)) == 3
        assert shots == task.few_shot(index, 3, seed=1)
    assert task.few_shot(0, 5, seed=1) != task.few_shot(0, 5, seed=2)  # 5 of the other 5, in another order
    assert task.few_shot(2, 0) == []
    with pytest.raises(LLMasOSError, match="shots must be 0 to 5"):
        task.few_shot(0, 6)


def test_file_digest_is_the_sha256_of_the_bytes(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", {"text": "a", "label": "x"}, {"text": "b", "label": "y"})
    expected = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_digest(path) == expected == load_task(path).digest


def make_report() -> EvalReport:
    signature = EvalSignature(
        model="qwen3:0.6b",
        model_digest="sha256:abc123",
        task="sentiment",
        task_digest="sha256:def456",
        prompt_template="Review: {text}\nLabel:",
        shots=2,
        dtype="bfloat16",
        quantization=None,
        batch_size=8,
        seed=1234,
    )
    return EvalReport(
        task="sentiment",
        kind="classification",
        metrics={"accuracy": 0.75, "macro_f1": 0.7333},
        stderr={"accuracy": 0.0481, "macro_f1": None},
        num_examples=4,
        signature=signature,
        extra={"confusion_matrix": {"labels": ["neg", "pos"], "matrix": [[1, 1], [0, 2]]}, "note": "a|b"},
    )


def test_report_json_round_trips_and_markdown_shows_metrics_and_signature(tmp_path):
    report = make_report()
    assert report.signature.llmasos_version  # filled from the package metadata
    assert EvalReport.from_json(report.to_json()) == report
    markdown = report.to_markdown()
    assert "| accuracy | 0.7500 | 0.0481 |" in markdown
    assert "| macro_f1 | 0.7333 | N/A |" in markdown
    assert "| neg | 1 | 1 |" in markdown and "| pos | 0 | 2 |" in markdown
    assert "| note | a\\|b |" in markdown
    for name in (
        "model_digest",
        "sha256:abc123",
        "task_digest",
        "prompt_template",
        "shots",
        "dtype",
        "quantization",
        "batch_size",
        "seed",
        "1234",
        "llmasos_version",
    ):
        assert name in markdown
    json_path, md_path = report.save(tmp_path / "reports")
    stem = "qwen3-0.6b_sentiment-def456"  # model, task and the task digest's first digits
    assert (json_path.name, md_path.name) == (f"{stem}.json", f"{stem}.md")
    assert EvalReport.from_json(json_path.read_text()) == report
    assert md_path.read_text() == markdown


def test_reading_something_that_is_not_a_report_fails_clearly():
    with pytest.raises(LLMasOSError, match="not an LLMasOS eval report"):
        EvalReport.from_json('{"task": "x"}')
