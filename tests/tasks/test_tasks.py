"""The everyday tasks on the tiny Llama: each is its template plus the decoding it promises."""

import math

import jsonschema
import pytest

from llmasos import LLM, SamplingParams
from llmasos.errors import InvalidRequestError
from llmasos.runtime.scoring import loglikelihood
from llmasos.tasks import Classification, Tasks, load_templates


@pytest.fixture(scope="module")
def llm(store):
    return LLM("tiny", device="cpu", max_model_len=256, num_kv_blocks=256, block_size=8)


def greedy_text(llm, prompt, max_tokens, **params):
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens, **params))
    return out[0].outputs[0].text


def chat(llm, content):
    return llm.tokenizer.apply_chat_template([{"role": "user", "content": content}])


def test_summarize_translate_answer_use_their_templates_in_the_chat_template(llm):
    text = "The capital of France is Paris. The capital of Italy is Rome."
    templates = load_templates()
    summary = llm.summarize(text, max_words=10)
    prompt = templates["summarize"]["prompt"].format(text=text, max_words=10)
    expected = greedy_text(llm, chat(llm, prompt), 20)
    assert summary == expected.strip()
    translation = llm.translate(text, target="French")
    prompt = templates["translate"]["prompt"].format(text=text, source="English", target="French")
    budget = 2 * len(llm.tokenizer.encode(text))
    assert translation == greedy_text(llm, chat(llm, prompt), budget).strip()
    questions = ["What is the capital of France?", "And of Italy?"]
    answers = llm.answer(questions, text, max_tokens=8)
    template = templates["answer"]["prompt"]
    assert answers == [
        greedy_text(llm, chat(llm, template.format(question=q, context=text)), 8).strip() for q in questions
    ]


def test_templates_are_data_a_user_overrides(llm, store, tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text('summarize:\n  prompt: "TL;DR of {text}"\n')
    mine = LLM("tiny", templates=str(path), device="cpu", max_model_len=256, num_kv_blocks=64, block_size=8)
    assert mine.tasks.templates["summarize"]["prompt"] == "TL;DR of {text}"
    assert mine.tasks.templates["translate"] == load_templates()["translate"]  # the rest stay
    expected = greedy_text(llm, chat(llm, "TL;DR of Hello, world!"), 6).strip()
    assert mine.summarize("Hello, world!", max_tokens=6) == expected
    for bad, match in [
        ('summarize:\n  prompt: "no placeholder"\n', r"must use \{text\}"),
        ('summarize:\n  prompt: "{text} {oops}"\n', "oops"),
        ("poetry:\n  prompt: x\n", "unknown task 'poetry'"),
        ("summarize: [1, 2]\n", "mapping"),
        ("summarize: {prompt: '{text'}\n", "malformed"),
        ("complete_code: {stop: {python: ['x']}}\n", "with a default list"),
        ("complete_code: {stop: {default: 'x'}}\n", "with a default list"),
    ]:
        path.write_text(bad)
        with pytest.raises(InvalidRequestError, match=match):
            load_templates(path)
    with pytest.raises(InvalidRequestError, match="is not a file"):
        load_templates(tmp_path / "missing.yaml")


def test_classify_compares_label_likelihoods(llm):
    labels = ["river", "engine", "cloud"]
    texts = ["Once upon a time", "def add(a, b):"]
    results = llm.classify(texts, labels)
    template = load_templates()["classify"]["prompt"]
    for text, result in zip(texts, results):
        assert isinstance(result, Classification)
        assert math.isclose(sum(result.scores.values()), 1.0, rel_tol=1e-9)
        prompt = chat(llm, template.format(text=text, labels="river, engine, cloud"))
        scores = [lp for lp, _ in loglikelihood(llm, [(prompt, label) for label in labels])]
        assert result.label == labels[scores.index(max(scores))]
        probabilities = [math.exp(s - max(scores)) for s in scores]
        assert result.scores["cloud"] == pytest.approx(probabilities[2] / sum(probabilities))
    assert llm.classify("Hello", labels).label in labels  # one text in, one result out
    for bad in (["only"], ["same", "same"], [], ["yes", " "]):
        with pytest.raises(InvalidRequestError, match="at least two distinct"):
            llm.classify("Hello", bad)


def test_extract_follows_the_schema(llm):
    schema = {  # short: the tiny tokenizer spends a token on nearly every character of a schema
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 8}, "n": {"type": "integer", "maximum": 99}},
        "required": ["city", "n"],
        "additionalProperties": False,
    }
    # the default prompt spells the schema out, too long for the tiny model's 256 positions; the grammar
    # enforces it either way
    tasks = Tasks(llm, {"extract": {"prompt": "Extract from: {text}"}})
    records = tasks.extract(["Paris has 2 million people.", "Rome is old."], schema, max_tokens=120)
    for record in records:
        jsonschema.validate(record, schema)
    with pytest.raises(InvalidRequestError, match="JSON Schema"):
        llm.extract("Paris", "not a schema")


def test_complete_code_stops_where_the_block_ends(llm):
    code = "def add(a, b):\n"
    completion = llm.complete_code(code, max_tokens=48)
    unbounded = greedy_text(llm, code, 48)
    stops = load_templates()["complete_code"]["stop"]["python"]
    cut = min([unbounded.find(s) for s in stops if s in unbounded], default=len(unbounded))
    assert completion == unbounded[:cut]
    assert not any(s in completion for s in stops)


def test_bad_task_input_is_refused(llm):
    with pytest.raises(InvalidRequestError, match="the text is empty"):
        llm.summarize("   ")
    with pytest.raises(InvalidRequestError, match="max_words"):
        llm.summarize("Hello", max_words=0)
    with pytest.raises(InvalidRequestError, match="2 questions but 3 contexts"):
        llm.answer(["a?", "b?"], ["x", "y", "z"])


@pytest.mark.slow
def test_task_cli(store, tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "LLMASOS_HOME": str(store.home)}

    def task(*args):
        command = [sys.executable, "-c", "from llmasos.cli import main; main()", "task", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

    result = task("classify", "tiny", "Once upon a time", "--labels", "river, engine")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["label"] in ("river", "engine") and set(answer["scores"]) == {"river", "engine"}
    (tmp_path / "code.py").write_text("def add(a, b):\n")
    result = task("complete_code", "tiny", "--file", str(tmp_path / "code.py"), "--max-tokens", "8")
    assert result.returncode == 0 and result.stdout.startswith("def add(a, b):\n")
    for args, message in [
        (("poetry", "tiny", "x"), "unknown task 'poetry'"),
        (("translate", "tiny", "Hello"), "--target"),
        (("classify", "tiny", "Hello", "--labels", "one"), "at least two distinct"),
    ]:
        bad = task(*args)
        assert bad.returncode == 1 and bad.stderr.startswith("Error:") and message in bad.stderr, bad.stderr
