"""A GGUF model is stored once, as its GGUF: the store holds the file plus small metadata, loading reads
the weights from it (memory-mapped) equal to what imports of old dequantized to disk, folders stored
the old way still load, and every command that reads a model's weights takes a GGUF model."""

import json

import pytest
import torch
from typer.testing import CliRunner

from llmasos import LLM, SamplingParams
from llmasos.bench.footprint import write_converted_layout
from llmasos.cli import app
from llmasos.errors import StoreError
from llmasos.models.loader import iter_weights, load_model, transformers_causal_lm
from llmasos.ops.quant import QuantLinear
from llmasos.store import ModelStore

from tiny_gguf import Q, write_tiny_gguf

ENGINE = dict(device="cpu", block_size=4, num_kv_blocks=128)
METADATA = {
    "config.json",
    "generation_config.json",
    "gguf_tensors.json",
    "tokenizer.json",
    "tokenizer_config.json",
}
PROMPT = [{"role": "user", "content": "Hello world"}]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store holding a Q4_1 Llama GGUF (untied) as "q4", an F32 one (tied) as "f32", and a Q8_0 GPT-2."""
    src = tmp_path_factory.mktemp("src")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMASOS_HOME", str(tmp_path_factory.mktemp("home")))
        store = ModelStore()
        store.import_path(write_tiny_gguf(src / "q4.gguf", "llama", Q.Q4_1, tied=False), "q4", progress=False)
        store.import_path(write_tiny_gguf(src / "f32.gguf", "llama", Q.F32), "f32", progress=False)
        store.import_path(write_tiny_gguf(src / "gpt2.gguf", "gpt2", Q.Q8_0), "gpt2", progress=False)
        yield store


def greedy(llm: LLM, n: int = 6) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return llm.chat(PROMPT, params)[0].outputs[0].token_ids


def test_the_store_holds_the_gguf_and_small_metadata_only(store, tmp_path):
    for name in ("q4", "f32", "gpt2"):
        manifest = store.get(name)
        assert set(manifest.files) == METADATA | {"model.gguf"}
    f32 = store.get("f32")
    gguf_bytes = f32.files["model.gguf"]["size"]
    assert f32.size <= 1.1 * gguf_bytes  # before: the GGUF plus its float32 copy, 2x for an F32 file
    # a quantized file's weights would be ~4-7x as float32: none are (the tiny vocabulary's tokenizer
    # and table are the rest)
    q4 = store.get("q4")
    metadata = sum(f["size"] for rel, f in q4.files.items() if rel != "model.gguf")
    assert metadata < 0.25 * q4.files["model.gguf"]["size"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["q4", "f32", "gpt2"])
def test_weights_read_from_the_gguf_equal_the_converted_layout_and_run_the_same(store, tmp_path, name):
    """The old layout (dequantized safetensors + repacked blocks) still loads, and gives the same
    weights and tokens as the GGUF read in place, on the float path and the block path."""
    folder = store.path(name)
    old = tmp_path / "old"
    write_converted_layout(folder, old)
    assert not (old / "gguf_tensors.json").exists() and (old / "model.safetensors").exists()
    for blocks in (False, True):
        new_model = load_model(folder, torch.device("cpu"), torch.float32, gguf_blocks=blocks)
        old_model = load_model(old, torch.device("cpu"), torch.float32, gguf_blocks=blocks)
        new_state, old_state = new_model.state_dict(), old_model.state_dict()
        assert set(new_state) == set(old_state)
        for key, tensor in new_state.items():
            assert torch.equal(tensor, old_state[key]), key
        new_buffers = dict(new_model.named_buffers())
        for key, buffer in old_model.named_buffers():
            assert torch.equal(new_buffers[key], buffer), key
        assert greedy(LLM(str(folder), gguf_blocks=blocks, **ENGINE)) == greedy(
            LLM(str(old), gguf_blocks=blocks, **ENGINE)
        )


def test_the_block_path_runs_the_gguf_blocks_and_skips_their_float_copy(store):
    llm = LLM("q4", **ENGINE)
    layers = [m for m in llm.engine.model.modules() if isinstance(m, QuantLinear)]
    assert layers and {m.qtype for m in layers} == {"Q4_1"}
    assert not any(p.dim() == 2 for p in llm.engine.model.parameters())  # no float matrix was loaded


def test_transformers_loads_a_gguf_folder_as_its_floats(store):
    model, info = transformers_causal_lm(store.path("q4"), torch.float32, output_loading_info=True)
    assert not info["missing_keys"]
    floats = dict(iter_weights(store.path("q4")))
    for name, param in model.named_parameters():
        assert torch.equal(param, floats[name]), name


def test_quantize_a_gguf_model(store):
    """The copy shares the GGUF's blob (norms come from it) and runs its own Q8_0 blocks."""
    result = CliRunner().invoke(app, ["quantize", "q4", "--to", "int8", "--name", "q4-int8"])
    assert result.exit_code == 0, result.output
    copy = store.get("q4-int8")
    assert copy.files["model.gguf"] == store.get("q4").files["model.gguf"]
    llm = LLM("q4-int8", **ENGINE)
    layers = [m for m in llm.engine.model.modules() if isinstance(m, QuantLinear)]
    assert layers and {m.qtype for m in layers} == {"Q8_0"}
    assert len(greedy(llm)) == 6


@pytest.mark.slow
def test_explain_eval_card_and_verify_on_a_gguf_model(store, tmp_path):
    from llmasos.explain import explain

    llm = LLM("q4", device="cpu", max_model_len=64, num_kv_blocks=64, block_size=8)
    explained = explain(llm, "Hello world", max_tokens=3, target=1, steps=8, baseline="zeros")
    assert len(explained.attribution.scores) == len(explained.prompt_tokens) + 1
    runner = CliRunner()
    for args in (["show", "q4", "--card"], ["verify", "q4"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    text = tmp_path / "text.txt"
    text.write_text("Hello world, the quick brown fox jumps over the lazy dog. " * 4)
    args = ["eval", "q4", "--task", "perplexity", "--data", str(text), "--output", str(tmp_path / "eval")]
    result = runner.invoke(app, [*args, "--context", "16"])
    assert result.exit_code == 0, result.output
    assert "q4" in runner.invoke(app, ["show", "q4", "--card"]).output


def test_a_damaged_table_or_missing_gguf_says_how_to_fix_it(store, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    for path in store.path("q4").iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    table = json.loads((folder / "gguf_tensors.json").read_text())
    (folder / "model.gguf").write_bytes((folder / "model.gguf").read_bytes()[:1000])
    with pytest.raises(StoreError, match="truncated.*pull or import the model again"):
        load_model(folder, torch.device("cpu"), torch.float32)
    (folder / "gguf_tensors.json").write_text(json.dumps({**table, "tensors": [{"bogus": 1}]}))
    with pytest.raises(StoreError, match="damaged"):
        load_model(folder, torch.device("cpu"), torch.float32)
