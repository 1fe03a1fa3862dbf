"""The tensor-parallel executor: one model split over N processes on this machine.

The driver process (the engine's) is rank 0: it keeps the scheduler, and its runner holds shard 0.
N - 1 worker processes (multiprocessing "spawn", so no CUDA or thread-pool state is inherited)
each build a `ModelRunner` for their rank. Every step, rank 0 sends the scheduler's decision as
plain data (`runner.Step`: each sequence's new token ids, start position and block table, and the
rows whose logits are wanted) down a pipe to each worker, then all ranks run the forward pass
together, meeting in torch.distributed's collectives (gloo on CPU, NCCL on CUDA) at the row-parallel
layers; the logits are gathered to rank 0, which samples. Tokens cross the boundary, not logits,
and workers send nothing back per step (no round trip on the decode path).

The workers are `Workers` (kernel/rank.py): here spawned processes fed by pipes
(`ProcessWorkers`), or with `distributed_executor="ray"` Ray actors on other machines
(kernel/ray_executor.py); rank 0's part is the same for both. Rendezvous is a TCPStore at a port
the OS picks, on 127.0.0.1 for local workers, so their traffic never leaves the machine. A worker
that dies (killed, out of memory, an error) ends the engine: the step raises `EngineDeadError`, the
server answers 503, and the other workers are stopped, never left hanging in a collective.
Shutdown, explicit or when the engine is garbage-collected, joins every worker.

As with any multiprocessing "spawn", a script that makes an engine with tensor_parallel_size > 1
must do so under `if __name__ == "__main__":`. One split engine per process (torch.distributed
has one default group).
"""

from __future__ import annotations

import time
import traceback
import weakref
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from llmasos.config import EngineConfig
from llmasos.errors import EngineDeadError, LLMasOSError
from llmasos.kernel.memory import SwapCopies
from llmasos.kernel.rank import (
    COLLECTIVE_TIMEOUT,
    START_TIMEOUT_S,
    Rank,
    Workers,
    backend,
    make_runner,
    threads,
)
from llmasos.kernel.runner import RunnerOutput, plan
from llmasos.kernel.scheduler import SchedulerOutput
from llmasos.models.parallel import TensorParallel

STOP_TIMEOUT_S = 10


def _worker_main(
    rank: int, size: int, port: int, model_dir: str, config: EngineConfig, conn: Connection
) -> None:
    """A worker process: join the group, load this rank's shard, then run the steps rank 0 sends."""
    worker = None
    try:
        worker = Rank(rank, size, "127.0.0.1", port, model_dir, config, threads(size))
        conn.send(("ready", None))
        while True:
            try:
                kind, arg = conn.recv()
            except EOFError:  # the driver is gone
                break
            if not worker.handle(kind, arg):
                break
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc(limit=4)))
        except OSError:
            pass
        raise SystemExit(1) from None
    finally:
        Rank.close()


@dataclass
class Worker:
    rank: int
    process: object  # multiprocessing.Process (spawn context)
    conn: Connection


