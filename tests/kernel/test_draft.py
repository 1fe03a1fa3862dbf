"""Speculative decoding with a draft model: greedy output unchanged on every decoder family, in a batch
and under preemption; the draft's KV kept right (a model drafting for itself is almost always right);
sampled output follows the target's distribution; draft models the target cannot verify are refused."""

import json
import random

import pytest
import torch

from llmasos.config import EngineConfig
from llmasos.errors import LLMasOSError, ModelNotFoundError
from llmasos.kernel.core import EngineCore
from llmasos.kernel.sequence import Sequence
from llmasos.sampling_params import SamplingParams

from tiny import FAMILIES, save_tiny_model


def make_core(model_dir, **overrides):
    config = EngineConfig(**{"device": "cpu", "block_size": 4, "num_kv_blocks": 256, **overrides})
    return EngineCore(model_dir, config, eos_token_ids=[2], max_model_len=256)


def run(core, prompts, params):
    seqs = [Sequence(f"r{i}", p, params, seed=i) for i, p in enumerate(prompts)]
    for seq in seqs:
        core.add(seq)
    while core.has_unfinished():
        core.step()
    return [s.output_token_ids for s in seqs]


def prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 380) for _ in range(rng.randint(5, 30))] for _ in range(n)]


GREEDY = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_output_is_unchanged_on_every_family(tmp_path, family):
    target = save_tiny_model(tmp_path / "target", family)
    draft = save_tiny_model(tmp_path / "draft", family, seed=1, draft=True)
    batch = prompts(6)
    plain = run(make_core(target), batch, GREEDY)
    core = make_core(target, speculative="draft", speculative_model=str(draft))
    assert run(core, batch, GREEDY) == plain
    stats = core.spec_stats
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens < stats.num_draft_tokens
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks


def test_a_model_drafting_for_itself_keeps_its_drafts_under_preemption(tmp_path):
    """The draft's KV is right at every step (prefill, kept and rejected drafts, preemption, a tight
    token budget): the target as its own draft proposes the target's own greedy tokens."""
    target = save_tiny_model(tmp_path / "target", "llama")
    batch = prompts(8, seed=1)
    plain = run(make_core(target), batch, GREEDY)
    small = make_core(
        target,
        speculative="draft",
        speculative_model=str(target),
        max_num_batched_tokens=12,
        num_kv_blocks=20,
    )
    assert run(small, batch, GREEDY) == plain
    assert small.scheduler.num_preemptions > 0
    assert small.spec_stats.num_draft_tokens > 100
    # a rare near-tie may go another way between a chunk and decode rows; stale KV would lose most drafts
    assert small.spec_stats.acceptance_rate > 0.95
    assert small.block_manager.num_free_blocks == small.block_manager.num_blocks


