"""Every native driver against transformers on a tiny random model: logits and greedy tokens."""

import pytest
import torch

from llmasos import LLM
from llmasos.models.base import DecoderDriver
from llmasos.models.loader import load_model
from llmasos.ops.attention import AttentionMetadata, PrefillChunk
from llmasos.sampling_params import SamplingParams

from tiny import FAMILIES, save_tiny_model

PROMPT = [5, 17, 42, 99, 7, 300, 12, 64, 128, 3, 77]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = save_tiny_model(tmp_path_factory.mktemp(request.param), request.param)
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_logits_match_transformers(tiny):
    """The driver contract (models/base.py) alone: bind a KV cache to attention_layers(), forward, logits."""
    path, reference = tiny
    model = load(path)
    assert isinstance(model, DecoderDriver)
    cfg, num_slots = model.config, 16
    layers = model.attention_layers()
    assert len(layers) == cfg.num_layers
    for layer in layers:
        layer.k_cache, layer.v_cache = torch.empty(2, 1, num_slots, cfg.num_kv_heads, cfg.head_dim).unbind(0)
    ids = torch.tensor(PROMPT)
    md = AttentionMetadata(
        slot_mapping=torch.arange(len(PROMPT)), prefills=[PrefillChunk(0, len(PROMPT), None, None)]
    )
    with torch.inference_mode():
        ours = model.compute_logits(model(ids, torch.arange(len(PROMPT)), md))
        theirs = reference(ids.unsqueeze(0)).logits[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_greedy_generation_matches_transformers(tiny):
    path, reference = tiny
    llm = LLM(str(path), device="cpu", num_kv_blocks=16, block_size=4)
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0].outputs[0]
    expected = reference.generate(
        torch.tensor([PROMPT]), max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0
    )[0, len(PROMPT) :].tolist()
    assert out.token_ids == expected
    assert out.finish_reason == "length"


def load(path):
    return load_model(path, torch.device("cpu"), torch.float32)


def test_sharded_checkpoint_loads_the_same_weights(tmp_path):
    whole = save_tiny_model(tmp_path / "whole", "qwen2")
    sharded = save_tiny_model(tmp_path / "sharded", "qwen2", max_shard_size="40KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    a, b = load(whole).state_dict(), load(sharded).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    import json

    from llmasos.errors import UnsupportedModelError

    path = save_tiny_model(tmp_path / "m", "llama")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["MambaForCausalLM"]}))
    with pytest.raises(UnsupportedModelError, match="MambaForCausalLM.*supported: LlamaForCausalLM"):
        load(path)
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").unlink()
    with pytest.raises(UnsupportedModelError, match="no \\*.safetensors"):
        load(path)
