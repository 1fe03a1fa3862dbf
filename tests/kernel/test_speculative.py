"""Speculative decoding (prompt lookup): greedy output unchanged on every decoder family, drafts
verified as decode rows equal the general path, rejection sampling follows the target distribution."""

import random

import pytest
import torch

from llmasos.config import EngineConfig
from llmasos.errors import LLMasOSError
from llmasos.kernel.core import EngineCore
from llmasos.kernel.lookup import NgramIndex
from llmasos.kernel.rejection import verify
from llmasos.kernel.runner import Step, StepSeq
from llmasos.kernel.sequence import Sequence
from llmasos.kernel.speculative import NgramProposer, propose_ngram, worth_drafting
from llmasos.sampling_params import SamplingParams

from tiny import FAMILIES, save_tiny_model


def make_core(model_dir, **overrides):
    config = EngineConfig(**{"device": "cpu", "block_size": 4, "num_kv_blocks": 256, **overrides})
    return EngineCore(model_dir, config, eos_token_ids=[2], max_model_len=256)


def run(core, prompts, params):
    seqs = [Sequence(f"r{i}", p, params) for i, p in enumerate(prompts)]
    for seq in seqs:
        core.add(seq)
    while core.has_unfinished():
        core.step()
    return [s.output_token_ids for s in seqs]


