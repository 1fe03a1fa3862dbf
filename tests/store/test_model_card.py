"""Model cards: licence, digests, training provenance, recorded evaluations and limits of stored models."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from llmasos.errors import StoreError
from llmasos.eval.report import EvalReport, EvalSignature
from llmasos.store import ModelStore
from llmasos.store.card import build_card, card_data_path, record_eval, render_card
from llmasos.train.finetune import Base, FinetuneConfig, model_card
from llmasos.train.trainer import TrainResult

from tiny import save_tiny_model

README = "---\nlicense: mit\nlanguage:\n- en\n- fr\n---\n# tiny\n\nA tiny random Llama.\n"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path / "home"))
    return ModelStore()


def model_folder(tiny_dir, target, files: dict[str, str]):
    """A copy of the tiny model with extra files (README.md, model_card.json)."""
    shutil.copytree(tiny_dir, target)
    for name, text in files.items():
        (target / name).write_text(text)
    return target


def report(manifest, task="qa", accuracy=0.5, shots=0):
    signature = EvalSignature(
        model=manifest.name, model_digest=manifest.digest, task=task, task_digest="sha256:" + "cd" * 32,
        prompt_template="Q: {prompt}\nA:", shots=shots, dtype="float32", quantization=None, batch_size=8,
        seed=0,
    )  # fmt: skip
    metrics = {"acc": accuracy, "acc_norm": 0.25}
    return EvalReport(task, "multiple_choice", metrics, {"acc": 0.1, "acc_norm": 0.1}, 20, signature)


def sha256(path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_readme_licence_languages_and_file_digests(store, tiny_dir, tmp_path):
    folder = model_folder(tiny_dir, tmp_path / "src", {"README.md": README})
    manifest = store.import_path(folder, "tiny", progress=False)
    card = build_card(store, "tiny")
    assert (card.license, card.license_from) == ("mit", "README.md front matter")
    assert card.languages == ["en", "fr"]
    assert card.digest == manifest.digest
    assert set(card.files) == {p.name for p in folder.iterdir()}
    assert all(f["digest"] == sha256(folder / rel) for rel, f in card.files.items())
    markdown = render_card(card)
    assert "**license**: mit (README.md front matter)" in markdown
    assert card.digest in markdown and card.files["model.safetensors"]["digest"] in markdown
    assert json.loads(card.to_json())["files"] == manifest.files


def test_a_model_without_card_says_what_is_unknown(store, tiny_dir):
    store.import_path(tiny_dir, "plain", progress=False)
    card = build_card(store, "plain")
    assert card.license == "unknown" and card.languages == [] and card.training is None
    assert card.limits == [
        "context window: 256 tokens, prompt and answer together",
        "no safety tuning known: put the server's guards in front of untrusted users",
        "languages unknown: neither its README.md nor its GGUF metadata names them",
    ]
    markdown = render_card(card)
    for section in (
        "# plain",
        "## Model details",
        "## Files",
        "## Training",
        "## Evaluation",
        "## Limitations",
    ):
        assert f"\n{section}\n" in f"\n{markdown}"
    assert "No training record" in markdown and "llmasos eval plain --task FILE" in markdown


def test_finetune_provenance_and_the_base_models_licence(store, tiny_dir, tmp_path):
    base = store.import_path(
        model_folder(tiny_dir, tmp_path / "base", {"README.md": README}), "base", progress=False
    )
    data = tmp_path / "chat.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    config = FinetuneConfig(model="base", data=data, method="full", max_steps=20, name="tuned")
    result = TrainResult(
        steps=20, tokens=5120, train_loss=2.5, eval_loss=2.75, eval_perplexity=15.64, seconds=3.2
    )
    training = model_card(config, Base(tmp_path / "base", "base", base.digest, 256), result,
                          torch.nn.Linear(4, 2), examples=1)  # fmt: skip
    folder = model_folder(tiny_dir, tmp_path / "tuned", {"model_card.json": json.dumps(training)})
    store.import_path(folder, "tuned", progress=False)

    card = build_card(store, "tuned")
    assert card.training == training
    assert (card.license, card.license_from) == ("mit", "of its base model base")
    markdown = render_card(card)
    assert f"**base model**: base (`{base.digest}`)" in markdown
    assert f"**data digest**: `{training['data']['digest']}`" in markdown
    assert "**eval perplexity**: 15.64" in markdown and "**max_steps**: 20" in markdown
    assert "**trainable parameters**: 10" in markdown

    # Another model under the base's name is not the base: its licence is not inherited.
    store.import_path(tiny_dir, "base", progress=False)
    assert build_card(store, "tuned").license == "unknown"


def test_an_untrained_pretrain_is_marked_random(store, tiny_dir, tmp_path):
    training = {
        "name": "scratch", "base": None, "method": "pretrain",
        "data": {"files": ["/data/a.txt"], "digest": "sha256:" + "ab" * 32},
        "tokenizer": "byte-level BPE trained on the data (384)", "parameters": 123456,
        "hyperparameters": {"max_steps": 0, "seq_len": 64}, "steps": 0, "tokens": 0, "train_loss": 5.9,
        "eval_loss": None, "eval_perplexity": None, "seconds": 0.1, "date": "2025-01-01T00:00:00+00:00",
    }  # fmt: skip
    folder = model_folder(tiny_dir, tmp_path / "scratch", {"model_card.json": json.dumps(training)})
    store.import_path(folder, "scratch", progress=False)
    card = build_card(store, "scratch")
    assert "untrained: its weights are random, so its output is noise" in card.limits
    markdown = render_card(card)
    assert "**base model**: none (from scratch)" in markdown and "`/data/a.txt`" in markdown


def test_a_quantized_copy_states_its_expected_quality_loss(store, tiny_dir):
    from llmasos.train.quantize import quantize_model

    store.import_path(tiny_dir, "tiny", progress=False)
    quantize_model(store, "tiny", "int8")
    limits = build_card(store, "tiny-int8").limits
    assert any("quantized to Q8_0" in limit and "+0.0026 perplexity" in limit for limit in limits)
    assert not any("quantized" in limit for limit in build_card(store, "tiny").limits)


def test_recorded_evaluations_survive_reopening_and_stay_with_the_bytes(store, tiny_dir, tmp_path):
    first = store.import_path(tiny_dir, "tiny", progress=False)
    assert record_eval(store, "tiny", report(first, accuracy=0.5))
    assert record_eval(store, "tiny", report(first, accuracy=0.75))  # same signature: replaces
    assert record_eval(store, "tiny", report(first, shots=2))
    records = build_card(ModelStore(), "tiny").evaluations
    assert [(r.metrics["acc"], r.signature["shots"]) for r in records] == [(0.75, 0), (0.5, 2)]
    assert records[0].signature["model_digest"] == first.digest
    assert "- **qa** (multiple_choice, 20 examples): acc 0.7500" in render_card(build_card(store, "tiny"))

    # A different model under the same name starts with no results; the first one's come back with it.
    other = store.import_path(save_tiny_model(tmp_path / "other", seed=1), "tiny", progress=False)
    assert other.digest != first.digest and build_card(store, "tiny").evaluations == []
    with pytest.raises(StoreError, match="evaluate 'tiny' again"):
        record_eval(store, "tiny", report(first))
    store.import_path(tiny_dir, "tiny", progress=False)
    assert len(build_card(store, "tiny").evaluations) == 2

    assert not record_eval(store, str(tiny_dir), report(first))  # a folder evaluated in place
    store.remove("tiny")
    assert not card_data_path(store, "tiny").exists()
    store.import_path(tiny_dir, "tiny", progress=False)
    assert build_card(store, "tiny").evaluations == []


@pytest.mark.slow
def test_a_real_evaluation_is_recorded(store, tiny_dir, tmp_path):
    from llmasos import LLM
    from llmasos.eval.run import EvalConfig, evaluate

    store.import_path(tiny_dir, "tiny", progress=False)
    text = tmp_path / "text.txt"
    text.write_text("Once upon a time there was a small model. The capital of France is Paris.\n" * 4)
    llm = LLM("tiny", device="cpu", max_model_len=128, num_kv_blocks=64, block_size=8)
    real = evaluate(llm, "tiny", EvalConfig("perplexity", data=text))
    assert record_eval(store, "tiny", real)
    (record,) = build_card(store, "tiny").evaluations
    assert record.task == "perplexity" and record.metrics == real.metrics


@pytest.mark.parametrize(
    "text, problem",
    [
        ("{not json", "Expecting property name"),
        ('["limits"]', "not a JSON object"),
        ('{"limits": "English only"}', "'limits' is not a list of strings"),
        ('{"limit": ["English only"]}', "unknown key(s) limit"),
        ('{"evaluations": {"sha256:x": [{"task": "qa"}]}}', "missing"),
        ('{"evaluations": {"sha256:x": [{"task": "qa", "kind": "k", "metrics": {"acc": "high"}, '
         '"num_examples": 1, "signature": {}, "recorded": ""}]}}', "metrics of the 'qa' evaluation"),
    ],
)  # fmt: skip
def test_damaged_card_data_is_a_clear_error(store, tiny_dir, text, problem):
    manifest = store.import_path(tiny_dir, "tiny", progress=False)
    path = card_data_path(store, "tiny")
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(StoreError, match="card data of 'tiny'.*is damaged") as error:
        build_card(store, "tiny")
    assert problem in str(error.value) and str(path) in str(error.value)
    with pytest.raises(StoreError, match="is damaged"):
        record_eval(store, "tiny", report(manifest))
    assert path.read_text() == text  # nothing recorded over it


def test_a_damaged_training_record_is_a_clear_error(store, tiny_dir, tmp_path):
    store.import_path(
        model_folder(tiny_dir, tmp_path / "m", {"model_card.json": "{oops"}), "m", progress=False
    )
    with pytest.raises(StoreError, match="model_card.json is not JSON"):
        build_card(store, "m")


@pytest.mark.slow
def test_gguf_metadata_gives_licence_languages_and_quantization(store, smollm2_gguf):
    store.import_path(smollm2_gguf, "smol", progress=False)
    card = build_card(store, "smol")
    assert (card.license, card.license_from) == ("apache-2.0", "GGUF metadata general.license")
    assert card.languages == ["en"]
    assert any("quantized to Q4_1 by its GGUF file" in limit and "+0.4511" in limit for limit in card.limits)


@pytest.mark.slow
def test_cli_show_card(store, tiny_dir, tmp_path):
    manifest = store.import_path(tiny_dir, "tiny", progress=False)
    record_eval(store, "tiny", report(manifest))
    card_data_path(store, "tiny").write_text(
        json.dumps({**json.loads(card_data_path(store, "tiny").read_text()), "limits": ["English only"]})
    )
    env = {**os.environ, "LLMASOS_HOME": str(store.home), "COLUMNS": "200"}

    def show(*flags):
        command = [sys.executable, "-c", "from llmasos.cli import main; main()", "show", "tiny", *flags]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)

    shown = show("--card")
    assert shown.returncode == 0, shown.stderr
    for text in ("Model details", "Files", "Training", "Evaluation", "Limitations", "English only",
                 manifest.digest, "acc 0.5000"):  # fmt: skip
        assert text in shown.stdout
    as_json = json.loads(show("--json").stdout)
    assert as_json["digest"] == manifest.digest and as_json["limits"][-1] == "English only"

    card_data_path(store, "tiny").write_text("{")
    broken = show("--card")
    assert broken.returncode == 1 and broken.stderr.startswith("Error: ")
    assert "is damaged" in broken.stderr and "Traceback" not in broken.stderr
