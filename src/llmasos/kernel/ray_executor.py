"""Tensor-parallel workers as Ray actors: one model split across the machines of a Ray cluster.

`distributed_executor="ray"`: rank 0 stays in the engine's process (it schedules and samples, as
with local workers); ranks 1..N-1 are Ray actors, each in a bundle of one placement group, so Ray
reserves every rank's CPU (and GPU) before any loads and places them as `ray_placement` says:
"PACK" fills a machine before the next, "STRICT_SPREAD" puts each rank on a machine of its own.
Bundle 0 is rank 0's, held on this machine (`node:<this ip>`), so its device is reserved too.

The actors join rank 0's TCPStore at this machine's Ray address and meet in torch.distributed's
collectives (gloo on CPU, NCCL on CUDA); each step reaches them as an actor call, which Ray runs in
the order sent. A rank whose step fails exits its process, so the other ranks' collectives fail at
once rather than wait; Ray then reports the actor dead, and the engine answers `EngineDeadError`
naming it. Shutdown stops the actors, kills what is left, and removes the placement group.

Every machine needs llmasos[ray] and the model at the same path (a shared or equally pulled store).
"""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path

import ray
from ray.util.placement_group import placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from llmasos.config import EngineConfig
from llmasos.errors import EngineDeadError
from llmasos.kernel.rank import Rank, threads
from llmasos.kernel.ray_placement import place, wait_dead
from llmasos.kernel.runner import default_device

STOP_TIMEOUT_S = 10


class RankActor:
    """A worker rank inside a Ray actor (made a Ray actor class by `ray.remote` where it is used)."""

    def start(
        self,
        rank: int,
        size: int,
        host: str,
        port: int,
        model_dir: str,
        config: EngineConfig,
        here: int,
    ) -> tuple[int, str]:
        """Join the group and load this rank's shard (`here`: the ranks on this machine, which share its
        cores); (pid, node id) of this actor."""
        self.rank = Rank(rank, size, host, port, model_dir, config, threads(here))
        return os.getpid(), ray.get_runtime_context().get_node_id()

    def handle(self, kind: str, arg: object) -> None:
        try:
            self.rank.handle(kind, arg)
        except BaseException:  # the ranks are out of step: end this one, so no collective waits for it
            traceback.print_exc()
            os._exit(1)

    def stop(self) -> None:
        Rank.close()


class RayWorkers:
    """Ranks 1..N-1 as Ray actors in a placement group (see the module's docstring)."""

    def __init__(self, config: EngineConfig):
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(address=config.ray_address, log_to_driver=True)
        self.host = ray.util.get_node_ip_address()
        self.ranks_here = 1
        self.actors: dict[int, object] = {}  # rank -> actor handle
        self.started: dict[int, ray.ObjectRef] = {}  # rank -> its start call
        self.latest: dict[int, ray.ObjectRef] = {}  # rank -> the last call sent to it
        self.where: dict[int, tuple[int, str]] = {}  # rank -> (pid, node id), once started
        self.failed: dict[int, str] = {}  # rank -> why it is gone
        self.group = None

    def start(self, size: int, port: int, model_dir: Path, config: EngineConfig) -> None:
        bundle = {"CPU": 1.0}
        device = config.device or default_device().type
        if device.startswith("cuda"):
            bundle["GPU"] = 1.0
        bundles = [{**bundle, f"node:{self.host}": 0.001}] + [dict(bundle) for _ in range(1, size)]
        what, fix = "tensor-parallel ranks", "lower tensor_parallel_size"
        self.group = place(bundles, config.ray_placement, "llmasos-tp", what, fix)
        nodes = placement_group_table(self.group)["bundles_to_node_id"]
        per_node = {node: list(nodes.values()).count(node) for node in nodes.values()}
        self.ranks_here = per_node[nodes[0]]
        actor_class = ray.remote(RankActor)
        for rank in range(1, size):
            actor = actor_class.options(
                num_cpus=bundle["CPU"],
                num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.group, placement_group_bundle_index=rank
                ),
            ).remote()
            self.actors[rank] = actor
            args = (rank, size, self.host, port, str(model_dir), config, per_node[nodes[rank]])
            self.started[rank] = self.latest[rank] = actor.start.remote(*args)

    def ready(self) -> bool:
        pending = list(self.started.values())
        done, _ = ray.wait(pending, num_returns=len(pending), timeout=0)
        if len(done) < len(pending):
            return False
        for rank, ref in self.started.items():
            try:
                self.where[rank] = ray.get(ref)
            except ray.exceptions.RayError as exc:
                raise EngineDeadError(
                    f"tensor-parallel worker rank {rank} (Ray actor) failed to start:\n{exc}"
                ) from None
        return True

    def dead(self, grace_s: float = 0.0) -> str | None:
        deadline = time.monotonic() + grace_s
        while True:
            self._look()
            if self.failed or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        return "; ".join(f"rank {rank} {why}" for rank, why in sorted(self.failed.items())) or None

    def _look(self) -> None:
        """Note the workers whose last call failed (their actor died, or their start raised)."""
        refs = {ref: rank for rank, ref in self.latest.items() if rank not in self.failed}
        if not refs:
            return
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        for ref in done:
            try:
                ray.get(ref)
            except ray.exceptions.RayError as exc:
                rank = refs[ref]
                pid, node = self.where.get(rank, ("?", "?"))
                reason = str(exc).strip().splitlines()[0]
                self.failed[rank] = f"(Ray actor, pid {pid} on node {node[:12]}): {reason}"

    def send(self, kind: str, arg: object) -> None:
        for rank, actor in self.actors.items():
            self.latest[rank] = actor.handle.remote(kind, arg)

    def stop(self) -> None:
        stopping = [actor.stop.remote() for rank, actor in self.actors.items() if rank not in self.failed]
        ray.wait(stopping, num_returns=len(stopping), timeout=STOP_TIMEOUT_S)
        for actor in self.actors.values():
            ray.kill(actor, no_restart=True)
        wait_dead(list(self.actors.values()), STOP_TIMEOUT_S)
        self.actors.clear()
        if self.group is not None:
            remove_placement_group(self.group)
            self.group = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
