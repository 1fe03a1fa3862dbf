"""`llmasos eval` on a tiny model: tasks whose right answers are known by construction."""

import json
import os
import random
import subprocess
import sys

import pytest

from llmasos import LLM, SamplingParams
from llmasos.errors import InvalidRequestError, LLMasOSError
from llmasos.eval.run import EvalConfig, evaluate
from llmasos.runtime.scoring import loglikelihood

CONTEXTS = [
    "Once upon a time",
    "The capital of France",
    "Hello, world!",
    "def add(a, b):",
    "How are you",
    "The small model",
    "Paris and Rome",
    "I am fine",
    "thank you today",
    "wanted to run on",
    "every machine is",
    "return a + b",
]
WORDS = ["apple", "seven", "quietly", "zebra", "window", "purple", "river", "engine", "cloud", "marble"]


@pytest.fixture(scope="module")
def llm(store):
    return LLM("tiny", device="cpu", max_model_len=128, num_kv_blocks=256, block_size=8)


def greedy(llm, prompts, max_tokens=4):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [out.outputs[0].text for out in llm.generate(prompts, params)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def multiple_choice_records(llm, store):
    """Four random words per context; the right one is the most likely under transformers on the same
    weights, both in total and per character, so acc and acc_norm both know it."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(store.path("tiny"), dtype=torch.float32).eval()

    def logprob(context: str, continuation: str) -> float:
        encode = llm.tokenizer.encode
        context_ids = encode(context, add_special_tokens=False)
        ids = encode(context + continuation, add_special_tokens=False)
        with torch.no_grad():
            logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        return sum(logprobs[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids)))

    rng = random.Random(0)
    records = []
    while len(records) < 36:
        context, choices = rng.choice(CONTEXTS), rng.sample(WORDS, 4)
        scores = [logprob(context, f" {c}") for c in choices]
        normalized = [score / len(choice) for score, choice in zip(scores, choices)]
        best = scores.index(max(scores))
        if best == normalized.index(max(normalized)):
            records.append({"context": context, "choices": choices, "answer": best})
    return records


def test_multiple_choice_known_answers_score_100_and_shuffled_ones_chance(
    llm, tmp_path, multiple_choice_records
):
    task = write_jsonl(tmp_path / "mc.jsonl", multiple_choice_records)
    report = evaluate(llm, "tiny", EvalConfig(str(task)))
    assert report.kind == "multiple_choice" and report.num_examples == 36
    assert report.metrics["acc"] == 1.0 and report.metrics["acc_norm"] == 1.0
    rng = random.Random(1)
    shuffled = [{**record, "answer": rng.randrange(4)} for record in multiple_choice_records]
    shuffled = write_jsonl(tmp_path / "shuffled.jsonl", shuffled)
    chance = evaluate(llm, "tiny", EvalConfig(str(shuffled)))
    low, high = 0.25 - 2.5 * chance.stderr["acc"], 0.25 + 2.5 * chance.stderr["acc"]
    assert low < chance.metrics["acc"] < high, chance.metrics


def test_generation_against_the_models_own_answers_is_a_perfect_score(llm, tmp_path):
    answers = greedy(llm, CONTEXTS, max_tokens=6)
    records = [{"prompt": c, "reference": a.strip()} for c, a in zip(CONTEXTS, answers) if a.strip()]
    task = write_jsonl(tmp_path / "gen.jsonl", records)
    report = evaluate(llm, "tiny", EvalConfig(str(task), max_tokens=6))
    assert report.metrics["exact_match"] == 1.0 and report.metrics["f1"] == 1.0
    assert report.metrics["rouge1"] == pytest.approx(1.0)
    assert report.extra["bleu_signature"].startswith("nrefs:1")
    wrong = write_jsonl(
        tmp_path / "wrong.jsonl", [{"prompt": c, "reference": "zebra marble"} for c in CONTEXTS]
    )
    assert evaluate(llm, "tiny", EvalConfig(str(wrong), max_tokens=6)).metrics["exact_match"] == 0.0


def test_classification_predicts_the_most_likely_label(llm, tmp_path):
    labels = ["river", "engine", "cloud"]
    records = [{"text": c, "label": labels[i % 3]} for i, c in enumerate(CONTEXTS)]
    task = write_jsonl(tmp_path / "cls.jsonl", records)
    template = "Text: {text}\nTopic:"
    report = evaluate(llm, "tiny", EvalConfig(str(task), template=template))
    expected = []
    for context in CONTEXTS:
        scores = loglikelihood(llm, [(template.format(text=context), f" {label}") for label in labels])
        expected.append(labels[max(range(3), key=lambda i: scores[i][0])])
    confusion = report.extra["confusion_matrix"]
    assert confusion["labels"] == sorted(labels) and sum(map(sum, confusion["matrix"])) == len(CONTEXTS)
    hits = sum(e == r["label"] for e, r in zip(expected, records))
    assert report.metrics["accuracy"] == pytest.approx(hits / len(CONTEXTS))
    predicted_counts = [sum(row[j] for row in confusion["matrix"]) for j in range(3)]
    assert predicted_counts == [expected.count(label) for label in confusion["labels"]]


def test_few_shot_and_chat_prompts_are_recorded_in_the_signature(
    llm, tmp_path, store, multiple_choice_records
):
    task = write_jsonl(tmp_path / "mc.jsonl", multiple_choice_records)
    report = evaluate(llm, "tiny", EvalConfig(str(task), shots=2, chat=True, template="Q: {context}"))
    sig = report.signature
    assert (sig.shots, sig.prompt_template, sig.model_digest) == (2, "Q: {context} [chat template]",
                                                                  store.get("tiny").digest)  # fmt: skip
    assert sig.task_digest.startswith("sha256:") and sig.dtype == "float32" and sig.quantization is None
    json_path, md_path = report.save(tmp_path / "out")
    assert json.loads(json_path.read_text())["signature"]["shots"] == 2
    assert "acc_norm" in md_path.read_text()


def test_reports_of_tasks_sharing_a_file_stem_are_kept_apart(llm, tmp_path):
    from llmasos.eval.taskfile import file_digest

    tasks = []
    for folder, words in (("a", WORDS[:2]), ("b", WORDS[2:4])):
        (tmp_path / folder).mkdir()
        records = [{"context": context, "choices": words, "answer": 0} for context in CONTEXTS[:3]]
        tasks.append(write_jsonl(tmp_path / folder / "mc.jsonl", records))
    reports = [evaluate(llm, "tiny", EvalConfig(str(task))) for task in tasks]
    assert reports[0].task == reports[1].task == "mc"
    out = tmp_path / "reports"
    saved = [report.save(out) for report in reports]
    assert len({path for paths in saved for path in paths}) == 4
    for (json_path, _), task in zip(saved, tasks):
        assert json.loads(json_path.read_text())["signature"]["task_digest"] == file_digest(task)
    assert reports[0].save(out) == saved[0]  # a rerun replaces its own report, whatever ran in between
    assert len(list(out.iterdir())) == 4


def test_bad_settings_are_refused_before_a_model_loads(tmp_path):
    from llmasos.eval.run import check_config

    for name, value in [("limit", 0), ("limit", -3), ("shots", -1), ("max_tokens", 0), ("stride", 0)]:
        with pytest.raises(InvalidRequestError, match=f"{name}={value}"):
            EvalConfig("task.jsonl", **{name: value})
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"context": "Hi", "choices": ["a"], "answer": 0}])
    with pytest.raises(LLMasOSError, match="bad.jsonl"):
        check_config(EvalConfig(str(bad)))
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "Hi", "reference": "there"}])
    with pytest.raises(InvalidRequestError, match=r"\{prompt\}"):
        check_config(EvalConfig(str(good), template="Q: {question}"))
    check_config(EvalConfig(str(good)))  # a good one passes


def test_bad_templates_and_missing_data_are_refused(llm, tmp_path):
    task = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "Hi", "reference": "there"}])
    with pytest.raises(InvalidRequestError, match=r"placeholder \{prompt\}"):
        evaluate(llm, "tiny", EvalConfig(str(task), template="Q: {question}"))
    with pytest.raises(InvalidRequestError, match="malformed"):
        evaluate(llm, "tiny", EvalConfig(str(task), template="Q: {prompt"))
    with pytest.raises(InvalidRequestError, match="--data"):
        evaluate(llm, "tiny", EvalConfig("perplexity"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(InvalidRequestError, match="empty"):
        evaluate(llm, "tiny", EvalConfig("perplexity", data=tmp_path / "empty.txt"))
    with pytest.raises(LLMasOSError, match="missing.jsonl"):
        evaluate(llm, "tiny", EvalConfig(str(tmp_path / "missing.jsonl")))


@pytest.mark.slow
def test_eval_cli_writes_json_and_markdown(store, tmp_path):
    from llmasos.eval.taskfile import file_digest

    text = tmp_path / "held_out.txt"
    text.write_text("The capital of France is Paris. Once upon a time there was a small model.\n" * 4)
    env = {**os.environ, "LLMASOS_HOME": str(store.home)}
    result = subprocess.run(
        [sys.executable, "-c", "from llmasos.cli import main; main()", "eval", "tiny", "--task", "perplexity",
         "--data", str(text), "--context", "32", "--stride", "16", "--output", str(tmp_path / "reports")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    stem = "tiny_perplexity-" + file_digest(text).removeprefix("sha256:")[:8]  # the text's bytes name it
    report = json.loads((tmp_path / "reports" / f"{stem}.json").read_text())
    assert report["metrics"]["perplexity"] > 1 and report["extra"]["num_tokens"] > 32
    assert "perplexity" in result.stdout and (tmp_path / "reports" / f"{stem}.md").is_file()
    bad = subprocess.run(
        [sys.executable, "-c", "from llmasos.cli import main; main()", "eval", "tiny", "--task=perplexity"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 1 and bad.stderr.startswith("Error:") and "--data" in bad.stderr