def test_a_smaller_draft_under_preemption_and_prefix_hits(tmp_path):
    """Greedy output unchanged when sequences share a cached prefix (the draft computes it again) and
    are preempted and recomputed."""
    target = save_tiny_model(tmp_path / "target", "qwen2")
    draft = save_tiny_model(tmp_path / "draft", "qwen2", seed=1, draft=True)
    shared = prompts(1, seed=5)[0] * 2
    batch = [shared + tail for tail in prompts(8, seed=2)]
    plain = run(make_core(target), batch, GREEDY)
    core = make_core(
        target, speculative="draft", speculative_model=str(draft), max_num_batched_tokens=16, num_kv_blocks=48
    )
    assert run(core, batch, GREEDY) == plain
    assert core.scheduler.num_preemptions > 0 and core.scheduler.prefix_hit_tokens > 0


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.slow
def test_sampled_output_follows_the_target_distribution(tmp_path):
    """The first two tokens of many seeded samples, against the target's joint distribution p(t1) p(t2 | t1)
    computed by transformers: t2 comes out of a verify step that keeps or rejects the draft. The target
    drafts for itself, so its draft (its greedy token) is kept with that token's probability (a smaller
    random draft's token is rarely in the target's top k at all)."""
    from transformers import AutoModelForCausalLM

    target = draft = save_tiny_model(tmp_path / "target", "llama")
    prompt, top_k, trials = [5, 17, 99, 250, 3, 42], 3, 1500
    params = SamplingParams(temperature=1.0, top_k=top_k, max_tokens=3, ignore_eos=True)
    core = make_core(
        target, speculative="draft", speculative_model=str(draft), max_num_seqs=256, num_kv_blocks=1024
    )
    outputs = run(core, [prompt] * trials, params)
    assert core.spec_stats.num_draft_tokens >= trials  # every second token was verified
    assert 0 < core.spec_stats.num_accepted_tokens < core.spec_stats.num_draft_tokens

    hf = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()

    def top(ids):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1]
        values, tokens = logits.topk(top_k)
        return tokens.tolist(), values.softmax(-1).tolist()

    first, p_first = top(prompt)
    cells, probs = {}, []
    for t1, p1 in zip(first, p_first):
        for t2, p2 in zip(*top(prompt + [t1])):
            cells[(t1, t2)] = len(probs)
            probs.append(p1 * p2)
    counts = torch.zeros(len(probs))
    for out in outputs:
        counts[cells[(out[0], out[1])]] += 1  # a pair outside the top-k cells would raise here
    # 8 degrees of freedom: chi-square above 26.1 has probability 0.001
    assert _chi_square(counts, torch.tensor(probs)) < 26.1


def test_draft_settings_that_cannot_work_are_refused(tmp_path, monkeypatch):
    with pytest.raises(LLMasOSError, match="speculative_model"):
        EngineConfig(speculative="draft")
    with pytest.raises(LLMasOSError, match="go together"):
        EngineConfig(speculative_model="smollm2")
    with pytest.raises(LLMasOSError, match="one process"):
        EngineConfig(speculative="draft", speculative_model="smollm2", tensor_parallel_size=2)
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path / "home"))
    target = save_tiny_model(tmp_path / "target", "llama")
    with pytest.raises(ModelNotFoundError, match="draft model"):
        make_core(target, speculative="draft", speculative_model="no-such-draft")
    # the same vocabulary size, but two tokens' ids swapped: drafts would mean other text
    other = save_tiny_model(tmp_path / "other", "llama", draft=True)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(LLMasOSError, match="same family"):
        make_core(target, speculative="draft", speculative_model=str(other))


def test_text_of_several_tokens_a_step_is_the_text_of_one_a_step(tmp_path):
    """Stop strings and bytes held back for an incomplete character see the tokens of a verify step one
    by one, as without drafts: the same text, cut at the same stop string."""
    from llmasos.api import LLM

    target = str(save_tiny_model(tmp_path / "target", "llama"))
    messages = [{"role": "user", "content": "Hello"}]
    params = SamplingParams(temperature=0, max_tokens=24)
    plain_llm = LLM(target, device="cpu")
    drafted_llm = LLM(target, device="cpu", speculative="draft", speculative_model=target)
    plain = plain_llm.chat(messages, params)[0].outputs[0].text
    assert drafted_llm.chat(messages, params)[0].outputs[0].text == plain
    assert drafted_llm.engine.core.spec_stats.num_accepted_tokens > 0
    stop = plain[len(plain) // 2 : len(plain) // 2 + 2]
    with_stop = SamplingParams(temperature=0, max_tokens=24, stop=[stop])
    expected = plain_llm.chat(messages, with_stop)[0].outputs[0].text
    assert len(expected) < len(plain)
    assert drafted_llm.chat(messages, with_stop)[0].outputs[0].text == expected


def test_a_draft_of_a_shorter_context_is_refused(tmp_path):
    target = save_tiny_model(tmp_path / "target", "llama")
    short = save_tiny_model(tmp_path / "short", "llama", draft=True)
    config = json.loads((short / "config.json").read_text())
    config["max_position_embeddings"] = 128
    (short / "config.json").write_text(json.dumps(config))
    with pytest.raises(LLMasOSError, match="max_model_len to at most 128"):
        make_core(target, speculative="draft", speculative_model=str(short))