def repetitive_prompts(n, seed=0):
    """Input-grounded shape: a run of tokens repeated, so prompt lookup finds drafts."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        base = [rng.randrange(3, 380) for _ in range(rng.randint(5, 14))]
        out.append(base * 3 + base[: rng.randint(1, 4)])
    return out


def test_propose_ngram_takes_the_latest_longest_match():
    assert propose_ngram([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 2) == [7, 5]  # the latest of two matches
    assert propose_ngram([4, 2, 3, 8, 5, 3], 3) == [8, 5, 3]  # only the last token matches (n = 1)
    assert propose_ngram([1, 2, 3, 4], 3) == []
    assert propose_ngram([1, 2, 1], 5) == [2, 1]  # no more than what follows


def test_the_ngram_index_proposes_what_the_reference_scan_does():
    rng = random.Random(0)
    for trial in range(20):
        index, tokens = NgramIndex(), [rng.randrange(6) for _ in range(rng.randint(1, 8))]
        for _ in range(60):  # a growing sequence, looked up after every few tokens as the proposer does
            k = rng.randint(1, 5)
            assert index.propose(tokens, k) == propose_ngram(tokens, k), (trial, tokens)
            tokens += [rng.randrange(6) for _ in range(rng.randint(1, 3))]
    assert index.propose([1, 2, 1], 3) == [2, 1]  # a shorter sequence than it indexed: built again


def test_drafts_are_verified_only_while_they_pay_for_their_verification():
    assert worth_drafting(0.9, 4, cost_per_draft=0.3) == 4  # copying: every draft
    assert worth_drafting(0.5, 4, cost_per_draft=0.3) == 1
    assert worth_drafting(0.2, 4, cost_per_draft=0.3) == 0  # a plain decode step is cheaper
    assert worth_drafting(0.05, 4, cost_per_draft=0.0) == 4  # free verification: whatever is found


def test_a_sequence_stops_drafting_while_its_lookups_miss_and_resumes_when_they_hit():
    proposer = NgramProposer(4, max_model_len=512)
    base = list(range(10, 20))
    seq = Sequence("r", base * 3, SamplingParams(temperature=0, max_tokens=100))
    assert proposer.propose(seq) == [10, 11]  # a new sequence drafts some of what the lookup finds
    drafted = []
    for miss in [12, 14, 16, 18, 11, 13]:  # the model strays from its input: every lookup misses
        drafted.append(proposer.propose(seq))
        assert seq.draft_record.lookup and seq.draft_record.lookup[0] != miss
        seq.append_token(miss)
    assert drafted[0] and drafted[-1] == []  # drafting stopped, while the lookup still finds matches
    for token in base * 2:  # copying the input again: the lookups, not verified, come true
        drafted.append(proposer.propose(seq))
        seq.append_token(token)
    assert len(proposer.propose(seq)) == 4


def test_bad_speculative_settings_are_refused_with_the_choices():
    with pytest.raises(LLMasOSError, match="choose ngram"):
        EngineConfig(speculative="medusa")
    with pytest.raises(LLMasOSError, match="num_speculative_tokens"):
        EngineConfig(speculative="ngram", num_speculative_tokens=0)


def test_how_far_ahead_is_drafted_by_default_depends_on_the_method():
    """Prompt lookup looks 16 tokens ahead (its drafts are free to find, and verified as far as they
    pay); a draft model 4 (each costs one of its forwards); a given number is kept."""
    assert EngineConfig(speculative="ngram").num_speculative_tokens == 16
    assert EngineConfig(speculative="draft", speculative_model="small").num_speculative_tokens == 4
    assert EngineConfig(speculative="ngram", num_speculative_tokens=3).num_speculative_tokens == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_output_is_unchanged_on_every_family(tmp_path, family):
    model_dir = save_tiny_model(tmp_path, family)
    batch = repetitive_prompts(6)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = run(make_core(model_dir), batch, params)
    core = make_core(model_dir, speculative="ngram")
    assert run(core, batch, params) == plain
    stats = core.spec_stats
    # drafts were verified and some rolled back (a random model keeps few of them)
    assert stats.num_accepted_tokens < stats.num_draft_tokens


def test_greedy_output_is_unchanged_under_a_small_budget_and_preemption(tmp_path):
    model_dir = save_tiny_model(tmp_path, "llama")
    batch = repetitive_prompts(8, seed=1)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = run(make_core(model_dir), batch, params)
    small = make_core(model_dir, speculative="ngram", max_num_batched_tokens=9, num_kv_blocks=40)
    assert run(small, batch, params) == plain
    assert small.scheduler.num_preemptions > 0 and small.spec_stats.num_draft_tokens > 0
    # every block came back: rolled-back drafts leaked none
    assert small.block_manager.num_free_blocks == small.block_manager.num_blocks


def test_a_request_can_opt_out(tmp_path):
    model_dir = save_tiny_model(tmp_path, "llama")
    core = make_core(model_dir, speculative="ngram")
    run(core, repetitive_prompts(2), SamplingParams(temperature=0, max_tokens=12, num_speculative_tokens=0))
    assert core.spec_stats.num_draft_tokens == 0


def test_drafts_as_decode_rows_equal_the_general_path(tmp_path):
    """The fast path (each draft a decode row, through the C++ decode stack on CPU) against the
    reference: the same tokens as one chunk through the Python layers' masked attention."""
    model_dir = save_tiny_model(tmp_path, "llama")
    core = make_core(model_dir)
    runner = core.runner
    prompt = [random.Random(3).randrange(3, 380) for _ in range(37)]
    table = list(range(16))
    runner.run(Step([StepSeq(prompt, 0, table)], [36], []))
    new = [5, 17, 99, 250, 3]
    fast, fast_logits = runner.run(Step([StepSeq(new, 37, table, num_draft=4)], list(range(5)), []))
    assert runner.decode_stack is not None  # the tiny Llama fits the C++ stack: it was the path taken
    ref, ref_logits = runner.run(Step([StepSeq(new, 37, table)], list(range(5)), []))
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast_logits, ref_logits, rtol=1e-4, atol=1e-4)


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("with_draft_probs", [False, True])
def test_rejection_sampling_follows_the_target_distribution(with_draft_probs):
    """Each token a verify step gives (the first, and the one after a kept draft) is distributed as the
    target p, for deterministic drafts (prompt lookup) and drafts drawn from a proposal q."""
    torch.manual_seed(0)
    vocab, trials = 6, 4000
    logits = torch.randn(3, vocab)
    p = logits.softmax(-1)
    q = torch.randn(2, vocab).softmax(-1) if with_draft_probs else None
    params = SamplingParams(temperature=1.0)
    first, second = torch.zeros(vocab), torch.zeros(vocab)
    draft_gen = torch.Generator().manual_seed(1)
    for trial in range(trials):
        if q is None:
            drafts = [2, 4]
        else:
            drafts = [int(torch.multinomial(q[i], 1, generator=draft_gen)) for i in range(2)]
        seq = Sequence("r", [1, 2, 3], params, seed=trial)
        out = verify(logits, drafts, seq, q)
        first[out[0]] += 1
        if len(out) > 1 and out[0] == drafts[0]:  # given the first draft kept, the next follows p_1
            second[out[1]] += 1
    # 5 degrees of freedom: chi-square above 20.5 has probability 0.001
    assert _chi_square(first, p[0]) < 20.5
    assert _chi_square(second, p[1]) < 20.5
