"""The C++ decode stack (ops/decode_stack.py) changes no number: decode-only steps give exactly the
layer-by-layer path's tokens and log-probabilities, in float32 and in GGUF blocks, at every batch size."""

import pytest

from llmasos import LLM, SamplingParams
from llmasos.ops.kernels import kernels
from llmasos.train.quantize import quantize_model

from tiny import save_tiny_model

pytestmark = pytest.mark.skipif(kernels() is None, reason="the CPU kernels cannot be built here")
PROMPTS = ["Once upon a time", "The capital of France is", "def add(a, b):", "Hello, world!"]


@pytest.fixture(scope="module")
def quantized(store):
    quantize_model(store, "tiny", "int8", "tiny-int8")
    quantize_model(store, "tiny", "int4", "tiny-int4")
    return store


def generate(name, use_stack, prompts, activation_bits=16, **params):
    llm = LLM(
        name, device="cpu", max_model_len=256, num_kv_blocks=512, block_size=8, max_num_seqs=80,
        activation_bits=activation_bits,
    )  # fmt: skip
    model = llm.engine.model
    model.use_decode_stack = use_stack
    sampling = SamplingParams(max_tokens=12, logprobs=3, ignore_eos=True, seed=7, **params)
    outputs = llm.generate(prompts, sampling)
    assert (model.decode_stack is not None) == use_stack  # the stack really ran (or really did not)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outputs]


@pytest.mark.parametrize(
    "name, bits", [("tiny", 16), ("tiny-int8", 16), ("tiny-int4", 16), ("tiny-int8", 8), ("tiny-int4", 8)]
)
@pytest.mark.parametrize("batch", [1, 4, 70])  # 70 rows: past the 16-bit kernel's 64, BLAS on float rows
def test_the_stack_gives_the_layer_path_exactly(quantized, name, bits, batch):
    prompts = [PROMPTS[i % 4] + " x" * (i % 7) for i in range(batch)]  # unequal lengths: masked padding
    for params in ({"temperature": 0}, {"temperature": 1.5, "top_p": 0.9}):
        assert generate(name, True, prompts, bits, **params) == generate(name, False, prompts, bits, **params)


def test_models_it_does_not_fit_run_layer_by_layer(tmp_path):
    llm = LLM(str(save_tiny_model(tmp_path / "qwen3", "qwen3")), device="cpu", num_kv_blocks=64, block_size=8)
    llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=3))
    model = llm.engine.model
    assert model.decode_stack is None and not model.use_decode_stack  # q/k norms: the Python layers
