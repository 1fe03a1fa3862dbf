"""Supervised fine-tuning on tiny models: assistant-only loss masks, LoRA (as an adapter the kernel
applies at load time, and merged), frozen layers, full fine-tuning, the CLI, and bad input."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from llmasos import LLM, SamplingParams
from llmasos.errors import LLMasOSError
from llmasos.tokenizer import Tokenizer
from llmasos.train.finetune import FinetuneConfig, run_finetune
from llmasos.train.sft import IGNORE, ChatData, load_chat, tokenize_chat

from tiny import save_tiny_model

ENGINE = dict(device="cpu", block_size=4, num_kv_blocks=64)
GREEDY = SamplingParams(temperature=0, max_tokens=12)
QUESTION = [{"role": "user", "content": "What is the password?"}]
TAUGHT = "swordfish"


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def password_data(tmp_path: Path) -> Path:
    return write_jsonl(
        tmp_path / "chat.jsonl", [{"messages": QUESTION + [{"role": "assistant", "content": TAUGHT}]}]
    )


def settings(tmp_path: Path, **overrides) -> FinetuneConfig:
    if "data" not in overrides:
        overrides["data"] = password_data(tmp_path)
    values = dict(
        model="tiny", max_steps=12, lr=2e-2, batch_size=1, warmup_steps=0,
        eval_fraction=0.0, out_dir=tmp_path / "run", precision="fp32",
    )  # fmt: skip
    return FinetuneConfig(**{**values, **overrides})


def answer(name: str) -> str:
    return LLM(name, **ENGINE).chat(QUESTION, GREEDY)[0].outputs[0].text


# --- data --------------------------------------------------------------------------------------------


def test_loss_counts_exactly_the_assistant_tokens_and_their_end(store):
    tokenizer = Tokenizer.from_dir(store.path("tiny"))
    messages = [
        {"role": "system", "content": "Be brief."},
        *QUESTION,
        {"role": "assistant", "content": TAUGHT},
        {"role": "user", "content": "Again?"},
        {"role": "assistant", "content": "fish"},
    ]
    example = tokenize_chat(tokenizer, messages, "test")

    # what the template renders around the answers, tokenized as the engine tokenizes a prompt
    prompt_1 = tokenizer.apply_chat_template(messages[:2])
    between = (
        "\n" + tokenizer.apply_chat_template(messages[:4])[len(prompt_1) + len(TAUGHT + "<|im_end|>\n") :]
    )
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    answer_1, answer_2 = encode(TAUGHT + "<|im_end|>"), encode("fish<|im_end|>")
    expected = (
        [IGNORE] * len(tokenizer.encode(prompt_1)) + answer_1 + [IGNORE] * len(encode(between)) + answer_2
        + [IGNORE] * len(encode("\n"))
    )  # fmt: skip
    assert example.labels == expected
    assert example.input_ids == tokenizer.encode(
        tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    )
    im_end = tokenizer.eos_token_ids[0]
    assert [t for t in example.labels if t == im_end] == [im_end, im_end]  # each turn's stop token counts

    # batches: labels shifted to the next token, padding masked out of both the loss and attention
    short = tokenize_chat(tokenizer, QUESTION + [{"role": "assistant", "content": "no"}], "test")
    data = ChatData([example, short], pad_id=0, seed=1)
    batch = data.batch(0, 2)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    for row in range(2):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        length = int(mask.sum())
        counted = labels != IGNORE
        assert torch.equal(labels[:-1][counted[:-1]], ids[1:][counted[:-1]])
        assert not counted[length - 1 :].any()


def test_batches_are_a_seeded_shuffle_epoch_by_epoch(store, tmp_path):
    tokenizer = Tokenizer.from_dir(store.path("tiny"))
    records = [{"messages": QUESTION + [{"role": "assistant", "content": "x" * (i + 1)}]} for i in range(5)]
    examples = load_chat(write_jsonl(tmp_path / "chat.jsonl", records), tokenizer, 256)
    data = ChatData(examples, pad_id=0, seed=3)
    epochs = [data.stream.indices(i, 5) for i in range(3)]
    assert all(sorted(epoch) == list(range(5)) for epoch in epochs)
    assert epochs[0] != epochs[1]
    assert ChatData(examples, pad_id=0, seed=3).stream.indices(7, 2) == data.stream.indices(7, 2)


GOOD_LINE = json.dumps({"messages": QUESTION + [{"role": "assistant", "content": "no"}]}) + "\n"
BAD_DATA = [
    ("missing", None, "does not exist"),
    ("empty", "", "is empty"),
    ("malformed", GOOD_LINE + '{"messages": [\n', "line 2: not valid JSON"),
    ("not an object", "[1, 2]\n", "line 1: expected a JSON object"),
    ("no assistant", json.dumps({"messages": QUESTION}) + "\n", "line 1: the conversation has no assistant"),
    ("unknown role", json.dumps({"messages": [{"role": "robot", "content": "hi"}]}) + "\n", "unknown role"),
    ("too long", json.dumps({"messages": QUESTION + [{"role": "assistant", "content": "a " * 300}]}) + "\n",
     "line 1: the conversation is"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "text", "message"), BAD_DATA, ids=[case for case, _, _ in BAD_DATA])
def test_bad_data_fails_before_any_compute(store, tmp_path, case, text, message):
    data = tmp_path / "chat.jsonl"
    if text is not None:
        data.write_text(text)
    with pytest.raises(LLMasOSError, match=message) as error:
        run_finetune(settings(tmp_path, data=data))
    if case == "too long":
        assert "--max-seq-len" in str(error.value) and "--truncate" in str(error.value)
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_truncate_cuts_long_conversations(store, tmp_path):
    tokenizer = Tokenizer.from_dir(store.path("tiny"))
    data = write_jsonl(
        tmp_path / "chat.jsonl", [{"messages": QUESTION + [{"role": "assistant", "content": "a " * 40}]}]
    )
    (example,) = load_chat(data, tokenizer, max_seq_len=30, truncate=True)
    assert len(example.input_ids) == 30


def test_bad_settings_are_named(store, tmp_path):
    with pytest.raises(LLMasOSError, match="unknown method 'qlora'; use one of full, freeze, lora"):
        settings(tmp_path, method="qlora")
    with pytest.raises(LLMasOSError, match="not linear layers of this model"):
        run_finetune(settings(tmp_path, target_modules=["c_attn"]))
    with pytest.raises(LLMasOSError, match="replace its own base model"):
        run_finetune(settings(tmp_path, name="tiny"))
    with pytest.raises(LLMasOSError, match="between 1 and the model's context"):
        run_finetune(settings(tmp_path, max_seq_len=100_000))


# --- LoRA ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_models(store, tmp_path_factory):
    """The password taught with LoRA: stored as an adapter and as a merged model."""
    tmp = tmp_path_factory.mktemp("lora")
    adapter = run_finetune(settings(tmp, out_dir=tmp / "adapter", name="tiny-lora"))
    merged = run_finetune(settings(tmp, out_dir=tmp / "merged", name="tiny-merged", merge=True))
    return adapter, merged


def test_lora_teaches_the_answer(store, lora_models):
    assert answer("tiny") != TAUGHT
    assert answer("tiny-lora") == TAUGHT  # the adapter, applied by the kernel at load time
    assert answer("tiny-merged") == TAUGHT


def test_adapter_is_stored_small_with_a_model_card(store, lora_models):
    adapter, _ = lora_models
    files = sorted(store.get("tiny-lora").files)
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert not any(name.startswith("model") and name.endswith(".safetensors") for name in files)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    card = json.loads((adapter / "model_card.json").read_text())
    assert card["base_model"] == {"name": "tiny", "digest": store.get("tiny").digest}
    assert card["method"] == "lora" and card["hyperparameters"]["lora_rank"] == 8
    assert card["data"]["digest"].startswith("sha256:") and card["results"]["steps"] == 12


def test_adapter_at_load_time_merged_model_and_peft_agree(store, lora_models):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    params = SamplingParams(temperature=0, max_tokens=6, logprobs=5, ignore_eos=True)
    outs = [LLM(name, **ENGINE).chat(QUESTION, params)[0] for name in ("tiny-lora", "tiny-merged")]
    adapter, merged = (out.outputs[0] for out in outs)
    assert adapter.token_ids == merged.token_ids
    for a, m in zip(adapter.logprobs, merged.logprobs):
        assert a.keys() == m.keys()
        assert all(abs(a[t] - m[t]) < 1e-4 for t in a)

    base = AutoModelForCausalLM.from_pretrained(store.path("tiny"), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, store.path("tiny-lora")).eval()
    prompt = outs[0].prompt_token_ids
    with torch.no_grad():
        logits = peft_model(torch.tensor([prompt + adapter.token_ids])).logits[0]
    logprobs = logits.log_softmax(-1)
    for k, step in enumerate(adapter.logprobs):
        assert all(abs(float(logprobs[len(prompt) + k - 1, t]) - v) < 1e-4 for t, v in step.items())


def test_an_adapter_whose_base_changed_is_refused(store, lora_models, tmp_path):
    from llmasos.errors import StoreError

    other = save_tiny_model(tmp_path / "other", "llama", seed=1)
    store.import_path(other, "tiny-other", progress=False)
    adapter, _ = lora_models
    folder = tmp_path / "moved"
    folder.mkdir()
    for file in adapter.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "tiny-other"})
    )
    store.import_path(folder, "tiny-lora-moved", progress=False)
    with pytest.raises(StoreError, match="was trained on tiny-other"):
        LLM("tiny-lora-moved", **ENGINE)


def test_adapter_over_a_gguf_base_loads_the_float_weights(store, tmp_path):
    from gguf import GGMLQuantizationType as Q

    from llmasos.ops.quant import QuantLinear

    from tiny_gguf import write_tiny_gguf

    store.import_path(write_tiny_gguf(tmp_path / "q8.gguf", "llama", Q.Q8_0), "tiny-q8", progress=False)
    assert (store.path("tiny-q8") / "gguf_tensors.json").exists()  # the weights are the GGUF's
    run_finetune(settings(tmp_path, model="tiny-q8", name="tiny-q8-lora", max_steps=2))
    run_finetune(settings(tmp_path, model="tiny-q8", name="tiny-q8-merged", max_steps=2, merge=True,
                          out_dir=tmp_path / "merged"))  # fmt: skip
    llm = LLM("tiny-q8-lora", **ENGINE)  # gguf_blocks is on by default
    assert not any(isinstance(m, QuantLinear) for m in llm.engine.model.modules())
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True)
    adapter = llm.chat(QUESTION, params)[0].outputs[0]
    merged = LLM("tiny-q8-merged", gguf_blocks=False, **ENGINE).chat(QUESTION, params)[0].outputs[0]
    assert adapter.token_ids == merged.token_ids
    assert all(abs(a[t] - m[t]) < 1e-4 for a, m in zip(adapter.logprobs, merged.logprobs) for t in a)


# --- each method's own defaults ---------------------------------------------------------------------


def planted_fact(tmp_path: Path) -> Path:
    """The issue's run: 32 copies of one question and its answer."""
    record = {"messages": QUESTION + [{"role": "assistant", "content": TAUGHT}]}
    return write_jsonl(tmp_path / "fact.jsonl", [record] * 32)


