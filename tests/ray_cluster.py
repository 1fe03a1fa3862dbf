"""A two-node Ray cluster on loopback for tests: two raylets, each its own "machine" to Ray's placement,
as real machines would be. Import this module before Ray.

Ray is kept on 127.0.0.1: on Linux it takes the machine's outward address unless
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes it use loopback (as it does on macOS and Windows).
"""

import os
from pathlib import Path

import pytest

# before Ray is imported: it reads this once, at import (the raylets and `llmasos serve` inherit it)
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "object_store_memory": 80 * 2**20, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=node)
    cluster.add_node(**node)
    ray.init(address=cluster.address, log_to_driver=True)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def actor_processes(actor_class: str) -> set[int]:
    """Live processes on this machine that run an actor of this class (Ray names its actor processes
    `ray::CLASS...`)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline, stat = (entry / "cmdline").read_bytes(), (entry / "stat").read_text()
            except OSError:
                continue
            if cmdline.startswith(f"ray::{actor_class}".encode()) and stat[stat.rindex(")") + 2] != "Z":
                found.add(int(entry.name))
    return found
