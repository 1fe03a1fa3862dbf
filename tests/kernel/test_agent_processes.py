"""Agents as kernel processes, as pure logic with no model: quotas, pinned and swapped context, LAS."""

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from test_scheduler import apply_step, check_invariants, run_step

from llmasos.kernel.memory import BlockManager
from llmasos.kernel.scheduler import Scheduler
from llmasos.kernel.sequence import Sequence
from llmasos.sampling_params import SamplingParams


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def turn(prompt, agent, max_tokens=4, request_id="r"):
    return Sequence(request_id, list(prompt), SamplingParams(max_tokens=max_tokens), agent=agent)


def make(num_blocks=32, block_size=4, quota=None, swap_slots=0, budget=64, max_seqs=8, **policies):
    clock = Clock()
    bm = BlockManager(num_blocks, block_size, quota=quota, num_swap_slots=swap_slots)
    sched = Scheduler(bm, max_seqs, budget, clock=clock, pin_seconds=10, **policies)
    return bm, sched, clock


def run_all(sched, rng=None):
    rng = rng or random.Random(0)
    while sched.has_unfinished():
        run_step(sched, rng)


def check_agents(bm: BlockManager, seqs: list[Sequence]) -> None:
    """Per agent: the blocks its live sequences and pins reference, as the block manager counts them,
    never more than the quota; ref counts include the pins; swap slots neither lost nor shared."""
    refs = Counter(b for s in seqs if not s.is_finished for b in s.block_table)
    refs.update(b for pin in bm.pins for b in pin.block_ids)
    for block in bm.blocks:
        assert block.ref_count == refs[block.block_id]
        assert (block.block_id in bm.free_block_ids) == (block.ref_count == 0)
    cached_free = sum(1 for b in bm.free_block_ids if bm.blocks[b].hash is not None)
    assert bm.num_cached_free_blocks == cached_free, "the count a monitor reads is off"
    held: dict[str, set[int]] = {}
    for s in seqs:
        if not s.is_finished and s.agent is not None:
            held.setdefault(s.agent, set()).update(s.block_table)
    for pin in bm.pins:
        held.setdefault(pin.agent, set()).update(pin.block_ids)
    assert {a: set(c) for a, c in bm.agent_blocks.items()} == {a: b for a, b in held.items() if b}
    if bm.quota is not None:
        assert all(len(blocks) <= bm.quota for blocks in held.values()), "an agent exceeded its quota"
    slots = [e.slot for e in bm.swapped.values()] + bm.free_swap_slots + bm._slots_in_flight
    assert len(slots) == len(set(slots))


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 3), st.integers(1, 30), st.integers(1, 10)),
        st.tuples(st.just("resume"), st.integers(0, 100), st.integers(1, 8)),  # the agent's next turn
        st.tuples(st.just("step")),
        st.tuples(st.just("abort"), st.integers(0, 100)),
        st.tuples(st.just("tick"), st.floats(0, 15)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(
    ops=ops,
    num_blocks=st.integers(6, 24),
    block_size=st.sampled_from([1, 2, 4]),
    quota=st.one_of(st.none(), st.integers(3, 12)),
    budget=st.integers(1, 32),
    policy=st.sampled_from(["fcfs", "las"]),
    context=st.sampled_from(["none", "pin", "swap"]),
)
def test_a_quota_is_never_exceeded(ops, num_blocks, block_size, quota, budget, policy, context):
    rng = random.Random(0)
    bm, sched, clock = make(
        num_blocks, block_size, quota, 8, budget, 4, policy=policy, context_policy=context
    )
    seqs: list[Sequence] = []
    limit = min(num_blocks, quota or num_blocks) * block_size  # the engine refuses turns over it

    def add(prompt, agent, max_tokens):
        if len(prompt) + max_tokens <= limit:
            seqs.append(turn(prompt, f"a{agent}", max_tokens))
            sched.add(seqs[-1])

    for op in ops:
        if op[0] == "add":
            add([rng.randrange(3) for _ in range(op[2])], op[1], op[3])
        elif op[0] == "resume" and seqs:
            last = seqs[op[1] % len(seqs)]
            if last.is_finished:
                add(last.token_ids + [rng.randrange(3) for _ in range(op[2])], last.agent[1:], 3)
        elif op[0] == "step":
            run_step(sched, rng)
        elif op[0] == "abort" and seqs:
            sched.finish(seqs[op[1] % len(seqs)], "abort")
        elif op[0] == "tick":
            clock.now += op[1]
        check_invariants(bm, seqs) if context == "none" else None
        check_agents(bm, seqs)
    for _ in range(2000):  # everything admitted finishes: no deadlock, no starvation
        if not sched.has_unfinished():
            break
        run_step(sched, rng)
        check_agents(bm, seqs)
    assert not sched.has_unfinished()
    clock.now += 100
    bm.release_expired(clock.now)
    assert bm.num_free_blocks == num_blocks and not bm.agent_blocks


def test_an_agent_at_its_quota_waits_and_never_takes_another_agents_blocks():
    bm, sched, _ = make(num_blocks=32, block_size=4, quota=4)
    a1, a2 = turn(range(12), "a", max_tokens=4), turn(range(50, 62), "a", max_tokens=4)
    b = turn(range(100, 112), "b", max_tokens=4)
    for seq in (a1, a2, b):
        sched.add(seq)
    out = sched.schedule()
    assert out.seqs == [a1, b], "a's second turn would exceed its quota: passed over, b is not held up"
    assert bm.agent_usage("a") == 3 and a2.block_table == []
    rng = random.Random(0)
    while sched.has_unfinished():
        apply_step(sched, out, rng)
        out = sched.schedule()
        assert bm.agent_usage("a") <= 4 and not b.events.preemptions
    assert a2.num_output_tokens == 4 and bm.num_free_blocks == 32


def test_an_agent_over_its_quota_preempts_its_own_sequence():
    bm, sched, _ = make(num_blocks=32, block_size=2, quota=5)
    first, second = turn(range(4), "a", max_tokens=6), turn(range(10, 14), "a", max_tokens=6)
    other = turn(range(20, 24), "b", max_tokens=6)
    for seq in (first, other, second):
        sched.add(seq)
    preempted = []
    rng = random.Random(0)
    while sched.has_unfinished():
        out = sched.schedule()
        preempted += out.preempted
        assert bm.agent_usage("a") <= 5
        apply_step(sched, out, rng)
    assert preempted and all(seq.agent == "a" for seq in preempted)
    assert other.events.preemptions == 0


def finish_turn(sched, seq, rng=None):
    sched.add(seq)
    run_all(sched, rng)
    return seq


def test_a_pinned_turn_survives_pressure_from_cached_blocks_and_the_next_turn_hits_it():
    bm, sched, clock = make(num_blocks=10, block_size=4, context_policy="pin")
    first = finish_turn(sched, turn(range(17), "a", max_tokens=4))  # 21 tokens: 5 blocks, 5 computed
    assert bm.pinned_blocks("a") == 5 and bm.num_free_blocks == 5
    # another agent's turn fills the rest: the pinned blocks are not evicted as cached-free ones would be
    finish_turn(sched, turn(range(100, 118), "b", max_tokens=2))
    resumed = turn(first.token_ids + [7, 8, 9], "a")
    finish_turn(sched, resumed)
    assert resumed.num_cached_tokens == 20, "the next turn computes only its new tokens (and a partial block)"
    clock.now += 11
    sched.schedule()
    assert bm.pinned_blocks("a") == 0 and bm.pinned_blocks("b") == 0, "pins expire"


def test_without_preservation_the_same_pressure_evicts_the_turn():
    bm, sched, _ = make(num_blocks=10, block_size=4, context_policy="none")
    first = finish_turn(sched, turn(range(17), "a", max_tokens=4))
    finish_turn(sched, turn(range(100, 133), "b", max_tokens=2))
    resumed = finish_turn(sched, turn(first.token_ids + [7, 8, 9], "a"))
    assert resumed.num_cached_tokens < 20


def test_pins_are_released_under_pressure_before_any_preemption():
    bm, sched, _ = make(num_blocks=10, block_size=4, context_policy="pin")
    finish_turn(sched, turn(range(17), "a", max_tokens=4))
    big = turn(range(100, 130), "b", max_tokens=8)  # needs 10 blocks: all of them
    sched.add(big)
    preempted = []
    while sched.has_unfinished():
        out = sched.schedule()
        preempted += out.preempted
        apply_step(sched, out, random.Random(0))
    assert not preempted and big.num_output_tokens == 8 and bm.pinned_blocks("a") == 0


def test_swap_copies_pinned_blocks_out_under_pressure_and_back_for_the_next_turn():
    bm, sched, _ = make(num_blocks=10, block_size=4, context_policy="swap", swap_slots=16)
    first = finish_turn(sched, turn(range(17), "a", max_tokens=4))
    pinned = list(bm.pins[0].block_ids)
    big = turn(range(100, 130), "b", max_tokens=8)
    sched.add(big)
    out = sched.schedule()
    assert sorted(b for b, _ in out.copies.out) == sorted(pinned), "copied out before they are reused"
    assert bm.swapped_blocks("a") == 5
    apply_step(sched, out, random.Random(0))
    run_all(sched)
    resumed = turn(first.token_ids + [7, 8, 9], "a")
    sched.add(resumed)
    out = sched.schedule()
    slots = {slot for _, slot in out.copies.into}
    assert len(out.copies.into) == 5 and len(slots) == 5
    assert resumed.num_cached_tokens == 20 and resumed.block_table[:5] == [b for _, b in out.copies.into]
    assert out.num_new_tokens == [4]


def test_a_swapped_context_comes_back_whole_once_it_fits_and_keeps_its_cpu_copy_while_it_waits():
    bm, sched, _ = make(num_blocks=10, block_size=4, context_policy="swap", swap_slots=16)
    rng = random.Random(0)
    first = finish_turn(sched, turn(range(9), "a", max_tokens=4))  # 3 full blocks pinned
    finish_turn(sched, turn(range(100, 140), None, max_tokens=1))  # takes all 10: a's swapped out, evicted
    assert bm.swapped_blocks("a") == 3 and not bm.find_cached_prefix(turn(first.token_ids, "a"))
    other = turn(range(200, 228), None, max_tokens=8)  # grows to 9 blocks while a's next turn waits
    sched.add(other)
    apply_step(sched, sched.schedule(), rng)
    resumed = turn(first.token_ids + [7, 8, 9], "a")  # 16 tokens: 3 blocks to bring back, 1 new
    sched.add(resumed)
    copied_in = []
    while not other.is_finished:
        out = sched.schedule()
        assert resumed not in out.seqs, "2 free blocks: too few for its whole context, so it waits"
        assert bm.swapped_blocks("a") == 3 and not out.copies.into, "and keeps its CPU copy meanwhile"
        apply_step(sched, out, rng)
    while not resumed.block_table:
        out = sched.schedule()
        copied_in += out.copies.into
        apply_step(sched, out, rng)
    assert len(copied_in) == 3 and resumed.block_table[:3] == [b for _, b in copied_in]
    assert resumed.num_cached_tokens == 12 and bm.swapped_blocks("a") == 0
    assert out.num_new_tokens == [4], "the next turn computes only its new tokens"
    run_all(sched)
    assert resumed.num_output_tokens == 4 and not other.events.preemptions


def test_las_lets_short_agents_finish_before_a_long_one():
    def finish_order(policy):
        bm, sched, _ = make(num_blocks=64, block_size=4, budget=8, max_seqs=1, policy=policy)
        finish_turn(sched, turn(range(40), "long", max_tokens=8))  # the long agent's earlier service
        seqs = [turn(range(200, 240), "long", max_tokens=8, request_id="long")]
        seqs += [turn(range(10 * i, 10 * i + 6), f"short{i}", 2, request_id=f"s{i}") for i in range(3)]
        for seq in seqs:
            sched.add(seq)
        done = []
        while sched.has_unfinished():
            out = sched.schedule()
            apply_step(sched, out, random.Random(0))
            done += [s.request_id for s in out.seqs if s.is_finished]
        return done

    assert finish_order("fcfs") == ["long", "s0", "s1", "s2"]
    assert finish_order("las") == ["s0", "s1", "s2", "long"]


def test_priority_classes_come_before_attained_service():
    bm, sched, _ = make(max_seqs=1, policy="las")
    finish_turn(sched, turn(range(20), "busy"))
    urgent = turn(range(30, 34), "busy")
    urgent.priority = -1
    fresh = turn(range(40, 44), "fresh")
    sched.add(fresh)
    sched.add(urgent)
    assert sched.schedule().seqs == [urgent]
