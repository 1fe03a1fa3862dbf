"""Tensor parallelism across machines on Ray: a two-node Ray cluster on loopback (two raylets, each its
own "machine" to Ray's placement) runs a model split over both nodes, as `llmasos serve` does across
real machines; the tokens are the whole model's, a dead actor ends the engine with its reason, and
nothing outlives shutdown.

The cluster is tests/ray_cluster.py's, on 127.0.0.1.
"""

import os
import signal
import socket
import time

import pytest

import ray_cluster  # first: it keeps Ray on loopback
from llmasos.errors import EngineDeadError, LLMasOSError
from llmasos.kernel.sequence import Sequence
from ray_cluster import actor_processes

from test_tensor_parallel import GREEDY, assert_same_run, make_core
from tiny import save_tiny_model

pytestmark = pytest.mark.slow
cluster = ray_cluster.cluster  # the fixture


def rank_actors() -> set[int]:
    """Live processes on this machine that run a tensor-parallel rank as a Ray actor."""
    return actor_processes("RankActor")


def wait_for(condition, what: str, timeout_s: float = 60) -> None:
    """Ray ends killed actors asynchronously: wait for it to be seen, failing loudly if it never is."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


def test_two_ranks_on_two_ray_nodes_give_one_rank_tokens(cluster, llama):
    from ray.util.placement_group import placement_group_table

    def on_two_nodes(core):
        workers = core.executor.workers
        nodes = placement_group_table(workers.group)["bundles_to_node_id"]
        assert len(set(nodes.values())) == 2  # STRICT_SPREAD: rank 0's bundle and rank 1's on two nodes
        assert workers.where[1][1] == nodes[1]  # and rank 1's actor runs in its bundle
        assert len(rank_actors()) == 1

    assert_same_run(llama, 2, on_two_nodes, distributed_executor="ray", ray_placement="STRICT_SPREAD")
    wait_for(lambda: not rank_actors(), "the rank's actor outlived the engine")


def test_a_placement_ray_cannot_make_is_refused_with_the_fix(cluster, llama):
    with pytest.raises(LLMasOSError, match="STRICT_SPREAD puts each of the 4 .* has 2; add machines"):
        make_core(llama, 4, distributed_executor="ray", ray_placement="STRICT_SPREAD")
    assert not rank_actors()


def test_a_killed_ray_worker_ends_the_engine_with_its_reason(cluster, llama):
    core = make_core(llama, 2, distributed_executor="ray")
    core.add(Sequence("a", [5, 6, 7], GREEDY))
    core.step()
    (actor,) = rank_actors()
    os.kill(actor, signal.SIGKILL)
    with pytest.raises(EngineDeadError, match=r"worker process died \(rank 1 \(Ray actor, pid \d+"):
        while core.has_unfinished():
            core.step()
    with pytest.raises(EngineDeadError, match="reloaded"):  # and stays dead, at once
        core.step()
    wait_for(lambda: not rank_actors(), "an actor outlived the dead engine")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_llmasos_serve_on_ray_answers_openai_and_reports_a_dead_worker(cluster, store):
    from openai import APIStatusError, OpenAI

    from llmasos.api import LLM
    from llmasos.sampling_params import SamplingParams

    from serving import serve_process

    with LLM("tiny", device="cpu") as llm:
        expected = llm.generate("Hello there", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    port = free_port()
    env = dict(os.environ)
    args = ["tiny", "--kv-cache-gib", "0.01", "--tensor-parallel-size", "2", "--distributed-executor", "ray"]
    args += ["--ray-address", cluster.address, "--ray-placement", "STRICT_SPREAD"]
    with serve_process(args, env, port) as process:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        answer = client.completions.create(
            model="tiny", prompt="Hello there", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
        )
        assert answer.choices[0].text == expected[0].outputs[0].text
        (actor,) = rank_actors()
        os.kill(actor, signal.SIGKILL)
        with pytest.raises(APIStatusError) as failed:
            client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0)
        assert failed.value.status_code == 503
        assert "worker process died (rank 1 (Ray actor" in failed.value.message
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    wait_for(lambda: not rank_actors(), "an actor outlived the server")
