"""The tensor-parallel executor: one model split over N processes on this machine.

The driver process (the engine's) is rank 0: it keeps the scheduler, and its runner holds shard 0.
N - 1 worker processes (multiprocessing "spawn", so no CUDA or thread-pool state is inherited)
each build a `ModelRunner` for their rank. Every step, rank 0 sends the scheduler's decision as
plain data (`runner.Step`: each sequence's new token ids, start position and block table, and the
rows whose logits are wanted) down a pipe to each worker, then all ranks run the forward pass
together, meeting in torch.distributed's collectives (gloo on CPU, NCCL on CUDA) at the row-parallel
layers; the logits are gathered to rank 0, which samples. Tokens cross the boundary, not logits,
and workers send nothing back per step (no round trip on the decode path).

Rendezvous is a TCPStore on 127.0.0.1 at a port the OS picks, so worker traffic never leaves the
machine. A worker that dies (killed, out of memory, an error) ends the engine: the step raises
`EngineDeadError`, the server answers 503, and the other workers are stopped, never left hanging in
a collective. Shutdown, explicit or when the engine is garbage-collected, joins every worker.

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
from llmasos.kernel.runner import ModelRunner, RunnerOutput, default_device, plan
from llmasos.kernel.scheduler import SchedulerOutput
from llmasos.models.parallel import TensorParallel

START_TIMEOUT_S = 600  # a worker's start: spawn, import torch, load its shard (slow on a busy CPU)
COLLECTIVE_TIMEOUT = timedelta(minutes=5)  # a rank waiting for the others inside one step
STOP_TIMEOUT_S = 10


@dataclass
class Worker:
    rank: int
    process: object  # multiprocessing.Process (spawn context)
    conn: Connection


def _backend(config: EngineConfig) -> str:
    device = torch.device(config.device) if config.device else default_device()
    return "nccl" if device.type == "cuda" else "gloo"


def _threads(size: int) -> int:
    """Each rank's share of the CPU cores, so N ranks don't oversubscribe them."""
    import os

    return max(1, (os.cpu_count() or 1) // size)


def _runner(model_dir: Path, config: EngineConfig, tp: TensorParallel) -> ModelRunner:
    """This rank's runner, with the CPU kernels loaded now (their first load costs seconds: at
    start-up, not inside the first step, where the other ranks would wait for it)."""
    runner = ModelRunner(model_dir, config, tp)
    if runner.device.type == "cpu":
        from llmasos.ops.kernels import kernels

        kernels()
    return runner


def _worker_main(
    rank: int, size: int, port: int, model_dir: str, config: EngineConfig, conn: Connection
) -> None:
    """A worker process: join the group, load this rank's shard, then run the steps rank 0 sends."""
    import torch.distributed as dist

    try:
        torch.set_num_threads(_threads(size))
        store = dist.TCPStore(
            "127.0.0.1", port, size, is_master=False, timeout=timedelta(seconds=START_TIMEOUT_S)
        )
        store.set(f"joined/{rank}", "1")
        dist.init_process_group(
            _backend(config), store=store, rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT
        )
        runner = _runner(Path(model_dir), config, TensorParallel(rank, size))
        conn.send(("ready", None))
        while True:
            try:
                kind, arg = conn.recv()
            except EOFError:  # the driver is gone
                break
            if kind == "step":
                runner.run_worker(arg)
            elif kind == "swap":
                runner.swap(arg)
            else:  # "stop"
                break
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc(limit=4)))
        except OSError:
            pass
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _stop(workers: list[Worker], threads: int) -> None:
    """Ask every worker to stop, join it; one that does not stop in time is killed (no orphans).
    Then give this process back its threads and its torch.distributed group."""
    for w in workers:
        try:
            w.conn.send(("stop", None))
        except OSError:
            pass
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for w in workers:
        w.process.join(max(deadline - time.monotonic(), 0.1))
        if w.process.is_alive():
            w.process.kill()
            w.process.join()
        w.conn.close()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    torch.set_num_threads(threads)


class TensorParallelExecutor:
    """Runs steps on a model split over `config.tensor_parallel_size` processes; rank 0 is this one.

    It offers what the engine core uses of a `ModelRunner` (execute, swap, and `runner`, rank 0's,
    for the cache sizes and the model's config)."""

    def __init__(self, model_dir: Path, config: EngineConfig):
        import multiprocessing as mp

        import torch.distributed as dist

        if dist.is_initialized():
            raise LLMasOSError(
                "this process already runs a tensor-parallel engine (torch.distributed is initialized); "
                "shut that engine down first, or serve the second model from another process"
            )
        size = config.tensor_parallel_size
        timeout = timedelta(seconds=START_TIMEOUT_S)
        store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, wait_for_workers=False, timeout=timeout)
        ctx = mp.get_context("spawn")
        self.workers: list[Worker] = []
        self.dead: str | None = None  # why the engine can run no more steps
        self._finalizer = weakref.finalize(self, _stop, self.workers, torch.get_num_threads())
        try:
            for rank in range(1, size):
                parent, child = ctx.Pipe()
                args = (rank, size, store.port, str(model_dir), config, child)
                process = ctx.Process(target=_worker_main, args=args, name=f"llmasos-tp{rank}", daemon=True)
                process.start()
                child.close()
                self.workers.append(Worker(rank, process, parent))
            self._wait(lambda: store.check([f"joined/{w.rank}" for w in self.workers]), "join")
            dist.init_process_group(
                _backend(config), store=store, rank=0, world_size=size, timeout=COLLECTIVE_TIMEOUT
            )
            torch.set_num_threads(_threads(size))
            self.runner = _runner(model_dir, config, TensorParallel(0, size))
            for w in self.workers:
                self._wait(lambda w=w: w.conn.poll(), "load its shard")
                kind, detail = w.conn.recv()
                if kind != "ready":
                    raise EngineDeadError(f"tensor-parallel worker rank {w.rank} failed to start:\n{detail}")
        except BaseException:
            self.shutdown()
            raise

    def _wait(self, done, what: str) -> None:
        """Wait for `done()`, failing at once (not at the timeout) when a worker exits."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not done():
            for w in self.workers:
                if not w.process.is_alive():
                    why = self._worker_error(w)
                    raise EngineDeadError(
                        f"tensor-parallel worker rank {w.rank} exited before it could {what}{why}"
                    )
            if time.monotonic() > deadline:
                raise EngineDeadError(f"tensor-parallel workers did not {what} within {START_TIMEOUT_S} s")
            time.sleep(0.05)

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

    def _send(self, kind: str, arg: object) -> None:
        self._check()
        try:
            for w in self.workers:
                w.conn.send((kind, arg))
        except OSError as exc:
            raise self._die(exc) from exc

    def _check(self) -> None:
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        if any(not w.process.is_alive() for w in self.workers):
            raise self._die(None)

    def _die(self, cause: BaseException | None) -> EngineDeadError:
        """End the engine: say which worker died (or what failed), stop the rest; the error to raise."""
        time.sleep(0.2)  # a worker that is going down: let it exit, so its exit code is known
        gone = [w for w in self.workers if not w.process.is_alive()]
        if gone:
            reasons = "; ".join(f"rank {w.rank}{self._worker_error(w)}" for w in gone)
            self.dead = f"a tensor-parallel worker process died ({reasons}); the model must be reloaded"
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
