"""The kernel end to end on a tiny model: batch invariance, prefix hits, preemption, sampling rules."""

import random

import pytest
import torch

from llmasos.config import EngineConfig
from llmasos.errors import ContextLengthError, InvalidRequestError
from llmasos.kernel.core import EngineCore
from llmasos.kernel.engine import LLMEngine
from llmasos.kernel.sequence import Sequence
from llmasos.sampling_params import SamplingParams

from tiny import save_tiny_model

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


def make_core(model_dir, **overrides):
    config = EngineConfig(**{"device": "cpu", "block_size": 4, "num_kv_blocks": 256, **overrides})
    return EngineCore(model_dir, config, eos_token_ids=[2], max_model_len=256)


def run(core, prompts, params=GREEDY):
    seqs = [Sequence(f"r{i}", p, params) for i, p in enumerate(prompts)]
    for seq in seqs:
        core.add(seq)
    while core.has_unfinished():
        core.step()
    return seqs


def prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 380) for _ in range(rng.randint(1, 60))] for _ in range(n)]


def test_greedy_output_is_batch_invariant(model_dir):
    batch = prompts(16)
    alone = [run(make_core(model_dir), [p])[0].output_token_ids for p in batch]
    together = run(make_core(model_dir), batch)
    assert [s.output_token_ids for s in together] == alone
    # a small token budget forces chunked prefill interleaved with decodes
    chunked = run(make_core(model_dir, max_num_batched_tokens=7), batch)
    assert [s.output_token_ids for s in chunked] == alone


def test_tokens_not_logits_cross_the_runner_and_the_step_order_is_free(model_dir, monkeypatch):
    batch = prompts(8)
    expected = [s.output_token_ids for s in run(make_core(model_dir, max_num_batched_tokens=7), batch)]
    core = make_core(model_dir, max_num_batched_tokens=7)
    execute, results = core.runner.execute, []

    def update_first(out):  # the scheduler's bookkeeping before the runner reads the batch
        core.scheduler.update(out)
        results.append(execute(out))
        return results[-1]

    monkeypatch.setattr(core.runner, "execute", update_first)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    assert [s.output_token_ids for s in run(core, batch, params)] == expected
    for result in results:
        for token in result.sampled.values():
            assert isinstance(token.token_id, int) and len(token.top_logprobs) <= 3
            assert all(isinstance(v, float) for v in token.top_logprobs.values())


@pytest.mark.parametrize("budget", [512, 7])  # one step, or chunked prefills interleaved
def test_equal_prompts_in_one_step_share_the_prefill_and_the_output(model_dir, budget):
    shared = list(range(10, 50))
    alone = run(make_core(model_dir), [shared + [5]])[0].output_token_ids
    core = make_core(model_dir, max_num_batched_tokens=budget)
    first, second, third = run(core, [shared + [5], shared + [5], shared + [6]])
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == third.num_cached_tokens == 40
    assert first.output_token_ids == second.output_token_ids == alone
    assert third.output_token_ids == run(make_core(model_dir), [shared + [6]])[0].output_token_ids


def test_a_failed_step_leaves_no_prefix_cached(model_dir, monkeypatch):
    core = make_core(model_dir)
    monkeypatch.setattr(
        core.runner, "execute", lambda out: (_ for _ in ()).throw(RuntimeError("device lost"))
    )
    seq = Sequence("r", list(range(10, 50)), GREEDY)
    core.add(seq)
    with pytest.raises(RuntimeError, match="device lost"):
        core.step()
    core.finish([seq])
    monkeypatch.undo()
    assert not core.block_manager.cached_block_ids  # its blocks never held KV
    assert run(core, [list(range(10, 50))])[0].num_cached_tokens == 0


def test_prefix_cache_hits_give_the_same_output(model_dir):
    core = make_core(model_dir)
    shared = list(range(10, 50))  # ten full blocks
    first = run(core, [shared + [5]])[0]
    second = run(core, [shared + [5]])[0]
    assert second.num_cached_tokens == 40 and first.num_cached_tokens == 0
    assert second.output_token_ids == first.output_token_ids
    fresh = run(make_core(model_dir, enable_prefix_caching=False), [shared + [5]])[0]
    assert fresh.output_token_ids == first.output_token_ids


def test_prefix_cache_is_shared_only_within_a_salt(model_dir):
    core = make_core(model_dir)
    shared = list(range(10, 50))

    def salted(salt, request_id):
        seq = Sequence(request_id, shared + [5], GREEDY, cache_salt=salt)
        core.add(seq)
        while core.has_unfinished():
            core.step()
        return seq

    first = salted(b"tenant-a", "a1")
    assert salted(b"tenant-b", "b1").num_cached_tokens == 0  # another tenant's prompt is not a hit
    again = salted(b"tenant-a", "a2")
    assert again.num_cached_tokens == 40 and again.output_token_ids == first.output_token_ids
    stats = core.stats()
    assert (stats.prefix_queried_tokens, stats.prefix_hit_tokens) == (3 * 41, 40)
    assert stats.num_running == stats.num_waiting == 0


