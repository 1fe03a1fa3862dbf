"""Lineage end to end: import -> prepare -> finetune --data <dataset> -> the card names the dataset,
its digest, its parent and its recipe."""

import json

from llmasos.data.pipeline.run import prepare
from llmasos.data.store import DatasetStore
from llmasos.store import ModelStore
from llmasos.store.card import build_card, render_card
from llmasos.train.finetune import FinetuneConfig, run_finetune

from tiny import save_tiny_model

CHAT = {"messages": [{"role": "user", "content": "Password?"}, {"role": "assistant", "content": "swordfish"}]}


def test_a_model_finetuned_on_a_prepared_dataset_names_it_in_its_card(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path / "home"))
    ModelStore().import_path(save_tiny_model(tmp_path / "llama"), "tiny")
    datasets = DatasetStore()
    raw = tmp_path / "chat.jsonl"
    bad = {"messages": [{"role": "user", "content": "no answer"}]}
    raw.write_text("".join(json.dumps(r) + "\n" for r in [CHAT, bad, CHAT]))
    parent = datasets.import_path(raw, "chat-raw")
    (tmp_path / "clean.yaml").write_text("column: messages\nsteps:\n  - chat_format: {}\n")
    clean = prepare(datasets, "chat-raw", str(tmp_path / "clean.yaml"), "chat-clean", progress=False)
    assert clean.rows == 2

    config = FinetuneConfig(
        model="tiny", data="chat-clean", name="tiny-chat", max_steps=2, batch_size=1, warmup_steps=0,
        eval_fraction=0.0, out_dir=tmp_path / "run", precision="fp32", method="lora",
    )  # fmt: skip
    run_finetune(config)

    card = build_card(ModelStore(), "tiny-chat")
    dataset = card.training["data"]["dataset"]
    assert card.training["data"]["digest"] == clean.digest == dataset["digest"]  # the export's sha256
    assert dataset["name"] == "chat-clean"
    assert dataset["recipe"]["digest"] == clean.lineage["recipe"]["digest"]
    assert dataset["sources"] == [{"source": "dataset:chat-raw", "digest": parent.digest}]
    shown = render_card(card)
    assert f"chat-clean (`{clean.digest}`, 2 rows)" in shown
    assert f"dataset:chat-raw (`{parent.digest}`)" in shown and "chat_format" in shown
