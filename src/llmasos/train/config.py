"""What a training run is: one dataclass of hyperparameters, filled from YAML and the command line.

The YAML keys are the CLI flag names (`max-steps` or `max_steps`), so a config file is a saved
command line; flags given on the command line win over the file. Every field has a default that
works, and each field's help text (`metadata["help"]`) is also its `--help` line.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from llmasos.errors import LLMasOSError

T = TypeVar("T")
PRECISIONS = ("auto", "bf16", "fp32")
DISTRIBUTED = ("auto", "ddp", "fsdp", "none")


def option(default: Any, help: str, shown: str | None = None) -> Any:
    """A dataclass field with its CLI help text; `shown` is what `--help` gives as the default when
    the field's own default (None: "decided later") says nothing, e.g. "by method"."""
    metadata = {"help": help, "shown": shown}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """The loop's hyperparameters, shared by every recipe (pretrain, finetune, dpo)."""

    out_dir: Path = option(Path("runs/train"), "checkpoints, metrics.jsonl and loss.png go here")
    max_steps: int = option(1000, "optimizer steps")
    batch_size: int = option(8, "sequences per micro-batch per process")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float = option(3e-4, "peak learning rate")
    min_lr_ratio: float = option(0.1, "the cosine schedule ends at min_lr_ratio * lr")
    warmup_steps: int = option(100, "steps of linear warm-up")
    weight_decay: float = option(0.1, "AdamW weight decay (matrices only)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0: no clipping)")
    eval_every: int = option(100, "steps between evaluations")
    eval_batches: int = option(10, "held-out micro-batches per evaluation (0: no evaluation)")
    save_every: int = option(500, "steps between checkpoints")
    log_every: int = option(10, "steps between metrics.jsonl records")
    seed: int = option(0, "seed of the model init, data order and dropout")
    precision: str = option("auto", "auto (bf16 autocast on CUDA where supported, else fp32), bf16, fp32")
    resume: bool = option(False, "continue from the latest checkpoint in out_dir")
    distributed: str = option("auto", "auto (ddp under torchrun), ddp, fsdp, none")

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise LLMasOSError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.eval_batches < 0:
            raise LLMasOSError("warmup_steps and eval_batches must not be negative")
        if not 0 <= self.min_lr_ratio <= 1:
            raise LLMasOSError(f"min_lr_ratio must be between 0 and 1, got {self.min_lr_ratio}")
        if self.precision not in PRECISIONS:
            raise LLMasOSError(f"precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'")
        if self.distributed not in DISTRIBUTED:
            raise LLMasOSError(
                f"distributed must be one of {', '.join(DISTRIBUTED)}, got '{self.distributed}'"
            )


def load_config(cls: type[T], yaml_path: Path | str | None, overrides: dict[str, Any]) -> T:
    """`cls` from a YAML file (keys = flag names, dashes or underscores) with `overrides` on top.

    Overrides whose value is None were not given and do not override. Unknown keys are an error
    naming the key, so a typo never silently falls back to a default.
    """
    values: dict[str, Any] = {}
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise LLMasOSError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise LLMasOSError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise LLMasOSError(f"config file {path} must be a mapping of flag names to values")
        values.update({str(key).replace("-", "_"): value for key, value in loaded.items()})
    values.update({key.replace("-", "_"): v for key, v in overrides.items() if v is not None})

    allowed = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in allowed:
            raise LLMasOSError(
                f"unknown config key '{key.replace('_', '-')}'; allowed: "
                + ", ".join(name.replace("_", "-") for name in allowed)
            )
    hints = typing.get_type_hints(cls)
    return cls(**{key: _coerce(key, value, hints[key]) for key, value in values.items()})


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """YAML gives ints for floats (`lr: 1`), strings for some floats (`lr: 3e-4`) and one string for a
    list (`data: a.txt`); accept those,
    and refuse values of the wrong kind with the key's name instead of failing mid-run."""
    optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
    if optional and value is None:
        return None
    kind = next(k for k in typing.get_args(hint) if k is not type(None)) if optional else hint
    origin = typing.get_origin(kind)
    if origin is list:
        value = [value] if isinstance(value, str | Path) else value
        if not isinstance(value, list | tuple):
            raise LLMasOSError(f"config key '{key}' must be a list, got {value!r}")
        return [str(v) for v in value]
    if kind in (int, float) and isinstance(value, str):  # PyYAML reads `3e-4` (no dot) as a string
        try:
            return kind(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is Path and isinstance(value, str | Path):
        return Path(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind in (str, bool) and isinstance(value, kind):
        return value
    raise LLMasOSError(f"config key '{key}' must be {kind.__name__}, got {value!r}")
