"""The block manager and scheduler as pure logic, with no model: properties and targeted cases."""

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from llmasos.kernel.memory import BlockManager
from llmasos.kernel.scheduler import Scheduler
from llmasos.kernel.sequence import Sequence
from llmasos.sampling_params import SamplingParams


def make_seq(prompt, max_tokens=8, priority=0):
    return Sequence("r", list(prompt), SamplingParams(max_tokens=max_tokens), priority=priority)


def check_invariants(bm: BlockManager, seqs: list[Sequence]) -> None:
    owners = Counter(b for s in seqs if not s.is_finished for b in s.block_table)
    for block in bm.blocks:
        assert block.ref_count == owners[block.block_id], (
            "ref count differs from the tables that hold the block"
        )
        assert (block.block_id in bm.free_block_ids) == (block.ref_count == 0)
        if owners[block.block_id] > 1:
            assert block.hash is not None, "only full, cached blocks may be shared"
    for s in seqs:
        if not s.is_finished and s.block_table:
            assert len(s.block_table) >= bm.blocks_needed(s.num_computed_tokens)
    for block_hash, block_id in bm.cached_block_ids.items():
        assert bm.blocks[block_id].hash == block_hash
    cached_free = sum(1 for b in bm.free_block_ids if bm.blocks[b].hash is not None)
    assert bm.num_cached_free_blocks == cached_free, "the count a monitor reads is off"


def run_step(sched: Scheduler, rng: random.Random) -> None:
    """What the engine does around a step, with a fake sampler."""
    apply_step(sched, sched.schedule(), rng)


def apply_step(sched: Scheduler, out, rng: random.Random) -> None:
    """The step `out` ran: account for it, sample a token where a sequence reached its end."""
    sched.update(out)
    for seq in out.seqs:
        if seq.num_computed_tokens == len(seq):
            seq.append_token(rng.randrange(3))  # few distinct ids, so prefixes repeat
            if seq.num_output_tokens >= seq.params.max_tokens:
                sched.finish(seq, "length")


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 12), st.integers(0, 2)),
        st.tuples(st.just("step")),
        st.tuples(st.just("abort"), st.integers(0, 100)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(
    ops=ops, num_blocks=st.integers(4, 24), block_size=st.sampled_from([1, 2, 4]), budget=st.integers(1, 32)
)
def test_no_block_leaked_or_double_owned(ops, num_blocks, block_size, budget):
    rng = random.Random(0)
    bm = BlockManager(num_blocks, block_size)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=budget)
    seqs: list[Sequence] = []
    capacity = num_blocks * block_size
    for op in ops:
        if op[0] == "add":
            _, length, max_tokens, priority = op
            if length + max_tokens <= capacity:  # the engine rejects what can never fit
                prompt = [rng.randrange(3) for _ in range(length)]
                seqs.append(make_seq(prompt, max_tokens, priority))
                sched.add(seqs[-1])
        elif op[0] == "step":
            run_step(sched, rng)
        elif seqs:
            sched.finish(seqs[op[1] % len(seqs)], "abort")
        check_invariants(bm, seqs)
    for _ in range(2000):  # everything admitted must finish: no deadlock, no starvation
        if not sched.has_unfinished():
            break
        run_step(sched, rng)
        check_invariants(bm, seqs)
    assert not sched.has_unfinished()
    assert bm.num_free_blocks == num_blocks


def test_prefix_blocks_are_shared_and_survive_free():
    bm = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    prompt = list(range(10))  # two full blocks + 2 tokens
    first = make_seq(prompt)
    sched.add(first)
    run_step(sched, random.Random(0))
    shared = first.block_table[:2]
    second = make_seq(prompt + [99])
    sched.add(second)
    out = sched.schedule()
    assert out.num_new_tokens == [1, 3]  # first decodes; second computes only its uncached tail
    assert second.block_table[:2] == shared and second.num_cached_tokens == 8
    assert all(bm.blocks[b].ref_count == 2 for b in shared)
    sched.finish(first, "abort")
    sched.finish(second, "abort")
    assert bm.num_cached_free_blocks == 2 and bm.num_free_blocks == 16
    third = make_seq(prompt)
    sched.add(third)
    sched.schedule()
    assert third.block_table[:2] == shared, "freed blocks keep their cached prefix until reused"
    assert bm.num_cached_free_blocks == 0
    check_invariants(bm, [first, second, third])


