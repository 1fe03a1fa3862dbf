"""The training core: loss goes down, resume is exact, crashes mid-checkpoint lose nothing, the
result lands in the store and runs, configs and bad data fail clearly before any compute.

Models are tiny Llamas (2 layers, d_model 32) on CPU in fp32, where every run is deterministic.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from llmasos.errors import LLMasOSError
from llmasos.train import checkpoint
from llmasos.train.config import TrainConfig, load_config
from llmasos.train.data import PackedText
from llmasos.train.pretrain import PretrainConfig, run_pretrain
from llmasos.train.trainer import Trainer, lr_factor

from tiny import save_tiny_model

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A small model learns to repeat what it has read many times.",
    "Paris is the capital of France and Rome is the capital of Italy.",
]
TEXT = " ".join(SENTENCES[i % 3] for i in range(120))
TINY_MODEL = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, seq_len=32)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def tiny_pretrain(tmp_path, **overrides) -> PretrainConfig:
    (tmp_path / "text.txt").write_text(TEXT)
    settings = dict(
        out_dir=tmp_path / "run", data=[str(tmp_path / "text.txt")], vocab_size=320, max_steps=60,
        batch_size=8, lr=1e-2, warmup_steps=5, eval_every=30, save_every=30, log_every=1,
        precision="fp32", distributed="none", name="tiny-pretrained", **TINY_MODEL,
    )  # fmt: skip
    return PretrainConfig(**{**settings, **overrides})


def records(out_dir, key="loss") -> list[tuple[int, float]]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r[key]) for r in map(json.loads, lines) if key in r]


def test_pretrain_overfits_registers_and_runs(tmp_path, home):
    from llmasos import LLM
    from llmasos.sampling_params import SamplingParams
    from llmasos.store import ModelStore

    config = tiny_pretrain(tmp_path)
    path = run_pretrain(config)

    losses = [loss for _, loss in records(config.out_dir)]
    assert len(losses) == 60
    assert losses[-1] < 0.3 * losses[0]
    (step, eval_loss), *_ = records(config.out_dir, "eval_loss")[-1:]
    assert step == 60
    perplexity = records(config.out_dir, "eval_perplexity")[-1][1]
    assert perplexity == pytest.approx(math.exp(eval_loss))
    assert (config.out_dir / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (config.out_dir / "checkpoints").iterdir()) == [
        "latest", "step-000030", "step-000060",
    ]  # fmt: skip

    assert path == ModelStore().path("tiny-pretrained")
    card = json.loads((path / "model_card.json").read_text())
    assert card["base"] is None and card["method"] == "pretrain"
    assert card["data"]["digest"].startswith("sha256:")
    assert card["eval_loss"] == pytest.approx(eval_loss)
    assert card["eval_perplexity"] == pytest.approx(perplexity)
    assert card["hyperparameters"]["lr"] == 1e-2 and card["tokens"] == 60 * 8 * 32
    assert "model_card.json" in ModelStore().get("tiny-pretrained").files

    out = LLM("tiny-pretrained").generate("The quick brown", SamplingParams(max_tokens=8))[0].outputs[0]
    assert len(out.token_ids) == 8
    assert out.text.startswith(" fox")  # it learned the text


def test_data_from_a_folder_is_packed_once_and_read_by_index(tmp_path, home, monkeypatch):
    from llmasos.train import data

    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(TEXT)
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES * 10))
    _parquet(folder / "sub" / "c.parquet", "text")
    (folder / "notes.md").write_text("ignored")
    files = data.find_files([str(folder)])
    assert [f.name for f in files] == ["a.txt", "b.jsonl", "c.parquet"]
    assert [len(data.read_documents(f)) for f in files] == [1, 30, 2]

    tokenizer = data.train_tokenizer(files, 300, tmp_path / "tok")
    digest = data.digest_files(files)
    rows = data.packed_tokens(files, digest, tokenizer, 16, tmp_path / "cache")
    assert rows.shape[1] == 17 and isinstance(rows, np.memmap)
    monkeypatch.setattr(data, "_tokenize", lambda *a: pytest.fail("tokenized twice"))
    assert np.array_equal(data.packed_tokens(files, digest, tokenizer, 16, tmp_path / "cache"), rows)

    train_rows, eval_rows = data.split(len(rows), 0.1, seed=0)
    assert len(eval_rows) == max(1, round(len(rows) * 0.1)) and not set(train_rows) & set(eval_rows)
    source = PackedText(rows, train_rows, seed=0)
    batch = source.batch(3, 4)
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])  # shifted views of one row
    assert torch.equal(PackedText(rows, train_rows, seed=0).batch(3, 4)["labels"], batch["labels"])
    epoch = torch.cat([source.batch(i, 1)["labels"] for i in range(len(train_rows))])
    assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, rows[train_rows, 1:].tolist()))


# ---- the loop on raw token ids: exactness -----------------------------------------------------


def tiny_llama(dropout: float):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16, attention_dropout=dropout,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def token_sources():
    tokens = np.random.default_rng(0).integers(0, 64, size=(40, 17)).astype(np.uint16)
    return PackedText(tokens, np.arange(36), seed=0), PackedText(tokens, np.arange(36, 40), seed=0)


def loop_config(out_dir, **overrides) -> TrainConfig:
    settings = dict(
        out_dir=out_dir, max_steps=8, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=4, eval_batches=2,
        save_every=3, log_every=1, precision="fp32", distributed="none",
    )  # fmt: skip
    return TrainConfig(**{**settings, **overrides})


def train(out_dir, dropout: float = 0.1, **overrides):
    """Dropout on by default: a resumed run must restore the RNG states as well as the weights."""
    train_source, eval_source = token_sources()
    return Trainer(tiny_llama(dropout), train_source, eval_source, loop_config(out_dir, **overrides)).fit()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("uninterrupted")
    result = train(out_dir)
    return records(out_dir), records(out_dir, "eval_loss"), result


def test_resume_gives_the_same_losses(tmp_path, uninterrupted):
    losses, eval_losses, result = uninterrupted
    calls = 0

    def crash_at_step_5(model, batch):
        nonlocal calls
        calls += 1
        if calls == 5:
            raise KeyboardInterrupt
        from llmasos.train.trainer import causal_lm_loss

        return causal_lm_loss(model, batch)

    train_source, eval_source = token_sources()
    with pytest.raises(KeyboardInterrupt):
        Trainer(
            tiny_llama(0.1), train_source, eval_source, loop_config(tmp_path), loss_fn=crash_at_step_5
        ).fit()
    assert checkpoint.latest(tmp_path).name == "step-000003"
    assert [step for step, _ in records(tmp_path)] == [1, 2, 3, 4]

    with pytest.raises(LLMasOSError, match="--resume"):  # never mixed into an earlier run's checkpoints
        train(tmp_path)
    resumed = train(tmp_path, resume=True)
    assert records(tmp_path) == losses  # exactly: same floats, steps 4 and 5 recomputed
    assert records(tmp_path, "eval_loss") == eval_losses
    assert resumed.train_loss == result.train_loss and resumed.tokens == result.tokens


def test_killed_during_checkpoint_write_resumes_from_the_previous_one(tmp_path, monkeypatch, uninterrupted):
    losses, _, _ = uninterrupted
    real_write = checkpoint._write

    def write_then_die(path, obj):
        real_write(path, obj)
        if path.parent.name.startswith(".tmp-step-000006"):
            raise SystemExit("killed mid-write")  # after model.pt, before optimizer.pt

    monkeypatch.setattr(checkpoint, "_write", write_then_die)
    with pytest.raises(SystemExit):
        train(tmp_path)
    monkeypatch.setattr(checkpoint, "_write", real_write)
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-000003"
    assert [p.name for p in root.glob(".tmp-*")] and not (root / "step-000006").exists()

    train(tmp_path, resume=True)
    assert records(tmp_path) == losses
    assert not list(root.glob(".tmp-*"))  # the stale temp folder was cleaned up
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000006", "step-000008"]  # last 2 kept


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    train(tmp_path / "big", dropout=0.0, batch_size=4)
    train(tmp_path / "accum", dropout=0.0, batch_size=2, grad_accum=2)
    big_losses = [loss for _, loss in records(tmp_path / "big")]
    accum_losses = [loss for _, loss in records(tmp_path / "accum")]
    assert accum_losses == pytest.approx(big_losses, rel=1e-4)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(step, 10, 100, 0.1) for step in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


# ---- configs and the CLI ----------------------------------------------------------------------


def test_yaml_config_with_cli_overrides(tmp_path, home):
    from llmasos.cli import app
    from llmasos.store import ModelStore
    from llmasos.tokenizer import Tokenizer

    save_tiny_model(tmp_path / "base")
    ModelStore().import_path(tmp_path / "base", "base", progress=False)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES * 40))
    (tmp_path / "run.yaml").write_text(
        f"data: {tmp_path / 'docs.jsonl'}\nout-dir: {tmp_path / 'run'}\ntokenizer: base\nmax_steps: 50\n"
        "batch-size: 4\nlr: 3e-3\nwarmup-steps: 1\nn-layers: 1\nd-model: 32\nn-heads: 4\nn-kv-heads: 4\n"
        "d-ff: 64\nseq-len: 16\nprecision: fp32\n"
    )
    result = CliRunner().invoke(
        app,
        ["pretrain", "--config", str(tmp_path / "run.yaml"), "--max-steps", "3", "--log-every", "1",
         "--name", "from-cli"],
    )  # fmt: skip
    assert result.exit_code == 0, (result.output, result.exception)

    assert "pretrained from-cli" in result.output
    assert [step for step, _ in records(tmp_path / "run")] == [1, 2, 3]  # the flag beat the file
    card = json.loads((ModelStore().path("from-cli") / "model_card.json").read_text())
    assert card["hyperparameters"]["lr"] == 3e-3 and card["hyperparameters"]["batch_size"] == 4
    config = json.loads((ModelStore().path("from-cli") / "config.json").read_text())
    assert config["vocab_size"] == Tokenizer.from_dir(ModelStore().path("base")).vocab_size  # reused


def test_load_config_names_unknown_keys(tmp_path):
    (tmp_path / "bad.yaml").write_text("max-steps: 10\nlearning-rate: 0.1\n")
    with pytest.raises(LLMasOSError, match="unknown config key 'learning-rate'; allowed: out-dir, max-steps"):
        load_config(TrainConfig, tmp_path / "bad.yaml", {})
    with pytest.raises(LLMasOSError, match="unknown config key 'colour'"):
        load_config(PretrainConfig, None, {"colour": "blue"})
    with pytest.raises(LLMasOSError, match="'max_steps' must be int"):
        load_config(TrainConfig, None, {"max_steps": "many"})
    (tmp_path / "ok.yaml").write_text("max_steps: 10\nlr: 1\ndata: a.txt\n")
    config = load_config(PretrainConfig, tmp_path / "ok.yaml", {"max-steps": 20, "seed": None})
    assert (config.max_steps, config.lr, config.data, config.seed) == (20, 1.0, ["a.txt"], 0)
    assert load_config(PretrainConfig, None, {"tokenizer": "base", "data": ("a", "b")}).data == ["a", "b"]


# ---- bad input: a clear error before any training ---------------------------------------------


def _parquet(path, column):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: ["some text", "more text"]}), path)


BAD_JSONL = '{"text": "a"}\n\n{"text": 1}\n'


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "missing.txt does not exist"),
        ("empty.txt", "  \n", "empty.txt is empty"),
        ("bad.jsonl", BAD_JSONL, 'bad.jsonl, line 3: expected an object with a "text" string'),
        ("broken.jsonl", '{"text": "a"}\n{"text": \n', "broken.jsonl, line 2: not valid JSON"),
        ("notext.parquet", "content", 'no "text" column \\(its columns: content\\)'),
        ("data.csv", "a,b", "unknown format '.csv'"),
        ("short.txt", "just a few words", "too few for one sequence"),
    ],
)
def test_bad_data_fails_before_training(tmp_path, home, monkeypatch, name, content, message):
    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr("llmasos.train.trainer.Trainer.__init__", no_training)
    if name.endswith(".parquet"):
        _parquet(tmp_path / name, column=content)
    elif content is not None:
        (tmp_path / name).write_text(content)
    config = tiny_pretrain(tmp_path, data=[str(tmp_path / name)], seq_len=64)
    with pytest.raises(LLMasOSError, match=message):
        run_pretrain(config)
    assert not (config.out_dir / "checkpoints").exists()


def test_bad_model_shapes_fail_at_config_time(tmp_path):
    with pytest.raises(LLMasOSError, match="multiple of n_kv_heads"):
        PretrainConfig(out_dir=tmp_path, n_heads=4, n_kv_heads=3, d_model=32)
    with pytest.raises(LLMasOSError, match="seq_len must be at least 1"):
        PretrainConfig(out_dir=tmp_path, seq_len=0)
    with pytest.raises(LLMasOSError, match="precision must be one of"):
        TrainConfig(out_dir=tmp_path, precision="fp8")
