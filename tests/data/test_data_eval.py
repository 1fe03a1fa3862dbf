"""`llmasos eval --task data:NAME[:COLUMN]`: a store dataset scored as the task its columns make,
or by perplexity of a text column, with the same numbers as the equivalent file task."""

import json

import pytest

from llmasos import LLM
from llmasos.data.store import DatasetStore
from llmasos.errors import InvalidRequestError, LLMasOSError
from llmasos.eval.run import EvalConfig, check_config, evaluate

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France.",
    "One, two, three.",
]
CHOICES = [{"context": t[:12], "choices": [t[12:], "zebra window"], "answer": 0} for t in TEXTS]


@pytest.fixture(scope="module")
def llm(store):
    return LLM("tiny", device="cpu", max_model_len=128, num_kv_blocks=64, block_size=8)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def datasets(store, tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    datasets = DatasetStore()
    datasets.import_path(
        write_jsonl(folder / "texts.jsonl", [{"id": i, "text": t} for i, t in enumerate(TEXTS)]), "texts"
    )
    datasets.import_path(write_jsonl(folder / "mc.jsonl", CHOICES), "mc")
    return datasets


def test_a_text_column_is_scored_by_perplexity_as_the_same_text_file_is(llm, datasets, tmp_path):
    text = tmp_path / "same.txt"
    text.write_text("\n\n".join(TEXTS))
    expected = evaluate(llm, "tiny", EvalConfig("perplexity", data=text))
    for task in ("data:texts", "data:texts:text"):
        report = evaluate(llm, "tiny", EvalConfig(task))
        assert report.task == task and report.metrics == expected.metrics
        assert report.num_examples == expected.num_examples


def test_a_dataset_with_task_columns_is_that_task(llm, datasets, tmp_path):
    expected = evaluate(llm, "tiny", EvalConfig(str(write_jsonl(tmp_path / "mc.jsonl", CHOICES))))
    report = evaluate(llm, "tiny", EvalConfig("data:mc"))
    assert report.task == "data:mc" and report.kind == "multiple_choice"
    assert report.metrics == expected.metrics and report.num_examples == len(CHOICES)
    assert report.signature.task_digest == datasets.get("mc").digest  # the export's sha256


def test_bad_data_tasks_fail_before_a_model_loads(datasets):
    with pytest.raises(LLMasOSError, match="'nope' is not in the store"):
        check_config(EvalConfig("data:nope"))
    with pytest.raises(LLMasOSError, match=r"no text column id.*--column"):
        check_config(EvalConfig("data:texts:id"))
    with pytest.raises(InvalidRequestError, match="names its data; drop --data"):
        check_config(EvalConfig("data:texts", data="x.txt"))
