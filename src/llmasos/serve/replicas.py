"""The replicas behind the router: each a whole `llmasos serve` (its own engine, the same store and
keys file), started, watched, restarted and stopped here: a process on a loopback port, or (by
serve/ray_replicas.py) a process that a Ray actor runs on a machine of the cluster.

Why processes and not threads: an engine step holds the GIL for the Python between its kernels, and
one engine thread is what a process serves best; N processes are N engines, as vLLM's data-parallel
and SGLang's router setups run them.

No orphans: a replica gets SIGTERM when the router process dies however it dies (Linux's
PR_SET_PDEATHSIG, set in the child before exec), and `stop` sends SIGTERM to every replica, waits
for them to drain, then SIGKILLs what is left. Replicas are spawned from the event loop's thread
only: PDEATHSIG fires when the *thread* that forked the child ends, so a worker thread must never
spawn one.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Protocol

import httpx

from llmasos.serve.routing import ReplicaLoad

log = logging.getLogger("llmasos.serve.replicas")

CHECK_EVERY_S = 1.0
RESTART_BACKOFF_S = (1.0, 30.0)  # first wait before restarting a replica that keeps dying, and the most


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Replica(ReplicaLoad):
    """One replica: the routing figures (ReplicaLoad), where it listens, and what runs it (`handle`: a
    process, or a Ray actor; None while it is down)."""

    index: int = 0
    host: str = "127.0.0.1"
    port: int = 0  # 0 while a Ray actor has not said where its server listens
    pid: int | None = None  # the server process's, on its machine
    node: str | None = None  # the Ray node it runs on; None for a local process
    handle: object = None
    state: str = "starting"  # why it is not healthy, or "ready"
    restarts: int = 0
    next_start: float = 0.0  # monotonic time before which it is not restarted
    started_at: float = field(default_factory=time.monotonic)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def row(self) -> dict:
        return {
            "replica": self.index,
            "url": self.url,
            "pid": self.pid,
            "node": self.node,
            "healthy": self.healthy,
            "state": self.state,
            "in_flight": self.in_flight,
            "routed": self.routed,
            "restarts": self.restarts,
        }


class Launcher(Protocol):
    """How a replica's server is started, watched and stopped: a process here (`ProcessLauncher`), or
    a Ray actor on a machine of the cluster (serve/ray_replicas.py)."""

    def spawn(self, replica: Replica, serve_args: list[str], env: dict[str, str]) -> None:
        """Start `llmasos serve SERVE_ARGS` for the replica, with ENV added to its environment; set its
        handle (and host, port and pid as soon as they are known)."""

    def limits_url(self, host: str, port: int) -> str | None:
        """Where the replicas reach the rate limits of the router on host:port over the network
        (serve/remote_limits.py); None where they share the router's file system, and so its file."""

    async def exited(self, replica: Replica) -> str | None:
        """Why the replica's server is gone ("killed by signal 9"), or None while it runs."""

    def stop(self, replicas: list[Replica], timeout_s: float) -> None:
        """SIGTERM to every running replica, SIGKILL to what is left after timeout_s; nothing outlives it."""


class ProcessLauncher:
    """Replicas as child processes of the router, on loopback ports chosen once (a restart reuses it)."""

    def spawn(self, replica: Replica, serve_args: list[str], env: dict[str, str]) -> None:
        replica.port = replica.port or free_port()
        process = start_server(serve_args, replica.host, replica.port, env)
        replica.handle, replica.pid = process, process.pid

    async def exited(self, replica: Replica) -> str | None:
        code = replica.handle.poll()
        return None if code is None else exit_reason(code)

    def limits_url(self, host: str, port: int) -> None:
        return None  # this machine's: the file

    def stop(self, replicas: list[Replica], timeout_s: float) -> None:
        stop_processes([r.handle for r in replicas if r.handle is not None], timeout_s)


def start_server(
    serve_args: list[str], host: str, port: int, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """`llmasos serve SERVE_ARGS` on host:port, as a child that gets SIGTERM when this process dies
    (call it from a thread that lives as long as the process: see the module's docstring)."""
    command = [sys.executable, "-m", "llmasos", "serve", *serve_args, "--host", host, "--port", str(port)]
    return subprocess.Popen(
        command,
        preexec_fn=_die_with_parent,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **env} if env else None,
    )


