"""Placement groups on a Ray cluster, and the end of actors, for whatever runs as Ray actors:
tensor-parallel ranks (kernel/ray_executor.py) and whole server replicas (serve/ray_replicas.py).

A group the cluster can never hold is refused at once with the numbers (Ray would leave it pending for
ever); one that waits on busy resources fails after PLACEMENT_TIMEOUT_S with what is free.
Imports Ray only, no torch: the replicas' router loads no model.
"""

from __future__ import annotations

import time

import ray
from ray.util.placement_group import PlacementGroup, placement_group

from llmasos.errors import LLMasOSError

PLACEMENT_TIMEOUT_S = 120  # Ray has no machine to add: a group it cannot place in this time never will be


def place(bundles: list[dict], strategy: str, name: str, what: str, fix: str) -> PlacementGroup:
    """A ready placement group of `bundles`; `what` names one bundle's occupant in errors ("tensor-parallel
    ranks"), `fix` is the setting to lower when the cluster is too small ("lower tensor_parallel_size")."""
    size = len(bundles)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if strategy == "STRICT_SPREAD" and len(nodes) < size:
        raise LLMasOSError(
            f"ray_placement STRICT_SPREAD puts each of the {size} {what} on a machine of its own, but the "
            f"Ray cluster has {len(nodes)}; add machines (`ray start --address ...` on each) or choose "
            "ray_placement PACK"
        )
    total = ray.cluster_resources()
    for resource in {r for bundle in bundles for r in bundle if not r.startswith("node:")}:
        need = sum(bundle.get(resource, 0) for bundle in bundles)
        if total.get(resource, 0) < need:
            raise LLMasOSError(
                f"{size} {what} need {need:g} {resource} in the Ray cluster, which has "
                f"{total.get(resource, 0):g}; add machines or {fix}"
            )
    group = placement_group(bundles, strategy=strategy, name=name)
    try:
        ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        ray.util.remove_placement_group(group)
        raise LLMasOSError(
            f"Ray could not place {size} {what} ({bundles[-1]} each, {strategy}) within "
            f"{PLACEMENT_TIMEOUT_S} s; free now: {ray.available_resources()}. Add machines to the cluster, "
            "free some, or choose another ray_placement"
        ) from None
    return group


def wait_dead(actors: list, timeout_s: float) -> None:
    """Wait until Ray has seen each killed actor's process end (so none outlives its owner)."""
    from ray._private.state import actors as actor_table

    ids = [actor._actor_id.hex() for actor in actors]
    deadline = time.monotonic() + timeout_s
    while ids and time.monotonic() < deadline:
        ids = [i for i in ids if actor_table(i).get("State") != "DEAD"]
        time.sleep(0.05)
