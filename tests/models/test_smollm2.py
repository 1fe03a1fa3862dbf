"""The embedded model end to end: LLMasOS against transformers' own GGUF loader, token for token."""

import pytest
import torch

from llmasos import LLM, SamplingParams

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a CPU does in two sentences.",
]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMASOS_HOME", str(tmp_path_factory.mktemp("home")))
        yield


@pytest.fixture(scope="module")
def llm(smollm2_gguf, home):
    """The float32 path: the GGUF's weights dequantized exactly as transformers does."""
    return LLM(str(smollm2_gguf), gguf_blocks=False)


@pytest.fixture(scope="module")
def llm_blocks(smollm2_gguf, home):
    """The default CPU path: weights stay in their GGUF blocks, read by the AVX2 kernel."""
    return LLM(str(smollm2_gguf))


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()


# the block kernels round activations to 16 bits (ops/csrc/gguf_linear.cpp): logits move by ~1e-4,
# so greedy decoding may take the other of two tokens the float model scores within this of each other
NEAR_TIE = 0.01


@pytest.mark.parametrize("engine", ["llm", "llm_blocks"])
def test_greedy_tokens_match_transformers_gguf_loader(engine, reference, request):
    llm = request.getfixturevalue(engine)
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    ours = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16))
    matched = agreed = 0  # outputs equal throughout; tokens equal before any near-tie
    for out in ours:  # both stop at EOS; transformers' min_new_tokens would ban EOS and change the argmax
        ids = torch.tensor([out.prompt_token_ids])
        with torch.inference_mode():
            expected = reference.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1] :].tolist()
        got = out.outputs[0].token_ids
        if got == expected:
            matched, agreed = matched + 1, agreed + len(got)
            continue
        assert engine == "llm_blocks", out.prompt  # the float path matches exactly
        at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
        assert at is not None, (out.prompt, got, expected)  # one stopped early: no near-tie explains that
        with torch.inference_mode():
            logits = reference(torch.tensor([out.prompt_token_ids + expected[:at]])).logits[0, -1]
        assert logits[expected[at]] - logits[got[at]] < NEAR_TIE, (out.prompt, at)
        agreed += at
    assert matched >= 3 and agreed >= 40  # of at most 64


@pytest.mark.parametrize("engine", ["llm", "llm_blocks"])
def test_answers_the_capital_of_france(engine, request):
    llm = request.getfixturevalue(engine)
    out = llm.chat([{"role": "user", "content": QUESTIONS[0]}], SamplingParams(temperature=0, max_tokens=32))
    assert out[0].outputs[0].text.strip() == "The capital of France is Paris."
    assert out[0].outputs[0].finish_reason == "stop"


def test_the_default_cpu_path_runs_the_gguf_blocks(llm_blocks, llm):
    from llmasos.ops.quant import QuantLinear, kernels

    blocks_model, float_model = llm_blocks.engine.model, llm.engine.model
    if kernels() is None:
        pytest.skip("no AVX2 kernels here: the float path is used")
    assert sum(isinstance(m, QuantLinear) for m in blocks_model.modules()) == 30 * 4 + 1
    assert not any(isinstance(m, QuantLinear) for m in float_model.modules())
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[3]}])
    params = SamplingParams(temperature=0, max_tokens=12)
    # 16-bit activations shift logits slightly; on this prompt the two paths agree on the first tokens
    assert (
        llm_blocks.generate(prompt, params)[0].outputs[0].text
        == llm.generate(prompt, params)[0].outputs[0].text
    )
