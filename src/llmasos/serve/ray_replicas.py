"""Replicas as Ray actors: `llmasos serve --replicas N --replica-executor ray` puts each replica on a
machine of a Ray cluster, behind the same router as local replicas (serve/router.py).

One placement group holds a bundle per replica (1 CPU, plus 1 GPU where the cluster has GPUs),
placed by `--ray-placement` (PACK fills a machine first, SPREAD and STRICT_SPREAD spread them); replica
i's actor always takes bundle i, so a restarted replica returns to its machine. The actor starts the
replica's `llmasos serve` as its child on its node's address and a free port, and reports them; the
router then proxies to it over the cluster's network as to a local process. The child gets SIGTERM
when the actor's process dies (PR_SET_PDEATHSIG), and the actor is owned by the router's process, so
Ray ends it when the router ends: no server outlives either.

The Supervisor (serve/replicas.py) watches each replica through `exited`: an actor that died, or whose
server exited, counts as an exited replica, is killed (freeing its bundle) and restarted as a local
one would be. The replica's HTTP port faces the cluster's network: keep that network private
(docs/distributed.md); the replica still checks API keys.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess

import ray
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from llmasos.config import RAY_PLACEMENTS
from llmasos.errors import LLMasOSError
from llmasos.kernel.ray_placement import place, wait_dead
from llmasos.serve.replicas import Replica, exit_reason, free_port, start_server, stop_processes

log = logging.getLogger("llmasos.serve.ray_replicas")

CALL_TIMEOUT_S = 5.0  # an actor that does not answer a poll in this time is busy, not dead: asked again
STOP_GRACE_S = 10.0  # beyond the servers' own shutdown timeout, for the actors to answer


class ReplicaActor:
    """Runs one replica's server on its node (made a Ray actor class by `ray.remote` where it is used).

    A synchronous actor runs its calls on its process's main thread, which lives as long as the actor:
    the thread PR_SET_PDEATHSIG watches."""

    def __init__(self, serve_args: list[str], env: dict[str, str]):
        host = ray.util.get_node_ip_address()
        port = free_port(host)
        self.process: subprocess.Popen = start_server(serve_args, host, port, env)
        self.place = (host, port, self.process.pid, ray.get_runtime_context().get_node_id())

    def where(self) -> tuple[str, int, int, str]:
        """(host, port, server pid, node id)."""
        return self.place

    def poll(self) -> int | None:
        return self.process.poll()

    def stop(self, timeout_s: float) -> None:
        stop_processes([self.process], timeout_s)


class RayLauncher:
    """Starts, watches and stops replicas as `ReplicaActor`s in one placement group (see the module's
    docstring). Joins the Ray cluster at `address` (else RAY_ADDRESS, else starts a local one, stopped
    with the replicas)."""

    def __init__(self, count: int, address: str | None = None, placement: str = "PACK"):
        if placement not in RAY_PLACEMENTS:
            raise LLMasOSError(
                f"unknown --ray-placement {placement!r} for replicas: use one of {', '.join(RAY_PLACEMENTS)}"
            )
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(address=address, log_to_driver=True)
        self.bundle = {"CPU": 1.0}
        if ray.cluster_resources().get("GPU", 0) > 0:
            self.bundle["GPU"] = 1.0
        bundles = [dict(self.bundle) for _ in range(count)]
        self.group = place(bundles, placement, "llmasos-replicas", "replicas", "lower --replicas")
        self.actor_class = ray.remote(ReplicaActor)
        # what the servers need from the router's environment (LLMASOS_HOME: the same store and keys)
        self.env = {k: v for k, v in os.environ.items() if k.startswith("LLMASOS_")}
        self._where: dict[int, ray.ObjectRef] = {}  # replica index -> its actor's where() call

    def spawn(self, replica: Replica, serve_args: list[str], env: dict[str, str]) -> None:
        actor = self.actor_class.options(
            num_cpus=self.bundle["CPU"],
            num_gpus=self.bundle.get("GPU", 0),
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.group, placement_group_bundle_index=replica.index
            ),
        ).remote(serve_args, {**self.env, **env})
        replica.handle, replica.port, replica.pid, replica.node = actor, 0, None, None
        self._where[replica.index] = actor.where.remote()

    def limits_url(self, host: str, port: int) -> str:
        """Always the network: a replica may be on another machine, and SQLite's locks do not span
        machines. A router listening on every interface is reached at this node's cluster address."""
        here = ray.util.get_node_ip_address()
        alive = [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]
        others = unreachable_machines(host, alive, here)
        if others:
            log.warning(
                "the router listens on %s only: replicas placed on %s cannot reach it for the shared rate "
                "limits and would answer 503 rate_limits_unavailable; serve with --host 0.0.0.0 (or %s) "
                "and keep the cluster's network private",
                host, ", ".join(others), here,
            )  # fmt: skip
        if host in ("", "0.0.0.0", "::"):
            host = here
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def exited(self, replica: Replica) -> str | None:
        actor = replica.handle
        try:
            if not replica.port:
                ref = self._where[replica.index]
                if not ray.wait([ref], timeout=0)[0]:
                    return None  # still being placed, or its server starting
                replica.host, replica.port, replica.pid, replica.node = await _call(ref)
            code = await _call(actor.poll.remote())
        except TimeoutError:
            return None
        except ray.exceptions.RayError as exc:
            return "its Ray actor died: " + (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if code is None:
            return None
        ray.kill(actor, no_restart=True)  # frees the bundle for the replica's next actor
        return exit_reason(code)

    def stop(self, replicas: list[Replica], timeout_s: float) -> None:
        actors = [r.handle for r in replicas if r.handle is not None]
        stopping = [actor.stop.remote(timeout_s) for actor in actors]
        ray.wait(stopping, num_returns=len(stopping), timeout=timeout_s + STOP_GRACE_S)
        for actor in actors:
            ray.kill(actor, no_restart=True)
        wait_dead(actors, STOP_GRACE_S)
        for replica in replicas:
            replica.handle = None
        remove_placement_group(self.group)
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()


async def _call(ref: ray.ObjectRef):
    """An actor call's result, awaited on the event loop (raises TimeoutError after CALL_TIMEOUT_S)."""
    return await asyncio.wait_for(asyncio.wrap_future(ref.future()), CALL_TIMEOUT_S)


def unreachable_machines(host: str, node_addresses: list[str], here: str) -> list[str]:
    """The cluster's other machines, when the router listens on loopback (the default --host): they
    cannot reach it. Nodes on this machine (a cluster on loopback, or this node's address) can."""
    if not (host == "localhost" or host == "::1" or host.startswith("127.")):
        return []
    return sorted({a for a in node_addresses if a != here and not a.startswith("127.") and a != "::1"})
