"""GGUF conversion: the folder we write must hold exactly what transformers' own GGUF loader builds.

Parity is checked on the real SmolLM2 Q4_1 file, and on tiny files written here with gguf-py for
every supported architecture and quantization (no hub access is needed for either).
"""

import json
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from llmasos.errors import StoreError, UnsupportedModelError
from llmasos.models.loader import iter_weights
from llmasos.store.gguf import convert_gguf
from llmasos.store.gguf_tensors import GGUFTensors
from llmasos.tokenizer import Tokenizer

from tiny_gguf import CONTEXT, write_tiny_gguf

Q = gguf.GGMLQuantizationType
TEXTS = [
    "Hello world",
    "  leading spaces and\ttabs\n\nnewlines",
    "naïve café – ünïcödé",
    "emoji 🦙🚀 and 中文",
    "",
]


def _reference_config(gguf_path: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def _reference_state_dict(gguf_path: Path, config) -> dict:
    """What `AutoModelForCausalLM.from_pretrained(..., gguf_file=...)` loads for these architectures.

    It calls this legacy loader with the model it built; we call it directly because from_pretrained
    also insists on `accelerate` for GGUF files, which LLMasOS does not depend on.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    if config.model_type == "mistral":
        # transformers' own loader fails here (gguf-py has no "mistral" architecture to map names
        # with); the file and the parameter names are Llama's, so Llama's mapping is the reference.
        config = LlamaConfig(**{k: v for k, v in config.to_dict().items() if k != "model_type"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]


def _reference_tokenizer(gguf_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def assert_config_matches(out_dir: Path, reference_config, architectures: list[str]):
    """Every field transformers derives from the GGUF, as a reloaded config.json sees it."""
    from transformers import AutoConfig

    converted = AutoConfig.from_pretrained(str(out_dir)).to_dict()
    reference = reference_config.to_dict()
    for key in ("_name_or_path", "transformers_version", "architectures", "dtype"):
        reference.pop(key, None)
    assert {key: converted.get(key) for key in reference} == reference
    assert converted["architectures"] == architectures
    assert json.loads((out_dir / "config.json").read_text())["dtype"] == "float32"


def assert_tensors_match(out_dir: Path, reference: dict, tied: bool):
    """The floats loading dequantizes from the stored GGUF, tensor by tensor (what imports of old
    wrote to model.safetensors was this same reference)."""
    converted = dict(iter_weights(out_dir))
    assert set(converted) == set(reference)
    assert ("lm_head.weight" in converted) != tied
    for name, tensor in converted.items():
        assert tensor.dtype == torch.float32 and tensor.shape == reference[name].shape, name
        assert torch.equal(tensor, reference[name].float()), name


def assert_tokenizer_matches(out_dir: Path, reference):
    from transformers import AutoTokenizer

    converted = AutoTokenizer.from_pretrained(str(out_dir))
    runtime = Tokenizer.from_dir(out_dir)  # what LLMasOS itself uses on the folder
    special = f"{reference.eos_token}x{reference.bos_token or ''}"
    for text in [*TEXTS, special]:
        assert converted(text)["input_ids"] == reference(text)["input_ids"], text
        assert runtime.encode(text) == reference(text)["input_ids"], text
    assert runtime.eos_token_ids == [reference.eos_token_id]
    messages = [{"role": "user", "content": "Hi there"}]
    assert converted.apply_chat_template(messages, tokenize=False) == reference.apply_chat_template(
        messages, tokenize=False
    )
    tokenizer_config = json.loads((out_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == reference.chat_template
    assert tokenizer_config["eos_token"] == reference.eos_token


# --- the real model -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("smollm2")
    start = time.perf_counter()
    facts = convert_gguf(smollm2_gguf, out_dir)
    print(f"convert_gguf(SmolLM2-135M Q4_1) took {time.perf_counter() - start:.1f} s")
    return out_dir, facts


@pytest.mark.slow
def test_smollm2_facts(smollm2):
    out_dir, facts = smollm2
    assert facts == {
        "architecture": "llama",
        "quantization": "Q4_1",
        "context_length": 8192,
        "parameter_count": 134_515_008,
        "has_chat_template": True,
    }
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "config.json",
        "generation_config.json",
        "gguf_tensors.json",
        "model.gguf",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert json.loads((out_dir / "generation_config.json").read_text())["eos_token_id"] == 2


@pytest.mark.slow
def test_smollm2_blocks_hold_exactly_the_float_weights(smollm2):
    """The GGUF's blocks as loading hands them to the kernels (Q/K rows un-permuted like the floats)
    dequantize to the float tensors."""
    from llmasos.ops.quant import dequantize_reference

    out_dir, _ = smollm2
    floats = dict(iter_weights(out_dir))
    with GGUFTensors(out_dir) as reader:
        names = reader.block_names()
        assert len(names) == 30 * 7 + 1  # every matrix of every layer, and the Q8_0 embedding
        for name in names:
            blocks, layout = reader.blocks(name)
            weight = floats[name]
            assert torch.equal(dequantize_reference(blocks, layout, weight.shape[1]), weight), name


@pytest.mark.slow
def test_smollm2_config_matches_transformers(smollm2, smollm2_gguf):
    assert_config_matches(smollm2[0], _reference_config(smollm2_gguf), ["LlamaForCausalLM"])


@pytest.mark.slow
def test_smollm2_weights_match_transformers_dequantization(smollm2, smollm2_gguf):
    """Every tensor, bit for bit, including the Q/K rows llama.cpp permutes; then the folder runs the same."""
    from transformers import AutoModelForCausalLM

    from llmasos.models.loader import transformers_causal_lm

    config = _reference_config(smollm2_gguf)
    state_dict = _reference_state_dict(smollm2_gguf, config)
    assert_tensors_match(smollm2[0], state_dict, tied=True)

    reference = AutoModelForCausalLM.from_config(config)
    reference.load_state_dict(state_dict, strict=False)  # lm_head is tied to the embedding
    reference.eval()
    converted = transformers_causal_lm(smollm2[0], torch.float32)
    ids = torch.tensor([[1, 9690, 198, 19556, 905, 28]])
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, reference(ids).logits)


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2, smollm2_gguf):
    assert_tokenizer_matches(smollm2[0], _reference_tokenizer(smollm2_gguf))


# --- tiny files for each architecture and quantization --------------------------------------------

TINY_CASES = [
    ("llama", Q.Q4_0, "tiny", True, "LlamaForCausalLM"),
    ("llama", Q.Q4_1, "tiny", False, "LlamaForCausalLM"),
    ("llama", Q.Q8_0, "mistral", True, "MistralForCausalLM"),  # how transformers spots a Mistral GGUF
    ("qwen2", Q.Q8_0, "tiny", False, "Qwen2ForCausalLM"),
    ("qwen3", Q.BF16, "tiny", True, "Qwen3ForCausalLM"),
    ("qwen3", Q.F16, "tiny", False, "Qwen3ForCausalLM"),
    ("gpt2", Q.F32, "tiny", False, "GPT2LMHeadModel"),
    ("gpt2", Q.Q8_0, "tiny", True, "GPT2LMHeadModel"),
]


@pytest.mark.parametrize(("arch", "qtype", "name", "tied", "model_class"), TINY_CASES)
def test_tiny_gguf_matches_transformers(tmp_path, arch, qtype, name, tied, model_class):
    (tmp_path / "src").mkdir()
    gguf_path = write_tiny_gguf(tmp_path / "src" / "tiny.gguf", arch, qtype, name, tied)
    facts = convert_gguf(gguf_path, tmp_path / "out")

    assert facts["architecture"] == {"mistral": "mistral"}.get(name, arch)
    assert facts["quantization"] == Q(qtype).name
    assert facts["context_length"] == CONTEXT
    assert facts["has_chat_template"] is True
    config = _reference_config(gguf_path)
    assert_config_matches(tmp_path / "out", config, [model_class])
    assert_tensors_match(tmp_path / "out", _reference_state_dict(gguf_path, config), tied=tied)
    assert_tokenizer_matches(tmp_path / "out", _reference_tokenizer(gguf_path))


# --- files we must refuse, with a message saying what to do ---------------------------------------


def test_non_gguf_file_is_a_store_error(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("<html>404 Not Found</html>")
    with pytest.raises(StoreError, match="not a GGUF file"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_file_is_a_store_error(tmp_path):
    with pytest.raises(StoreError, match="Cannot read"):
        convert_gguf(tmp_path / "absent.gguf", tmp_path / "out")


def test_truncated_gguf_is_a_store_error(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", Q.Q8_0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(StoreError, match="truncated"):
        convert_gguf(path, tmp_path / "out")
    path.write_bytes(data[:200])  # cut inside the metadata
    with pytest.raises(StoreError, match="unreadable GGUF header"):
        convert_gguf(path, tmp_path / "out")


def test_unsupported_architecture_is_named(tmp_path):
    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="'mamba'.*supported: llama, qwen2, qwen3, gpt2"):
        convert_gguf(path, tmp_path / "out")
