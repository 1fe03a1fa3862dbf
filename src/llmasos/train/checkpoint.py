"""Checkpoints that survive a crash at any moment, and resume bit-for-bit.

    out_dir/checkpoints/
      step-000500/          model.pt, optimizer.pt, trainer.pt (step, scheduler, RNG states, counters)
      step-001000/
      latest                "step-001000", replaced atomically after the folder is in place
      .tmp-*/               a write in progress, or one a crash interrupted (removed on the next save)

A checkpoint is written into a temp folder, fsynced and renamed into place, and only then does
`latest` move to it: a run killed mid-write leaves the previous checkpoint complete, and the
half-written one is never mistaken for a checkpoint. The last KEEP checkpoints are kept.

The model state holds only the parameters that train (requires_grad): a frozen base or a peft
model's base weights are rebuilt by the recipe exactly as at the start, so the adapters alone
restore the run. State dicts are full (unsharded), gathered through torch.distributed.checkpoint,
so a checkpoint is one set of files whatever the mode (none, DDP, FSDP2) that wrote it.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from llmasos.errors import LLMasOSError
from llmasos.files import fsync_dir, stage_text
from llmasos.train import distributed

KEEP = 2
_STEP_RE = re.compile(r"step-(\d+)")
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
_SCATTER = StateDictOptions(full_state_dict=True, strict=False)


def folder(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def latest(out_dir: Path) -> Path | None:
    """The newest checkpoint. Every step folder is complete, since it appears only by a rename
    after its files are written; `latest` may lag one behind after a crash, so it is for people
    and scripts, and the folders themselves decide."""
    complete = _complete(folder(out_dir))
    return complete[-1] if complete else None


def prepare(out_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from, or None to start afresh. Refuses to start a new run over an
    earlier run's checkpoints, which it would mix with its own."""
    found = latest(out_dir)
    if found is not None and not resume:
        raise LLMasOSError(
            f"{out_dir} holds checkpoints of an earlier run (latest: {found.name}); pass --resume to "
            "continue it, or choose another --out-dir"
        )
    return found if resume else None


def save(
    out_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict,
    is_main: bool,
) -> Path | None:
    """Write checkpoint `step`. Every rank calls it (FSDP gathers shards); rank 0 writes and gets
    the folder back, the others None. `state` is the trainer's counters (plain Python values)."""
    model_state = get_model_state_dict(model, options=_GATHER)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=_GATHER)
    rng = distributed.all_gather_object(_rng_state())
    if not is_main:
        return None
    root = folder(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(root)
    final = root / f"step-{step:06d}"
    work = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{final.name}-"))
    trainer_state = {**state, "step": step, "scheduler": scheduler.state_dict(), "rng": rng}
    for name, obj in (
        ("model.pt", model_state),
        ("optimizer.pt", optimizer_state),
        ("trainer.pt", trainer_state),
    ):
        _write(work / name, obj)
    fsync_dir(work)
    if final.exists():  # the same step saved again (a resumed run that ended where it stopped)
        _discard(final)
    os.replace(work, final)
    fsync_dir(root)
    os.replace(stage_text(root, ".latest-", final.name + "\n"), root / "latest")
    fsync_dir(root)
    for old in _complete(root)[:-KEEP]:
        _discard(old)
    return final


def load(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rank: int,
) -> dict:
    """Restore a checkpoint into the model, optimizer, scheduler and this rank's RNGs; returns the
    trainer's counters. Every rank reads the full state and keeps its own shard (FSDP2)."""
    model_state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    result = set_model_state_dict(model, model_state, options=_SCATTER)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trainable & set(result.missing_keys))
    if missing or result.unexpected_keys:
        raise LLMasOSError(
            f"checkpoint {path} does not fit this model (missing {missing[:3]}, unexpected "
            f"{list(result.unexpected_keys)[:3]}); resume with the same model and method that wrote it"
        )
    optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=_SCATTER)
    state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    scheduler.load_state_dict(state.pop("scheduler"))
    rng = state.pop("rng")
    _set_rng_state(rng[rank % len(rng)])
    return state


def _write(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _complete(root: Path) -> list[Path]:
    """Step folders, oldest first; only renamed-into-place (hence complete) folders match."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _STEP_RE.fullmatch(p.name)), key=_step)


def _discard(path: Path) -> None:
    """Delete a checkpoint folder by renaming it to a temp name first, so that a crash mid-delete
    never leaves a half-deleted folder under a step name."""
    aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-discard-"))
    os.replace(path, aside / path.name)
    shutil.rmtree(aside)


def _step(path: Path) -> int:
    return int(_STEP_RE.fullmatch(path.name).group(1))


def _remove_stale(root: Path) -> None:
    """Temp folders of writes a crash interrupted; only rank 0 writes, so none is in progress."""
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in root.glob(".latest-*"):
        stale.unlink(missing_ok=True)


def _rng_state() -> dict:
    """Every RNG a step may draw from, as plain values torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
