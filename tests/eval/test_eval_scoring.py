"""Scoring through the kernel equals an independent transformers computation on the same weights."""

import math

import pytest
import torch

from llmasos import LLM, SamplingParams
from llmasos.errors import InvalidRequestError
from llmasos.eval.perplexity import perplexity
from llmasos.runtime.scoring import (
    Window,
    loglikelihood,
    loglikelihood_rolling,
    score_windows,
    sliding_windows,
)

TEXT = (
    "Once upon a time there was a small model that wanted to run on every machine. "
    "The capital of France is Paris. The capital of Italy is Rome. Hello, world! How are you today?"
)


@pytest.fixture(scope="module")
def llm(store):
    return LLM("tiny", device="cpu", max_model_len=24, num_kv_blocks=64, block_size=8)


def hf_logprobs(model, tokens: list[int]) -> torch.Tensor:
    """log p(tokens[i] | tokens[:i]) for i >= 1."""
    with torch.no_grad():
        logprobs = model(torch.tensor([tokens])).logits[0].log_softmax(-1)
    return logprobs[:-1].gather(1, torch.tensor(tokens[1:]).unsqueeze(1)).squeeze(1)


def hf_sliding_nll(model, tokens: list[int], context: int, stride: int) -> tuple[float, int]:
    """Hugging Face's perplexity recipe, written out independently of llmasos.eval."""
    total, count, previous_end = 0.0, 0, 1
    for begin in range(0, len(tokens), stride):
        end = min(begin + context, len(tokens))
        new = end - previous_end
        total += hf_logprobs(model, tokens[begin:end])[-new:].sum().item()
        count += new
        previous_end = end
        if end == len(tokens):
            break
    return -total, count


def test_sliding_windows_score_every_token_once():
    tokens = list(range(100))
    for context, stride, full_last in [(10, 9, False), (10, 3, False), (16, 8, False), (200, 100, False),
                                       (10, 9, True), (16, 15, True)]:  # fmt: skip
        windows = sliding_windows(tokens, context, stride, full_last)
        scored = [t for w in windows for t in w.tokens[len(w.tokens) - w.num_scored :]]
        assert scored == tokens[1:]
        assert all(len(w.tokens) <= context and w.num_scored < len(w.tokens) for w in windows)
        if full_last:  # lm-evaluation-harness's rolling windows: the last one has a full context too
            assert len(windows[-1].tokens) == context
    with pytest.raises(InvalidRequestError, match="stride"):
        sliding_windows(tokens, 10, 10)


@pytest.mark.parametrize("context,stride", [(23, 11), (16, 5), (16, 15)])
def test_perplexity_equals_transformers(llm, hf_model, context, stride):
    result = perplexity(llm, TEXT, context=context, stride=stride)
    tokens = [llm.tokenizer.bos_token_id, *llm.tokenizer.encode(TEXT, add_special_tokens=False)]
    assert len(tokens) > 2 * context  # several windows
    nll, count = hf_sliding_nll(hf_model, tokens, context, stride)
    assert result.num_tokens == count == len(tokens) - 1
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_loglikelihood_equals_transformers(llm, hf_model):
    pairs = [("The capital of France is", " Paris."), ("Hello, world! ", "How are you"), ("", "Once upon")]
    results = loglikelihood(llm, pairs)
    for (context, continuation), (logprob, greedy) in zip(pairs, results):
        context_ids = (
            llm.tokenizer.encode(context.rstrip(), add_special_tokens=False)
            if context.strip()
            else [llm.tokenizer.bos_token_id]
        )
        whole = llm.tokenizer.encode(context + continuation, add_special_tokens=False)
        tokens = whole if context.strip() else context_ids + whole
        n = len(tokens) - len(context_ids)
        expected = hf_logprobs(hf_model, tokens)[-n:]
        assert logprob == pytest.approx(expected.sum().item(), abs=1e-3)
        assert isinstance(greedy, bool)
    # the tokens greedy decoding produces are, by definition, greedy; one token changed is not
    context = llm.tokenizer.encode("The capital of", add_special_tokens=False)
    out = llm.generate([context], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0].outputs[0]
    changed = out.token_ids[:-1] + [(out.token_ids[-1] + 1) % 300]
    scores = score_windows(llm, [Window(context + out.token_ids, 4), Window(context + changed, 4)])
    assert [greedy for _, greedy in scores[0]] == [True] * 4
    assert [greedy for _, greedy in scores[1]] == [True] * 3 + [False]


def test_rolling_loglikelihood_is_lm_eval_rolling_windows(llm, hf_model):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    [total] = loglikelihood_rolling(llm, [TEXT])
    tokens = llm.tokenizer.encode(TEXT, add_special_tokens=False)
    # lm_eval's max_seq_len counts the inputs; a kernel window of 23 tokens has 22 inputs and scores 22
    windows = get_rolling_token_windows(tokens, llm.tokenizer.bos_token_id, max_seq_len=22, context_len=1)
    expected = 0.0
    for context, continuation in map(make_disjoint_window, windows):
        expected += hf_logprobs(hf_model, context + continuation)[-len(continuation) :].sum().item()
    assert total == pytest.approx(expected, abs=1e-3)


def test_bad_scoring_input_is_refused(llm):
    with pytest.raises(InvalidRequestError, match="empty continuation"):
        loglikelihood(llm, [("context", "")])
    with pytest.raises(InvalidRequestError, match="empty text"):
        loglikelihood_rolling(llm, [""])
    with pytest.raises(InvalidRequestError, match="does not fit"):
        perplexity(llm, TEXT, context=100)


def test_choices_of_one_context_share_its_prefix_cache(llm, store):
    context = "The capital of France is Paris. The capital of Italy is"
    pairs = [(context, f" {choice}") for choice in ("Rome", "Paris", "Berlin", "Madrid")]
    # (requests in one step cannot share: a block is cached once computed, as in vLLM; a large eval
    # spreads over many steps, so later requests find their context there)
    first = loglikelihood(llm, pairs[:1])
    before = llm.engine.stats().prefix_hit_tokens
    cached = first + loglikelihood(llm, pairs[1:])
    assert llm.engine.stats().prefix_hit_tokens >= before + 3 * 8  # a block of the context, each time
    uncached = LLM("tiny", device="cpu", max_model_len=24, num_kv_blocks=64, block_size=8,
                   enable_prefix_caching=False)  # fmt: skip
    for (a, greedy_a), (b, greedy_b) in zip(cached, loglikelihood(uncached, pairs)):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b