class ProcessWorkers:
    """Ranks 1..N-1 as processes spawned on this machine (multiprocessing "spawn", so no CUDA or
    thread-pool state is inherited), each fed by a pipe."""

    host = "127.0.0.1"

    def __init__(self, config: EngineConfig):
        self.ranks_here = config.tensor_parallel_size
        self.workers: list[Worker] = []
        self._ready: set[int] = set()

    def start(self, size: int, port: int, model_dir: Path, config: EngineConfig) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        for rank in range(1, size):
            parent, child = ctx.Pipe()
            args = (rank, size, port, str(model_dir), config, child)
            process = ctx.Process(target=_worker_main, args=args, name=f"llmasos-tp{rank}", daemon=True)
            process.start()
            child.close()
            self.workers.append(Worker(rank, process, parent))

    def ready(self) -> bool:
        for w in self.workers:
            if w.rank not in self._ready and w.conn.poll():
                kind, detail = w.conn.recv()
                if kind != "ready":
                    raise EngineDeadError(f"tensor-parallel worker rank {w.rank} failed to start:\n{detail}")
                self._ready.add(w.rank)
        return len(self._ready) == len(self.workers)

    def dead(self, grace_s: float = 0.0) -> str | None:
        deadline = time.monotonic() + grace_s  # a worker that is going down: let it exit, so it is seen
        while (
            not (gone := [w for w in self.workers if not w.process.is_alive()])
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        return "; ".join(f"rank {w.rank}{self._worker_error(w)}" for w in gone) or None

    @staticmethod
    def _worker_error(w: Worker) -> str:
        try:
            if w.conn.poll():
                kind, detail = w.conn.recv()
                return f":\n{detail}" if kind == "error" else ""
        except (OSError, EOFError):
            pass
        code = w.process.exitcode
        return f" (exit code {code})" if code is not None else ""

    def send(self, kind: str, arg: object) -> None:
        for w in self.workers:
            w.conn.send((kind, arg))

    def stop(self) -> None:
        for w in self.workers:
            try:
                w.conn.send(("stop", None))
            except OSError:
                pass
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for w in self.workers:
            w.process.join(max(deadline - time.monotonic(), 0.1))
            if w.process.is_alive():
                w.process.kill()
                w.process.join()
            w.conn.close()
        self.workers.clear()


def _workers(config: EngineConfig) -> Workers:
    if config.distributed_executor == "ray":  # Ray is an optional dependency: imported only when asked for
        try:
            from llmasos.kernel.ray_executor import RayWorkers
        except ModuleNotFoundError as exc:
            if exc.name != "ray":
                raise
            raise LLMasOSError(
                "distributed_executor 'ray' needs Ray on every machine: pip install 'llmasos[ray]'"
            ) from None
        return RayWorkers(config)
    return ProcessWorkers(config)


def _stop(workers: Workers, num_threads: int) -> None:
    """Stop the workers, then give this process back its threads and its torch.distributed group."""
    workers.stop()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    torch.set_num_threads(num_threads)


class TensorParallelExecutor:
    """Runs steps on a model split over `config.tensor_parallel_size` ranks; rank 0 is this process.

    It offers what the engine core uses of a `ModelRunner` (execute, swap, and `runner`, rank 0's,
    for the cache sizes and the model's config)."""

    def __init__(self, model_dir: Path, config: EngineConfig):
        import torch.distributed as dist

        if dist.is_initialized():
            raise LLMasOSError(
                "this process already runs a tensor-parallel engine (torch.distributed is initialized); "
                "shut that engine down first, or serve the second model from another process"
            )
        size = config.tensor_parallel_size
        self.dead: str | None = None  # why the engine can run no more steps
        self.workers = _workers(config)
        self._finalizer = weakref.finalize(self, _stop, self.workers, torch.get_num_threads())
        try:
            timeout = timedelta(seconds=START_TIMEOUT_S)
            store = dist.TCPStore(
                self.workers.host, 0, size, is_master=True, wait_for_workers=False, timeout=timeout
            )
            self.workers.start(size, store.port, model_dir, config)
            self._wait(lambda: store.check([f"joined/{rank}" for rank in range(1, size)]), "join")
            dist.init_process_group(
                backend(config), store=store, rank=0, world_size=size, timeout=COLLECTIVE_TIMEOUT
            )
            torch.set_num_threads(threads(self.workers.ranks_here))
            self.runner = make_runner(model_dir, config, TensorParallel(0, size))
            self._wait(self.workers.ready, "load its shard")
        except BaseException:
            self.shutdown()
            raise

    def _wait(self, done, what: str) -> None:
        """Wait for `done()`, failing at once (not at the timeout) when a worker exits."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not done():
            gone = self.workers.dead()
            if gone:
                raise EngineDeadError(f"tensor-parallel worker {gone} exited before it could {what}")
            if time.monotonic() > deadline:
                raise EngineDeadError(f"tensor-parallel workers did not {what} within {START_TIMEOUT_S} s")
            time.sleep(0.05)

    def _send(self, kind: str, arg: object) -> None:
        self._check()
        try:
            self.workers.send(kind, arg)
        except OSError as exc:
            raise self._die(exc) from exc

    def _check(self) -> None:
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        if self.workers.dead() is not None:
            raise self._die(None)

    def _die(self, cause: BaseException | None) -> EngineDeadError:
        """End the engine: say which worker died (or what failed), stop the rest; the error to raise."""
        gone = self.workers.dead(grace_s=2.0)
        if gone:
            self.dead = f"a tensor-parallel worker process died ({gone}); the model must be reloaded"
        else:
            self.dead = f"a tensor-parallel step failed ({cause!r}); the model must be reloaded"
        self.shutdown()
        return EngineDeadError(self.dead)

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        planned = plan(out)
        self._send("step", planned.step)
        try:
            return self.runner.execute(out, planned)
        except Exception as exc:  # the ranks' collectives are out of step now: no step can follow
            raise self._die(exc) from exc

    def swap(self, copies: SwapCopies) -> None:
        self._send("swap", copies)
        self.runner.swap(copies)

    def shutdown(self) -> None:
        """Stop and join every worker (idempotent; also run when the executor is garbage-collected)."""
        self._finalizer()