def test_preempted_sequences_resume_with_the_same_output(model_dir):
    batch = prompts(8, seed=2)
    expected = [s.output_token_ids for s in run(make_core(model_dir), batch)]
    tight = make_core(model_dir, num_kv_blocks=40)  # 160 tokens for 8 sequences of up to 84
    seqs = run(tight, batch)
    assert tight.scheduler.num_preemptions > 0
    assert [s.output_token_ids for s in seqs] == expected
    assert tight.block_manager.num_free_blocks == 40


def test_seeded_sampling_is_independent_of_the_batch(model_dir):
    # a high temperature, as the tiny random model is very sure of itself
    params = SamplingParams(temperature=3.0, top_p=0.95, top_k=200, seed=1234, max_tokens=16, ignore_eos=True)
    p = prompts(1, seed=3)[0]
    alone = run(make_core(model_dir), [p], params)[0].output_token_ids
    mixed = run(make_core(model_dir), prompts(6, seed=4) + [p], params)[-1].output_token_ids
    assert alone == mixed
    other = SamplingParams(temperature=3.0, top_p=0.95, top_k=200, seed=99, max_tokens=16, ignore_eos=True)
    assert run(make_core(model_dir), [p], other)[0].output_token_ids != alone


def test_stop_token_ids_eos_and_max_tokens(model_dir):
    core = make_core(model_dir)
    p = prompts(1, seed=5)[0]
    reference = run(core, [p])[0].output_token_ids
    stop_at = reference[5]
    seq = run(core, [p], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_at]))[0]
    assert seq.output_token_ids == reference[: reference.index(stop_at) + 1]
    assert seq.finish_reason == "stop" and seq.stop_reason == stop_at
    eos_core = EngineCore(model_dir, core.config, eos_token_ids=[stop_at], max_model_len=256)
    seq = run(eos_core, [p], SamplingParams(temperature=0, max_tokens=24))[0]
    assert seq.finish_reason == "stop" and seq.output_token_ids[-1] == stop_at
    seq = run(eos_core, [p], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    assert seq.finish_reason == "length" and len(seq.output_token_ids) == 24


def test_logprobs_are_the_model_distribution(model_dir):
    core = make_core(model_dir)
    seq = run(core, [[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True))[0]
    assert len(seq.logprobs) == 4
    for token, step in zip(seq.output_token_ids, seq.logprobs):
        assert token in step and len(step) >= 3
        assert step[token] == max(step.values()), "greedy picks the most likely token"
        assert sum(torch.tensor(list(step.values())).exp()) <= 1.0 + 1e-5
    assert seq.cumulative_logprob == pytest.approx(
        sum(s[t] for t, s in zip(seq.output_token_ids, seq.logprobs))
    )


def test_requests_that_cannot_fit_are_rejected_once_with_the_numbers(model_dir):
    config = EngineConfig(device="cpu", block_size=4, num_kv_blocks=4)  # 16 tokens
    engine = LLMEngine(str(model_dir), config, model_dir=model_dir)
    with pytest.raises(ContextLengthError, match="holds 16 tokens") as error:
        engine.add_request(list(range(10)), SamplingParams(max_tokens=10))
    e = error.value
    assert (e.prompt_tokens, e.max_tokens, e.max_model_len, e.kv_capacity_tokens) == (10, 10, 256, 16)
    assert e.param == "max_tokens"
    engine = LLMEngine(str(model_dir), EngineConfig(device="cpu", block_size=4), model_dir=model_dir)
    with pytest.raises(ContextLengthError, match="context is 256") as error:
        engine.add_request(list(range(300)), SamplingParams())
    assert error.value.param == "prompt"
    engine.check_context(200, 100)  # generation would stop at the context's end ("length")
    with pytest.raises(ContextLengthError, match="maximum context length is 256.*at most 56"):
        engine.check_context(200, 100, strict=True)  # the OpenAI API's rule
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request([], SamplingParams())
    assert not engine.has_unfinished()


def reference_prompt_logprobs(model_dir, prompt):
    """log p(prompt[i] | prompt[:i]) for i >= 1, from transformers on the same weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs = model(torch.tensor([prompt])).logits[0].log_softmax(-1)
    return logprobs[:-1].gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1)


@pytest.mark.parametrize("budget", [512, 7])  # whole prompts in one step, and chunked prefill
def test_prompt_logprobs_equal_transformers(model_dir, budget):
    batch = prompts(5, seed=6)
    params = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2, ignore_eos=True)
    for seq, prompt in zip(run(make_core(model_dir, max_num_batched_tokens=budget), batch, params), batch):
        assert len(seq.prompt_logprobs) == len(prompt) and seq.prompt_logprobs[0] is None
        got = torch.tensor([entry[t] for entry, t in zip(seq.prompt_logprobs[1:], prompt[1:])])
        torch.testing.assert_close(got, reference_prompt_logprobs(model_dir, prompt), atol=1e-4, rtol=1e-4)
        for entry in seq.prompt_logprobs[1:]:
            assert 2 <= len(entry) <= 3  # the token itself and the two most likely


def test_prompt_logprobs_use_the_prefix_cache_only_before_what_they_score(model_dir):
    core = make_core(model_dir)
    shared = list(range(10, 50))
    run(core, [shared + [5]])  # caches the shared blocks
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0, ignore_eos=True)
    scored = run(core, [shared + [5]], params)[0]
    assert scored.num_cached_tokens == 0 and len(scored.prompt_logprobs) == 41
    # scoring only the last token: the 40 shared tokens come from the cache, and the score is the same
    tail = SamplingParams(
        temperature=0, max_tokens=2, prompt_logprobs=0, prompt_logprobs_start=40, ignore_eos=True
    )
    cached = run(core, [shared + [5]], tail)[0]
    assert cached.num_cached_tokens == 36  # whole blocks before position 39, whose logits score token 40
    assert cached.prompt_logprobs[:40] == [None] * 40
    assert cached.prompt_logprobs[40] == pytest.approx(scored.prompt_logprobs[40], abs=1e-5)


def test_prompt_logprobs_survive_preemption(model_dir):
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0, ignore_eos=True)
    batch = prompts(8, seed=2)
    expected = [s.prompt_logprobs for s in run(make_core(model_dir), batch, params)]
    tight = make_core(model_dir, num_kv_blocks=40)
    again = run(
        tight, batch, SamplingParams(temperature=0, max_tokens=24, prompt_logprobs=0, ignore_eos=True)
    )
    assert tight.scheduler.num_preemptions > 0
    for seq, reference in zip(again, expected):
        assert len(seq.prompt_logprobs) == len(reference)
        for a, b in zip(seq.prompt_logprobs[1:], reference[1:]):
            assert a == pytest.approx(b, abs=1e-5)


def agent_turn(core, prompt, agent, request_id):
    seq = Sequence(
        request_id, prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), agent=agent
    )
    core.add(seq)
    while core.has_unfinished():
        core.step()
    return seq


@pytest.mark.parametrize(
    "policy, other_prompt_len",
    [("pin", 40), ("swap", 70)],  # swap: the other agent's turn needs the pinned blocks' memory
)
def test_a_preserved_context_gives_the_recomputed_tokens_and_prefills_only_the_new_ones(
    model_dir, policy, other_prompt_len
):
    core = make_core(model_dir, num_kv_blocks=24, context_policy=policy)  # 96 tokens
    first = agent_turn(core, list(range(10, 40)), "a", "a1")  # 38 tokens: 9 full blocks computed
    assert core.stats().agents["a"].pinned == 9
    agent_turn(core, list(range(100, 100 + other_prompt_len)), "b", "b1")
    swapped = core.stats().agents["a"].swapped
    assert swapped == (9 if policy == "swap" else 0)
    follow_up = first.token_ids + [7, 8, 9, 11, 12]
    resumed = agent_turn(core, follow_up, "a", "a2")
    assert resumed.num_cached_tokens == 36, "only the new tokens (and the last partial block) are computed"
    stats = core.stats().agents["a"]
    assert (stats.turns, stats.attained_service) == (2, 37 + len(follow_up) + 7 - 36)
    recomputed = agent_turn(make_core(model_dir), follow_up, None, "fresh")
    assert resumed.output_token_ids == recomputed.output_token_ids and recomputed.num_cached_tokens == 0


def test_a_swapped_context_that_waits_for_room_comes_back_whole_with_the_recomputed_tokens(model_dir):
    core = make_core(model_dir, num_kv_blocks=24, context_policy="swap")  # 96 tokens
    first = agent_turn(core, list(range(10, 40)), "a", "a1")  # 9 full blocks pinned
    run(core, [list(range(100, 195))], SamplingParams(temperature=0, max_tokens=1))  # all 24 blocks
    assert core.stats().agents["a"].swapped == 9
    follow_up = first.token_ids + [7, 8, 9, 11, 12]  # 9 blocks to bring back and 2 new: 11
    other = Sequence(
        "other", list(range(200, 280)), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    )
    core.add(other)
    core.step()  # its 20 blocks leave 4 free: a's next turn waits for room, its context kept on the CPU
    resumed = agent_turn(core, follow_up, "a", "a2")
    assert other.events.finished < resumed.events.scheduled and not other.events.preemptions
    assert resumed.num_cached_tokens == 36, "the whole context came back: only the new tokens are computed"
    recomputed = agent_turn(make_core(model_dir), follow_up, None, "fresh")
    assert resumed.output_token_ids == recomputed.output_token_ids


def test_without_preservation_the_next_turn_recomputes_under_pressure(model_dir):
    core = make_core(model_dir, num_kv_blocks=24)
    first = agent_turn(core, list(range(10, 40)), "a", "a1")
    agent_turn(core, list(range(100, 170)), "b", "b1")
    resumed = agent_turn(core, first.token_ids + [7, 8, 9, 11, 12], "a", "a2")
    assert resumed.num_cached_tokens < 36
