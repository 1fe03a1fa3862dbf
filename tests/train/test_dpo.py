"""DPO on a tiny model: the chosen-vs-rejected margin grows (LoRA and full), the reference stays put."""

import json
import math
from pathlib import Path

import pytest
import torch

from llmasos.errors import LLMasOSError
from llmasos.tokenizer import Tokenizer
from llmasos.train.dpo import DPOConfig, DPOLoss, PairData, load_pairs, run_dpo, tokenize_response
from llmasos.train.finetune import load_base_model, prepare, resolve_base
from llmasos.train.sft import IGNORE
from llmasos.train.trainer import Trainer

PAIRS = [
    {"prompt": "What is the password?", "chosen": "swordfish", "rejected": "hunter2"},
    {"prompt": [{"role": "user", "content": "Say hello."}], "chosen": "Hello!", "rejected": "No."},
    {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Rome."},
    {
        "prompt": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "How are you?"},
        ],
        "chosen": "I am fine, thank you.",
        "rejected": "Go away.",
    },
]


def pairs_file(tmp_path: Path, records: list = PAIRS) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def settings(tmp_path: Path, **overrides) -> DPOConfig:
    values = dict(
        model="tiny", data=pairs_file(tmp_path), max_steps=15, lr=1e-2, batch_size=2, warmup_steps=0,
        eval_fraction=0.0, beta=0.5, out_dir=tmp_path / "run", precision="fp32", log_every=1,
    )  # fmt: skip
    return DPOConfig(**{**values, **overrides})


def test_only_the_response_is_counted(store):
    tokenizer = Tokenizer.from_dir(store.path("tiny"))
    example = tokenize_response(tokenizer, PAIRS[3]["prompt"], "Fine.", "test")
    counted = [t for t in example.labels if t != IGNORE]
    assert (
        tokenizer.decode(counted, skip_special_tokens=False) == "Fine.<|im_end|>"
    )  # not the earlier "Hello"
    prompt = tokenizer.apply_chat_template(PAIRS[3]["prompt"])
    assert example.input_ids[: len(tokenizer.encode(prompt))] == tokenizer.encode(prompt)


def test_bad_pairs_are_named(store, tmp_path):
    tokenizer = Tokenizer.from_dir(store.path("tiny"))
    bad = pairs_file(tmp_path, [PAIRS[0], {"prompt": "x", "chosen": "y"}])
    with pytest.raises(LLMasOSError, match="line 2: expected"):
        load_pairs(bad, tokenizer, 256)
    with pytest.raises(LLMasOSError, match="beta must be positive"):
        settings(tmp_path, beta=0)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_raises_the_chosen_margin(store, tmp_path, method):
    folder = run_dpo(settings(tmp_path, method=method, lr=1e-2 if method == "lora" else 1e-3))
    card = json.loads((folder / "model_card.json").read_text())
    before, after = card["preference"]["before"], card["preference"]["after"]
    assert before["reward_margin"] == pytest.approx(0, abs=1e-5)  # policy == reference at the start
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert after["reward_accuracy"] == 1.0 > before["reward_accuracy"]
    assert after["reward_margin"] > 0.5 and after["loss"] < before["loss"] - 0.2
    losses = [
        json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert losses[-1] < losses[0]
    assert card["method"] == method and folder.name == "tiny-dpo"


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_reference_model_is_untouched(store, tmp_path, method):
    config = settings(tmp_path, method=method, max_steps=3, lr=1e-2)
    base = resolve_base(config)
    original = {name: p.detach().clone() for name, p in load_base_model(base).named_parameters()}
    model = load_base_model(base)
    reference = None if method == "lora" else load_base_model(base).requires_grad_(False).eval()
    policy = prepare(model, config)
    pairs = load_pairs(config.data, Tokenizer.from_dir(base.folder), 256)
    Trainer(policy, PairData(pairs, 0), None, config, loss_fn=DPOLoss(config.beta, reference)).fit()

    if method == "full":
        assert all(torch.equal(p, original[name]) for name, p in reference.named_parameters())
        assert any(not torch.equal(p, original[name]) for name, p in policy.named_parameters())
    else:  # the frozen base weights inside the peft model are the reference
        base_weights = {
            name.removeprefix("base_model.model.").replace(".base_layer.", "."): p
            for name, p in policy.named_parameters()
            if "lora_" not in name
        }
        assert base_weights.keys() == original.keys()
        assert all(torch.equal(p, original[name]) for name, p in base_weights.items())
        assert any(
            not torch.equal(p, torch.zeros_like(p)) for n, p in policy.named_parameters() if "lora_B" in n
        )
