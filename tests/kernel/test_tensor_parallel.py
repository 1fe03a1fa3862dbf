"""Tensor parallelism: a model split over worker processes gives the tokens the whole model gives,
and its workers never outlive the engine, nor leave it hanging when one dies.

Each split engine spawns processes that import torch and load their shard (a second or two each on
a small CPU), so the tests are few and the models tiny: 4 query heads and 2 KV heads, so that 2 ranks
split the KV heads and 4 ranks replicate them.
"""

import gc
import os
import random
import signal
from pathlib import Path

import pytest

from llmasos.config import EngineConfig
from llmasos.errors import EngineDeadError, LLMasOSError, UnsupportedModelError
from llmasos.kernel.core import EngineCore
from llmasos.kernel.sequence import Sequence
from llmasos.sampling_params import SamplingParams

from tiny import save_tiny_model

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)


def children() -> set[int]:
    """This process's live children that multiprocessing spawned (from /proc, not from multiprocessing's
    own records), but for its resource tracker, which serves every later spawn too."""
    me, found = os.getpid(), set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat, cmdline = (entry / "stat").read_text(), (entry / "cmdline").read_bytes()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[1]) == me and fields[0] != "Z" and b"spawn_main" in cmdline:
                found.add(int(entry.name))
    return found


def prompts() -> list[list[int]]:
    """Requests sharing a long prefix (prefix-cache hits), with one asking for prompt logprobs."""
    rng = random.Random(0)
    shared = [rng.randrange(3, 290) for _ in range(24)]  # (the tiny GGUF's vocabulary has 300 tokens)
    return [shared + [rng.randrange(3, 290) for _ in range(rng.randint(1, 12))] for _ in range(6)]


def run(core: EngineCore) -> list[Sequence]:
    seqs = [Sequence(f"r{i}", p, GREEDY) for i, p in enumerate(prompts())]
    seqs.append(
        Sequence("scored", prompts()[0][:9], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1))
    )
    for seq in seqs:
        core.add(seq)
    while core.has_unfinished():
        core.step()
    return seqs


def make_core(model_dir: Path, tp: int, **config) -> EngineCore:
    """`config`: more EngineConfig fields (the executor)."""
    # 22 blocks of 4 tokens: not enough for every sequence at once, so some are preempted
    config = EngineConfig(device="cpu", block_size=4, num_kv_blocks=22, tensor_parallel_size=tp, **config)
    return EngineCore(model_dir, config, eos_token_ids=[2], max_model_len=256)


def assert_same_run(model_dir: Path, tp: int, check=lambda core: None, **config) -> None:
    """`check(core)`: looks at the split engine (rank 0's shard of the model: `core.runner.model`)."""
    expected = run(make_core(model_dir, 1))
    core = make_core(model_dir, tp, **config)
    try:
        check(core)
        got = run(core)
        stats = core.stats()
    finally:
        core.shutdown()
    assert stats.num_preemptions > 0 and stats.prefix_hit_tokens > 0  # both in play
    assert [s.output_token_ids for s in got] == [s.output_token_ids for s in expected]
    for ours, theirs in zip(got, expected):  # the gathered logits are the whole model's
        for a, b in zip(ours.logprobs, theirs.logprobs):
            assert a.keys() == b.keys() and all(a[t] == pytest.approx(b[t], abs=1e-4) for t in a)
    scored, reference = got[-1].prompt_logprobs, expected[-1].prompt_logprobs
    assert len(scored) == len(reference) == 9
    assert all(a.keys() == b.keys() for a, b in zip(scored[1:], reference[1:]))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


def test_two_ranks_give_one_rank_tokens_and_leave_no_process_behind(llama):
    from llmasos.api import LLM

    before = children()
    prompt = prompts()[1]
    expected = LLM(str(llama), device="cpu").generate([prompt], GREEDY)[0].outputs[0].token_ids
    llm = LLM(str(llama), device="cpu", tensor_parallel_size=2)
    assert len(children() - before) == 1  # the one worker: rank 0 is this process
    assert llm.generate([prompt], GREEDY)[0].outputs[0].token_ids == expected
    del llm
    gc.collect()
    assert children() == before