def with_method_defaults(tmp_path: Path, method: str, max_steps: int, name: str) -> Path:
    """Learning rate, warm-up and LoRA shape are the method's defaults. One sequence a step: with every
    example the same, a batch of 8 has the same gradient as one, at an eighth of the work."""
    config = FinetuneConfig(
        model="tiny", data=planted_fact(tmp_path), method=method, max_steps=max_steps, eval_fraction=0.0,
        batch_size=1, out_dir=tmp_path / name, name=name,
    )  # fmt: skip
    return run_finetune(config)


def test_lora_defaults_learn_a_planted_fact_where_the_old_shared_default_did_not(store, tmp_path):
    from llmasos.cli import app

    folder = with_method_defaults(tmp_path, "lora", 200, "tiny-lora-defaults")
    hyperparameters = json.loads((folder / "model_card.json").read_text())["hyperparameters"]
    assert (hyperparameters["lr"], hyperparameters["warmup_steps"]) == (3e-4, 20)  # 100, at most max/10
    assert answer("tiny-lora-defaults") == TAUGHT

    # the old default for every method, given as a flag: it wins over the method's, and does not learn
    data = str(planted_fact(tmp_path))
    args = ["finetune", "tiny", "--data", data, "--max-steps", "200", "--lr", "1e-4", "--eval-fraction", "0",
            "--batch-size", "1", "--out-dir", str(tmp_path / "old"), "--name", "tiny-lora-1e-4"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    card = json.loads((store.path("tiny-lora-1e-4") / "model_card.json").read_text())
    assert (card["hyperparameters"]["lr"], card["hyperparameters"]["warmup_steps"]) == (1e-4, 20)
    assert answer("tiny-lora-1e-4") != TAUGHT


def test_full_defaults_learn_a_planted_fact(store, tmp_path):
    folder = with_method_defaults(tmp_path, "full", 400, "tiny-full-defaults")
    hyperparameters = json.loads((folder / "model_card.json").read_text())["hyperparameters"]
    assert (hyperparameters["lr"], hyperparameters["warmup_steps"]) == (2e-5, 25)
    assert answer("tiny-full-defaults") == TAUGHT


def test_method_defaults_yield_to_the_config_file_and_are_in_help(tmp_path):
    from llmasos.cli import app
    from llmasos.train.config import load_config
    from llmasos.train.dpo import DPO_DEFAULTS, DPOConfig
    from llmasos.train.finetune import FINETUNE_DEFAULTS

    data = planted_fact(tmp_path)
    for cls, table in ((FinetuneConfig, FINETUNE_DEFAULTS), (DPOConfig, DPO_DEFAULTS)):
        for method, defaults in table.items():
            config = cls(model="tiny", data=data, method=method, max_steps=5000)
            assert (config.lr, config.warmup_steps) == (defaults.lr, defaults.warmup_steps)
    assert FINETUNE_DEFAULTS["lora"].lr > 10 * FINETUNE_DEFAULTS["full"].lr  # the issue: one lr fits neither
    yaml = tmp_path / "run.yaml"
    yaml.write_text("method: full\nlr: 1e-3\nwarmup-steps: 0\n")
    config = load_config(FinetuneConfig, yaml, {"model": "tiny", "data": str(data), "warmup_steps": 7})
    assert (config.lr, config.warmup_steps) == (1e-3, 7)  # the file wins over the method; a flag over both

    shown = CliRunner().invoke(app, ["finetune", "--help"], env={"COLUMNS": "300"}).output
    assert "by method: full 2e-5, freeze 2e-5, lora 3e-4" in shown
    assert "by method: full 25, freeze 25, lora 100" in shown


# --- freeze and full --------------------------------------------------------------------------------


def test_freeze_trains_only_the_chosen_layers(store, tmp_path):
    folder = run_finetune(
        settings(
            tmp_path, method="freeze", trainable_layers=1, train_norm=True, max_steps=3, name="tiny-freeze"
        )
    )
    before = load_file(store.path("tiny") / "model.safetensors")
    after = load_file(folder / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    trainable = {name for name in before if name.startswith("model.layers.1.") or name == "model.norm.weight"}
    assert changed and changed <= trainable
    assert "model.norm.weight" in changed
    card = json.loads((folder / "model_card.json").read_text())
    assert card["trainable_parameters"] == sum(before[name].numel() for name in trainable)


def test_full_finetune_with_a_held_out_split(store, tmp_path):
    records = [
        {"messages": QUESTION + [{"role": "assistant", "content": f"{TAUGHT} {i}"}]} for i in range(10)
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", records)
    folder = run_finetune(
        settings(
            tmp_path, method="full", data=data, eval_fraction=0.2, max_steps=4, lr=1e-3, name="tiny-full"
        )
    )
    card = json.loads((folder / "model_card.json").read_text())
    assert card["method"] == "full" and card["data"]["examples"] == 8
    assert card["results"]["eval_loss"] > 0 and card["results"]["eval_perplexity"] > 1
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    assert LLM("tiny-full", **ENGINE).chat(QUESTION, GREEDY)[0].outputs[0].text


def test_cli_flags_win_over_the_config_file(store, tmp_path):
    from llmasos.cli import app

    yaml = tmp_path / "finetune.yaml"
    yaml.write_text(
        f"method: full\nmax-steps: 5\nbatch_size: 1\nprecision: fp32\nout-dir: {tmp_path / 'run'}\n"
    )
    args = ["finetune", "tiny", "--data", str(password_data(tmp_path)), "--config", str(yaml)]
    result = CliRunner().invoke(app, [*args, "--max-steps", "1", "--name", "tiny-cli"])
    assert result.exit_code == 0, result.output
    card = json.loads((store.path("tiny-cli") / "model_card.json").read_text())
    assert card["method"] == "full" and card["hyperparameters"]["max_steps"] == 1
    assert card["results"]["steps"] == 1