def stop_processes(processes: list[subprocess.Popen], timeout_s: float) -> None:
    """SIGTERM to each running process (a server drains its requests), SIGKILL what is left at the end
    of timeout_s."""
    running = [p for p in processes if p.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for process in running:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


def exit_reason(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


class Supervisor:
    """Starts `count` replicas running `llmasos serve SERVE_ARGS` (by `launcher`: processes here unless
    told otherwise), with ENV added to their environment, checks them every second, restarts the ones
    that exit. `replicas` is what the routing policy reads."""

    def __init__(
        self,
        count: int,
        serve_args: list[str] | None,
        shutdown_timeout_s: float = 30.0,
        launcher: Launcher | None = None,
        env: dict[str, str] | None = None,
    ):
        self.serve_args = serve_args
        self.env = env or {}
        self.shutdown_timeout_s = shutdown_timeout_s
        self.launcher = launcher or ProcessLauncher()
        self.replicas = [Replica(index=i) for i in range(count)]
        self.stopping = False

    @classmethod
    def attach(cls, ports: list[int]) -> Supervisor:
        """Replicas already running on these loopback ports, run by someone else: checked, never
        started, restarted or stopped here (the router of a benchmark's second policy)."""
        supervisor = cls(0, None)
        supervisor.replicas = [Replica(index=i, port=port) for i, port in enumerate(ports)]
        return supervisor

    @property
    def managed(self) -> bool:
        return self.serve_args is not None

    def start(self) -> None:
        for replica in self.replicas if self.managed else ():
            self._spawn(replica)

    def _spawn(self, replica: Replica) -> None:
        replica.state, replica.healthy = "starting", False
        replica.started_at = time.monotonic()
        replica.forget()
        self.launcher.spawn(replica, self.serve_args, self.env)
        log.info("replica %d: started (pid %s, %s)", replica.index, replica.pid, replica.url)

    async def watch(self) -> None:
        """Every CHECK_EVERY_S: restart what exited, and ask the rest GET /ready."""
        async with httpx.AsyncClient(timeout=5.0) as client:
            while not self.stopping:
                await asyncio.gather(*(self.check(client, r) for r in self.replicas))
                await asyncio.sleep(CHECK_EVERY_S)

    async def check(self, client: httpx.AsyncClient, replica: Replica) -> None:
        if self.managed:
            if replica.handle is None:
                if time.monotonic() >= replica.next_start and not self.stopping:
                    self._spawn(replica)
                return
            why = await self.launcher.exited(replica)
            if why is not None:
                self._exited(replica, why)
                return
            if not replica.port:  # placed, not yet listening
                return
        try:
            response = await client.get(f"{replica.url}/ready")
        except httpx.HTTPError:
            healthy, state = False, "starting" if replica.state == "starting" else "not answering"
        else:
            if response.status_code == 401:  # keys are required, even for /ready: it answers, so it is up
                response = await client.get(f"{replica.url}/health")
            healthy = response.status_code == 200
            state = "ready" if healthy else _reason(response)
        replica.healthy, replica.state = healthy, state

    def _exited(self, replica: Replica, why: str) -> None:
        """A replica died: out of routing at once; restarted after a back-off that doubles while it
        keeps dying young (a replica that cannot start must not spin the machine)."""
        replica.healthy, replica.handle = False, None
        if self.stopping:
            return
        ran_s = time.monotonic() - replica.started_at
        low, high = RESTART_BACKOFF_S
        wait = low if ran_s > high else min(high, low * 2 ** min(replica.restarts, 5))
        replica.restarts += 1
        replica.next_start = time.monotonic() + wait
        replica.state = f"exited ({why}); restarting"
        log.warning("replica %d %s; restarting in %.0f s", replica.index, replica.state, wait)

    def mark_failed(self, index: int, why: str) -> None:
        """The router could not reach the replica: out of routing until the next check says otherwise."""
        replica = self.replicas[index]
        replica.healthy, replica.state = False, why

    def stop(self) -> None:
        """SIGTERM to every replica (they drain their running requests), SIGKILL after the timeout."""
        self.stopping = True
        if self.managed:
            self.launcher.stop(self.replicas, self.shutdown_timeout_s)
        for replica in self.replicas:
            replica.healthy, replica.state = False, "stopped"

    def not_ready(self) -> str:
        """Why no replica takes requests, replica by replica."""
        return "; ".join(f"replica {r.index}: {r.state}" for r in self.replicas)


def _reason(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"/ready answered {response.status_code}"