def test_two_ranks_match_with_prefix_caching_preemption_and_logprobs(llama):
    assert_same_run(llama, 2)


def test_a_dead_worker_ends_the_engine_with_a_clear_error(llama):
    before = children()
    core = make_core(llama, 2)
    core.add(Sequence("a", [5, 6, 7], GREEDY))
    core.step()
    (worker,) = children() - before
    os.kill(worker, signal.SIGKILL)
    with pytest.raises(EngineDeadError, match="worker process died"):
        while core.has_unfinished():
            core.step()
    assert children() == before  # the engine stopped what was left of it
    with pytest.raises(EngineDeadError, match="reloaded"):  # and stays dead, at once
        core.step()


def test_heads_that_do_not_split_are_refused_with_the_fix(llama):
    before = children()
    with pytest.raises(UnsupportedModelError, match=r"attention heads \(4\) do not split evenly across 3"):
        make_core(llama, 3)
    assert children() == before


def test_the_server_answers_503_when_a_worker_dies_and_stops_its_workers(store, tmp_path):
    from dataclasses import replace

    import httpx

    from llmasos.serve.registry import RegistryConfig

    from serving import ENGINE, LiveServer, server_config

    before = children()
    registry = RegistryConfig(["tiny"], replace(ENGINE, tensor_parallel_size=2))
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    with LiveServer(server_config(["tiny"], tmp_path, registry=registry)) as server:
        assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).status_code == 200
        (worker,) = children() - before
        os.kill(worker, signal.SIGKILL)
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 503
        assert "worker process died" in response.json()["error"]["message"]
    assert children() == before


@pytest.mark.parametrize(("family", "tp"), [("qwen2", 4), ("gpt2", 2)])
def test_other_families_split_alike(tmp_path, family, tp):
    """Qwen2 on 4 ranks: biases on q/k/v, tied embeddings, 2 KV heads each replicated on 2 ranks;
    GPT-2: its own layout (a checkpoint-packed Conv1D QKV, biases everywhere, learned positions)."""
    assert_same_run(save_tiny_model(tmp_path / family, family), tp)


def test_gguf_blocks_split_by_row_give_the_same_tokens(tmp_path):
    """Q8_0 blocks: q/k/v and gate/up split by rows of blocks, the output and down projections by
    blocks of each row, against one rank running the same blocks."""
    from llmasos.models.parallel import ColumnParallelQuantLinear, RowParallelQuantLinear
    from llmasos.store.gguf import convert_gguf

    from tiny_gguf import Q, write_tiny_gguf

    model_dir = tmp_path / "q8"
    convert_gguf(write_tiny_gguf(tmp_path / "q8.gguf", "llama", Q.Q8_0), model_dir)

    def in_blocks(core):
        kinds = {type(m) for m in core.runner.model.modules()}
        assert {ColumnParallelQuantLinear, RowParallelQuantLinear} <= kinds

    assert_same_run(model_dir, 2, in_blocks)


def test_unknown_executors_and_placements_are_refused_with_the_choices():
    with pytest.raises(LLMasOSError, match="unknown distributed_executor 'slurm'; choose one of mp, ray"):
        EngineConfig(distributed_executor="slurm")
    with pytest.raises(LLMasOSError, match="unknown ray_placement 'spread'; choose one of PACK, STRICT_"):
        EngineConfig(ray_placement="spread")


def test_ray_stays_an_optional_import():
    """Ray is imported only by an engine that asks for it (llmasos[ray] is an extra)."""
    import subprocess
    import sys

    code = "import sys, llmasos.api, llmasos.cli.serve, llmasos.kernel.core; print('ray' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout == "False\n"
