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
def llm(smollm2_gguf, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMASOS_HOME", str(home))
        yield LLM(str(smollm2_gguf))


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()


def test_greedy_tokens_match_transformers_gguf_loader(llm, reference):
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    ours = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16))
    for out in ours:  # both stop at EOS; transformers' min_new_tokens would ban EOS and change the argmax
        ids = torch.tensor([out.prompt_token_ids])
        with torch.inference_mode():
            expected = reference.generate(ids, max_new_tokens=16, do_sample=False)
        assert out.outputs[0].token_ids == expected[0, ids.shape[1] :].tolist(), out.prompt
    assert sum(len(out.outputs[0].token_ids) == 16 for out in ours) >= 3


def test_answers_the_capital_of_france(llm):
    out = llm.chat([{"role": "user", "content": QUESTIONS[0]}], SamplingParams(temperature=0, max_tokens=32))
    assert out[0].outputs[0].text.strip() == "The capital of France is Paris."
    assert out[0].outputs[0].finish_reason == "stop"