def test_equal_prompts_arriving_together_share_one_prefill():
    """The first one's blocks are published when scheduled, so the second hits them in the same step."""
    bm = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    prompt = list(range(10))
    first, second = make_seq(prompt), make_seq(prompt)
    sched.add(first)
    sched.add(second)
    out = sched.schedule()
    assert out.num_new_tokens == [10, 2] and second.num_cached_tokens == 8
    assert second.block_table[:2] == first.block_table[:2] and sorted(out.published) == sorted(
        first.block_table[:2]
    )
    sched.retract(out)  # had the step failed, the blocks would hold no KV: nobody may hit them
    assert not bm.cached_block_ids and all(bm.blocks[b].hash is None for b in first.block_table)
    assert bm.num_cached_free_blocks == 0


def test_withdrawing_a_free_cached_block_keeps_the_count():
    bm = BlockManager(num_blocks=4, block_size=2)
    seq = make_seq([1, 2, 3])
    assert bm.allocate(seq, 3)
    published = bm.cache_full_blocks(seq, 0, 3)
    bm.free(seq)
    assert bm.num_cached_free_blocks == 1
    bm.uncache(published)
    assert bm.num_cached_free_blocks == 0 and not bm.cached_block_ids


def test_a_chunked_prefill_shares_only_the_blocks_it_fills_this_step():
    bm = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=6)
    prompt = list(range(10))
    first, second = make_seq(prompt), make_seq(prompt)
    sched.add(first)
    sched.add(second)
    out = sched.schedule()  # first gets 6 tokens: one full block; second hits it and takes the rest
    assert out.num_new_tokens == [6] and out.published == first.block_table[:1]
    sched.update(out)
    out = sched.schedule()
    assert out.seqs == [first, second] and out.num_new_tokens == [4, 2]
    assert second.num_cached_tokens == 8 and second.block_table[:2] == first.block_table[:2]


def test_fully_cached_prompt_still_computes_its_last_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    prompt = list(range(8))
    first = make_seq(prompt)
    sched.add(first)
    run_step(sched, random.Random(0))
    second = make_seq(prompt)
    sched.add(second)
    out = sched.schedule()
    assert out.num_new_tokens[-1] == 4 and second.num_cached_tokens == 4


def test_chunked_prefill_respects_the_token_budget_and_decode_goes_first():
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=16)
    short = make_seq(range(3))
    sched.add(short)
    run_step(sched, random.Random(0))
    long = make_seq(range(100, 140))
    sched.add(long)
    seen = []
    while long.num_computed_tokens < len(long.prompt_token_ids):
        out = sched.schedule()
        assert out.num_tokens <= 16
        if not short.is_finished:
            assert out.seqs[0] is short and out.num_new_tokens[0] == 1
        seen.append(dict(zip((s.seq_id for s in out.seqs), out.num_new_tokens))[long.seq_id])
        sched.update(out)
        for s in out.seqs:
            if s.num_computed_tokens == len(s):
                s.append_token(0)
    assert sum(seen) == 40 and len(seen) >= 3


def test_preemption_frees_blocks_and_recomputes():
    bm = BlockManager(num_blocks=6, block_size=2)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    a, b = make_seq(range(5), max_tokens=6), make_seq(range(10, 15), max_tokens=6)
    sched.add(a)
    sched.add(b)
    rng = random.Random(0)
    preempted = False
    while sched.has_unfinished():
        out = sched.schedule()
        preempted |= b in out.preempted
        sched.update(out)
        for seq in out.seqs:
            if seq.num_computed_tokens == len(seq):
                seq.append_token(rng.randrange(3))
                if seq.num_output_tokens >= 6:
                    sched.finish(seq, "length")
    assert preempted and b.events.preemptions >= 1, "the later arrival is preempted first"
    assert a.num_output_tokens == 6 and b.num_output_tokens == 6
    assert bm.num_free_blocks == 6


def test_priority_orders_the_waiting_queue():
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=64)
    low, high = make_seq(range(4), priority=5), make_seq(range(4), priority=0)
    sched.add(low)
    sched.add(high)
    assert sched.schedule().seqs == [high]


def test_abort_frees_blocks_at_once():
    bm = BlockManager(num_blocks=8, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    seq = make_seq(range(13))
    sched.add(seq)
    sched.schedule()
    assert bm.num_free_blocks == 4
    sched.finish(seq, "abort")
    assert bm.num_free_blocks == 8 and seq.finish_reason == "abort" and not sched.has_unfinished()
