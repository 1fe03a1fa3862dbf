"""One rank of a tensor-parallel model, whichever executor placed it, and the `Workers` it is one of.

A worker rank (1..N-1) joins the group at rank 0's TCPStore, loads its shard, then runs the messages
rank 0 sends, in order: "step" (its part of the forward pass, meeting the other ranks in the
collectives), "swap" (copy KV blocks to or from CPU memory). The multiprocessing executor
(kernel/executor.py) runs it in a spawned process fed by a pipe; the Ray executor
(kernel/ray_executor.py) in a Ray actor fed by actor calls. Both are `Workers` to rank 0.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import torch

from llmasos.config import EngineConfig
from llmasos.kernel.runner import ModelRunner, default_device
from llmasos.models.parallel import TensorParallel

START_TIMEOUT_S = 600  # a worker's start: spawn, import torch, load its shard (slow on a busy CPU)
COLLECTIVE_TIMEOUT = timedelta(minutes=5)  # a rank waiting for the others inside one step


def backend(config: EngineConfig) -> str:
    device = torch.device(config.device) if config.device else default_device()
    return "nccl" if device.type == "cuda" else "gloo"


def threads(ranks_here: int) -> int:
    """Each rank's share of this machine's CPU cores, so the ranks on it don't oversubscribe them."""
    return max(1, (os.cpu_count() or 1) // ranks_here)


def make_runner(model_dir: Path, config: EngineConfig, tp: TensorParallel) -> ModelRunner:
    """This rank's runner, with the CPU kernels loaded now (their first load costs seconds: at
    start-up, not inside the first step, where the other ranks would wait for it)."""
    runner = ModelRunner(model_dir, config, tp)
    if runner.device.type == "cpu":
        from llmasos.ops.kernels import kernels

        kernels()
    return runner


class Rank:
    """A worker rank: joined to the group and holding its shard."""

    def __init__(
        self,
        rank: int,
        size: int,
        host: str,
        port: int,
        model_dir: str,
        config: EngineConfig,
        cores: int,
    ):
        import torch.distributed as dist

        torch.set_num_threads(cores)
        store = dist.TCPStore(host, port, size, is_master=False, timeout=timedelta(seconds=START_TIMEOUT_S))
        store.set(f"joined/{rank}", "1")
        dist.init_process_group(
            backend(config), store=store, rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT
        )
        self.runner = make_runner(Path(model_dir), config, TensorParallel(rank, size))

    def handle(self, kind: str, arg: object) -> bool:
        """Run one message from rank 0; False for "stop"."""
        if kind == "step":
            self.runner.run_worker(arg)
        elif kind == "swap":
            self.runner.swap(arg)
        return kind not in ("stop",)

    @staticmethod
    def close() -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class Workers(Protocol):
    """Ranks 1..N-1 of a split model as rank 0 (the engine's process) sees them, wherever they run."""

    host: str  # the address of this machine that the workers reach rank 0's TCPStore at
    ranks_here: int  # ranks on this machine, rank 0 included (they share its CPU cores)

    def start(self, size: int, port: int, model_dir: Path, config: EngineConfig) -> None:
        """Start ranks 1..size-1, each joining the group at (host, port) and loading its shard."""

    def ready(self) -> bool:
        """Whether every worker has loaded its shard; raises EngineDeadError if one failed to."""

    def dead(self, grace_s: float = 0.0) -> str | None:
        """Which workers are gone and why ("rank 1 (exit code -9)"), waiting up to `grace_s` for a
        worker that is going down to be seen gone; None while all run."""

    def send(self, kind: str, arg: object) -> None:
        """Hand every worker one message, in order; raises OSError when one cannot take it."""

    def stop(self) -> None:
        """Stop every worker and wait for it to end, killing one that does not (no orphans); idempotent."""
