"""`llmasos data split`: a dataset into two new ones, train and eval, in one streamed pass.

A row goes to eval when the sha256 of (seed, its canonical JSON line) falls below the eval
fraction: the choice depends on the row and the seed alone, not on its position, the batch size,
the shards or the machine, so the same content splits the same way everywhere, streamed. Equal
rows land on the same side (an exact duplicate never leaks from train into eval). The fraction is
met in expectation, not exactly (as hash-based splits do, e.g. TFDS's `split` by hash).

Both datasets are registered under one lock after every row is written, or neither is.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from llmasos.data.store.datasets import DatasetManifest, DatasetStore, ShardWriter, row_line
from llmasos.errors import LLMasOSError

_SCALE = float(1 << 64)


@dataclass(frozen=True)
class SplitParams:
    """What the split's lineage records, so that anyone can reproduce it."""

    eval_fraction: float
    seed: int
    method: str = "sha256(seed + '\\n' + canonical JSON line) / 2**64 < eval_fraction"

    def __post_init__(self) -> None:
        if not 0 < self.eval_fraction < 1:
            raise LLMasOSError(f"--eval {self.eval_fraction}: the eval fraction must be between 0 and 1")

    def is_eval(self, row: dict) -> bool:
        digest = hashlib.sha256(f"{self.seed}\n{row_line(row)}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / _SCALE < self.eval_fraction


def split(
    store: DatasetStore, name: str, params: SplitParams, names: tuple[str, str] | None = None
) -> tuple[DatasetManifest, DatasetManifest]:
    """Split dataset `name` into (train, eval) datasets, by default NAME-train and NAME-eval."""
    parent = store.get(name)
    train_name, eval_name = names or (f"{name}-train", f"{name}-eval")
    if train_name == eval_name:
        raise LLMasOSError(f"the train and eval datasets need two names, got '{train_name}' twice")
    for new in (train_name, eval_name):
        store.check_new(new)
    sources = [{"source": f"dataset:{name}", "digest": parent.digest}]
    made: list[DatasetManifest] = []
    with store.store.lock(), store.store.staging() as work:
        try:
            writers = {side: ShardWriter(work / side) for side in ("train", "eval")}
            for writer in writers.values():
                writer.folder.mkdir()
            for table in store.batches(name):
                to_eval = np.array([params.is_eval(row) for row in table.to_pylist()], dtype=bool)
                writers["eval"].write(table.filter(pa.array(to_eval)), f"dataset {name}")
                writers["train"].write(table.filter(pa.array(~to_eval)), f"dataset {name}")
            for side, writer in writers.items():
                if writer.rows == 0:
                    raise LLMasOSError(
                        f"splitting {name} ({parent.rows} rows) with --eval {params.eval_fraction} leaves "
                        f"the {side} side empty; choose a fraction that leaves rows on both sides"
                    )
            for new in (train_name, eval_name):
                store.check_new(new)  # both, under the lock, before either is registered
            for side, new in (("train", train_name), ("eval", eval_name)):
                lineage = {"sources": sources, "recipe": None, "split": {"side": side, **asdict(params)}}
                made.append(
                    store.register(new, writers[side], f"dataset:{name}@{parent.digest}", lineage, {})
                )
            return made[0], made[1]
        except BaseException:
            for manifest in made:  # neither or both: a failure registering eval undoes train
                store._manifest_path(manifest.name).unlink(missing_ok=True)
            raise
        finally:
            store.store.collect_garbage()
