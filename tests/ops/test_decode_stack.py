"""The C++ decode stack (ops/decode_stack.py) changes no number: decode-only steps give exactly the
layer-by-layer path's tokens and log-probabilities, in float32 and in GGUF blocks, at every batch size.
The runner chooses it per step (EngineConfig.decode_stack); a spy on DecodeStep counts where it ran."""

import pytest

from llmasos import LLM, SamplingParams
from llmasos.ops.decode_stack import DecodeStep
from llmasos.ops.kernels import kernels
from llmasos.train.quantize import quantize_model

from tiny import save_tiny_model

pytestmark = pytest.mark.skipif(
    not hasattr(kernels(), "DecodeStack"), reason="the x86 CPU kernels cannot be built here"
)
PROMPTS = ["Once upon a time", "The capital of France is", "def add(a, b):", "Hello, world!"]


@pytest.fixture(scope="module")
def quantized(store):
    quantize_model(store, "tiny", "int8", "tiny-int8")
    quantize_model(store, "tiny", "int4", "tiny-int4")
    return store


@pytest.fixture
def stack_steps(monkeypatch):
    """How many steps ran through the C++ stack."""
    steps, call = [], DecodeStep.__call__

    def counted(self, *args):
        steps.append(1)
        return call(self, *args)

    monkeypatch.setattr(DecodeStep, "__call__", counted)
    return steps


def generate(name, use_stack, prompts, steps, activation_bits=16, **params):
    llm = LLM(
        name, device="cpu", max_model_len=256, num_kv_blocks=512, block_size=8, max_num_seqs=80,
        activation_bits=activation_bits, decode_stack=use_stack,
    )  # fmt: skip
    sampling = SamplingParams(max_tokens=12, logprobs=3, ignore_eos=True, seed=7, **params)
    steps.clear()
    outputs = llm.generate(prompts, sampling)
    assert bool(steps) == use_stack  # the stack really ran (or really did not)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outputs]


@pytest.mark.parametrize(
    "name, bits", [("tiny", 16), ("tiny-int8", 16), ("tiny-int4", 16), ("tiny-int8", 8), ("tiny-int4", 8)]
)
@pytest.mark.parametrize("batch", [1, 4, 70])  # 70 rows: past the 16-bit kernel's 64, BLAS on float rows
def test_the_stack_gives_the_layer_path_exactly(quantized, stack_steps, name, bits, batch):
    prompts = [PROMPTS[i % 4] + " x" * (i % 7) for i in range(batch)]  # unequal lengths: masked padding
    for params in ({"temperature": 0}, {"temperature": 1.5, "top_p": 0.9}):
        stacked = generate(name, True, prompts, stack_steps, bits, **params)
        assert stacked == generate(name, False, prompts, stack_steps, bits, **params)


@pytest.mark.parametrize("family", ["qwen3", "gpt2"])  # q/k norms; another family's layout
def test_models_it_does_not_fit_run_layer_by_layer(tmp_path, stack_steps, family):
    llm = LLM(str(save_tiny_model(tmp_path / family, family)), device="cpu", num_kv_blocks=64, block_size=8)
    out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3 and not stack_steps  # the Python layers
