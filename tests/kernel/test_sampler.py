"""Sampling rules on hand-made logits, where the right answer is known."""

import math

import torch

from llmasos.kernel.sampler import apply_penalties, filter_logits, sample
from llmasos.kernel.sequence import Sequence
from llmasos.sampling_params import SamplingParams

LOGITS = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))


def seq(prompt=(0,), output=(), **params):
    s = Sequence("r", list(prompt), SamplingParams(**params))
    for t in output:
        s.append_token(t)
    return s


def kept(**params):
    return torch.isfinite(filter_logits(LOGITS.clone(), [seq(**params)]))[0].tolist()


def test_top_k_top_p_min_p_keep_the_right_tokens():
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.7) == [True, True, False, False]  # 0.5 < 0.7, 0.75 >= 0.7
    assert kept(top_p=0.5) == [True, False, False, False]
    assert kept(min_p=0.4) == [True, True, False, False]  # threshold 0.2
    assert kept() == [True, True, True, True]


def test_penalties():
    # repetition over prompt + output; presence and frequency over the output only
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    s = seq(
        prompt=(0, 1), output=(2, 2), repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25
    )
    penalized = logits.clone()
    apply_penalties(penalized, [s])
    expected = [2.0 / 2, -2.0 * 2, 1.0 / 2 - (0.25 * 2 + 0.5), 0.5]
    assert torch.allclose(penalized[0], torch.tensor(expected))


def test_sampled_frequencies_follow_the_distribution():
    counts = torch.zeros(4)
    for i in range(2000):
        s = seq(seed=i, temperature=1.0)
        counts[sample(LOGITS.clone(), [s])[0].token_id] += 1
    assert torch.allclose(counts / 2000, LOGITS.exp()[0], atol=0.04)


def test_greedy_and_logprobs():
    out = sample(LOGITS.clone(), [seq(temperature=0, logprobs=2)])[0]
    assert out.token_id == 0
    assert math.isclose(out.logprob, math.log(0.5), rel_tol=1e-5)
    assert set(out.top_logprobs) == {0, 1}


class AllowOnly:
    """A stand-in for an llguidance matcher: a 32-token vocabulary that allows only `tokens`."""

    def __init__(self, *tokens):
        self.bits = sum(1 << t for t in tokens)

    def compute_bitmask(self) -> bytes:
        return self.bits.to_bytes(4, "little")


def test_grammar_mask_comes_before_greedy_and_sampling_and_leaves_logprobs_raw():
    logits = torch.cat([LOGITS, torch.full((1, 60), -30.0)], dim=1)  # a model vocabulary past the tokenizer's
    logits[0, 40] = 10.0  # a padding id the model likes best: never allowed
    greedy = seq(temperature=0, logprobs=1)
    greedy.matcher = AllowOnly(2, 3)
    out = sample(logits.repeat(2, 1), [greedy, seq(temperature=0)])
    assert out[0].token_id == 2 and out[1].token_id == 40  # the unconstrained row is untouched
    assert math.isclose(out[0].logprob, logits.log_softmax(-1)[0, 2].item(), rel_tol=1e-5)
    for i in range(200):
        s = seq(seed=i, temperature=1.0, repetition_penalty=1.5)
        s.matcher = AllowOnly(1, 3)
        assert sample(logits.clone(), [s])[0].token_id in (1, 3)
