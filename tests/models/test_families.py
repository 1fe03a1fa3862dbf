"""The field's other families behind the same `LLM` and task calls: tiny random T5, BART and BERT
load from the store and summarize, translate and classify (on the transformers engine)."""

import math

import pytest
import torch

from llmasos import LLM, SamplingParams
from llmasos.errors import InvalidRequestError
from llmasos.store import ModelStore

from tiny_families import LABELS, save_bart, save_bert_classifier, save_t5


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMASOS_HOME", str(tmp_path_factory.mktemp("home")))
        store = ModelStore()
        for name, save in [("t5", save_t5), ("bart", save_bart), ("bert-cls", save_bert_classifier)]:
            store.import_path(save(tmp_path_factory.mktemp(name)), name, progress=False)
        yield store


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_seq2seq_summarize_and_translate_use_the_task_prefixes(store, name):
    llm = LLM(name, device="cpu")
    assert (llm.kind, llm.engine) == ("seq2seq", None) and "continuous batching" in llm.backend.lacks
    text = "The capital of France is Paris."
    greedy = SamplingParams(temperature=0, max_tokens=12)
    [expected] = llm.generate([f"summarize: {text}"], greedy)
    assert llm.summarize(text, max_tokens=12) == expected.outputs[0].text.strip()
    [expected] = llm.generate([f"translate English to French: {text}"], greedy)
    assert llm.translate(text, target="French", max_tokens=12) == expected.outputs[0].text.strip()
    summaries = llm.summarize([text, "Hello, world!"], max_tokens=8)  # a list is one batch
    assert len(summaries) == 2 and all(isinstance(s, str) for s in summaries)


def test_seq2seq_classifies_by_target_likelihood(store):
    llm = LLM("t5", device="cpu")
    labels = ["river", "engine"]
    result = llm.classify("Once upon a time", labels)
    prompt = "Classify as one of river, engine: Once upon a time"
    scores = [lp for lp, _ in llm.backend.loglikelihood([(prompt, label) for label in labels])]
    assert result.label == labels[scores.index(max(scores))]
    assert math.isclose(sum(result.scores.values()), 1.0, rel_tol=1e-9)


def test_bert_classifier_uses_its_own_head(store):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    llm = LLM("bert-cls", device="cpu")
    assert llm.kind == "classifier"
    texts = ["Hello, world!", "The capital of Italy is Rome."]
    results = llm.classify(texts)
    folder = store.path("bert-cls")
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        probs = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    for result, row in zip(results, probs):
        assert result.label == LABELS[int(row.argmax())]
        assert [result.scores[LABELS[i]] for i in range(3)] == pytest.approx(row.tolist(), abs=1e-5)
    assert llm.classify(texts[0], labels=list(LABELS.values())).label == results[0].label
    with pytest.raises(InvalidRequestError, match="cannot score"):
        llm.classify(texts[0], labels=["cat", "dog"])
    with pytest.raises(InvalidRequestError, match="needs a model that generates text"):
        llm.summarize("Hello")
    with pytest.raises(InvalidRequestError, match="transformers engine"):
        llm.chat([{"role": "user", "content": "Hi"}])


def test_eval_runs_on_a_seq2seq_model(store, tmp_path):
    import json

    from llmasos.eval.run import EvalConfig, evaluate

    task = tmp_path / "mc.jsonl"
    rows = [{"context": "Once upon a", "choices": ["time", "river"], "answer": 0},
            {"context": "Hello,", "choices": ["world", "engine"], "answer": 0}]  # fmt: skip
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    llm = LLM("t5", device="cpu")
    report = evaluate(llm, "t5", EvalConfig(str(task)))
    scores = llm.backend.loglikelihood([(r["context"], f" {c}") for r in rows for c in r["choices"]])
    expected = sum(scores[2 * i][0] > scores[2 * i + 1][0] for i in range(2)) / 2
    assert report.metrics["acc"] == expected
    assert report.signature.model_digest == store.get("t5").digest and report.signature.dtype == "float32"
    with pytest.raises(InvalidRequestError, match="need a decoder model"):
        evaluate(llm, "t5", EvalConfig("perplexity", data=task))
