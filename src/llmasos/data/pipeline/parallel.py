"""`data prepare --tasks N`: the per-record steps of a recipe in N worker processes, the dedup steps
in the parent, in row order, so the output and the report are those of one task.

A recipe is cut into stages: runs of per-record steps (quality filters, scrub, language id,
decontamination, chat checks: each row decided alone), and the dedup steps, which decide "seen
before" against every row kept so far and so must see the rows in order, in one process. A batch (a
row group of the parent's shards) goes through the stages in turn; a per-record stage is a task for
the pool, a dedup stage runs in the parent. Results are taken in the order the batches were
submitted, with a bounded number in flight, so the rows come out in the parent's order and memory
stays a few batches per worker. Each worker builds its own steps once (datatrove's filters, the
guards, the decontamination index) and returns, with the rows it kept, what each step counted in
that batch; the parent adds those up in batch order, so counts and examples are those of one task.

datatrove's LocalPipelineExecutor is not used for this: its tasks are whole pipelines from a reader
to a writer, each over its own share of the input files, with files between them and nothing
handed back to the caller; here the rows must come back, in order, to the dedup steps and to the
store's single atomic writer (the digest covers the order). Its executors are the way to go past one
machine (docs/data.md, "Parallel and distributed runs").
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from llmasos.data.pipeline import steps as pipeline_steps

STATEFUL = (pipeline_steps.ExactDedup, pipeline_steps.NearDedup)  # must see every row, in order
Rows = list[tuple[int, dict]]
Counted = list[tuple[int, dict, list[str]]]  # per step: rows in, counts, examples


@dataclass
class Batch:
    """A batch on its way through the stages: the parent's rows (as read, with the line of the first)
    until a stage turns them into (line, row) pairs; `table` once the last stage is done."""

    line: int
    source: pa.Table | None = None
    rows: Rows | None = None
    table: pa.Table | None = None


def stages(built: list[pipeline_steps.Step]) -> list[tuple[bool, list[int]]]:
    """(runs in the pool, the steps' indices), consecutive per-record steps together."""
    cut: list[tuple[bool, list[int]]] = []
    for i, step in enumerate(built):
        pooled = not isinstance(step, STATEFUL)
        if cut and cut[-1][0] and pooled:
            cut[-1][1].append(i)
        else:
            cut.append((pooled, [i]))
    return cut


def run_steps(steps: list[pipeline_steps.Step], batch: Batch, schema: pa.Schema | None) -> Counted:
    """The steps over one batch, its rows replaced by those kept (by its table after the last stage);
    returns what each step counted in this batch."""
    rows = batch.rows
    if rows is None:
        rows = list(enumerate(batch.source.to_pylist(), start=batch.line))
        batch.source = None
    counted: Counted = []
    for step in steps:
        step.counts.clear()
        step.examples.clear()
        counted.append((len(rows), step.counts, step.examples))
        rows = step(rows) if rows else rows
    batch.rows = rows
    if schema is not None:  # the last stage: the new dataset's row group
        batch.table = pa.Table.from_pylist([row for _, row in rows], schema=schema)
        batch.rows = None
    return [(n, dict(counts), list(examples)) for n, counts, examples in counted]


# ---- the workers -----------------------------------------------------------------------------------

_WORKER_STEPS: dict[int, pipeline_steps.Step] = {}


def _start_worker(home: str, recipe: list[tuple[str, dict]], column: str, indices: list[int]) -> None:
    import signal

    from llmasos.data.pipeline.recipe import build_step
    from llmasos.data.store import DatasetStore

    # Ctrl-C reaches the whole process group: the parent alone handles it (it cancels what is
    # queued, waits for the batches in hand and registers nothing); a worker killed by it would
    # break the pool instead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    store = DatasetStore(Path(home))
    for i in indices:
        name, options = recipe[i]
        _WORKER_STEPS[i] = build_step(name, options, column, store)


def _work(indices: list[int], batch: Batch, schema: pa.Schema | None) -> tuple[Batch, Counted]:
    counted = run_steps([_WORKER_STEPS[i] for i in indices], batch, schema)
    return batch, counted


# ---- the parent ------------------------------------------------------------------------------------


class Stages:
    """Batches through a recipe's stages with `tasks` worker processes (none for one task)."""

    def __init__(self, built, recipe: list[tuple[str, dict]], column: str, home: Path, tasks: int, merge):
        self.built, self.tasks, self.merge = built, tasks, merge  # merge(step index, one Counted entry)
        self.cut = stages(built)
        pooled = [i for pooled, indices in self.cut if pooled for i in indices]
        self.pool = None
        if tasks > 1 and pooled:
            self.pool = ProcessPoolExecutor(
                tasks,
                mp_context=multiprocessing.get_context("spawn"),  # no fork of a threaded parent
                initializer=_start_worker,
                initargs=(str(home), recipe, column, pooled),
            )

    def run(self, batches: Iterator[Batch], schema: pa.Schema) -> Iterator[pa.Table]:
        stream = batches
        for number, (pooled, indices) in enumerate(self.cut):
            last = schema if number == len(self.cut) - 1 else None
            if pooled and self.pool is not None:
                stream = self._pooled(indices, stream, last)
            else:
                stream = self._here(indices, stream, last)
        for batch in stream:
            if batch.table.num_rows:
                yield batch.table

    def _here(self, indices: list[int], batches: Iterator[Batch], schema) -> Iterator[Batch]:
        for batch in batches:
            self._merge(indices, run_steps([self.built[i] for i in indices], batch, schema))
            yield batch

    def _pooled(self, indices: list[int], batches: Iterator[Batch], schema) -> Iterator[Batch]:
        in_flight: deque[Future] = deque()
        for batch in batches:
            in_flight.append(self.pool.submit(_work, indices, batch, schema))
            if len(in_flight) >= 2 * self.tasks:
                yield self._collect(indices, in_flight.popleft())
        while in_flight:
            yield self._collect(indices, in_flight.popleft())

    def _collect(self, indices: list[int], future: Future) -> Batch:
        batch, counted = future.result()
        self._merge(indices, counted)
        return batch

    def _merge(self, indices: list[int], counted: Counted) -> None:
        for i, entry in zip(indices, counted):
            self.merge(i, entry)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
