"""The training loop every recipe shares: AdamW, cosine schedule, accumulation, clipping, eval,
checkpoints, metrics. A recipe brings a model, batches and a loss; the loop brings the rest.

Exactness is the design constraint: the data order is a pure function of the step (a
`BatchSource` is indexed, not iterated), and a checkpoint holds every other piece of state, so a
resumed run computes the same losses as one that never stopped (CPU, fp32), and N processes see
the same global batches as one process accumulating N times as many micro-batches.

Gradients are token-weighted over the whole global batch: each micro-batch backpropagates its
summed loss, and after the step's last micro-batch the gradients are scaled by
world_size / (tokens counted on all ranks). That is the mean over every counted token whatever
the micro-batches hold (SFT batches count different numbers of tokens), and undoes the average
over ranks that DDP and FSDP apply.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn

from llmasos.errors import LLMasOSError
from llmasos.train import checkpoint, distributed
from llmasos.train.config import TrainConfig

LossFn = Callable[[nn.Module, dict[str, Tensor]], tuple[Tensor, int]]
"""(model, batch) -> (mean loss over the counted tokens, number of counted tokens)."""


class BatchSource(Protocol):
    """An endless, seeded stream of micro-batches, shuffled epoch by epoch, read by index.

    `batch(i, n)` is the i-th micro-batch of n examples: the same (i, n) always gives the same
    batch, which is what makes resume exact without saving any data position but the step.
    """

    num_examples: int

    def batch(self, index: int, batch_size: int) -> dict[str, Tensor]: ...


@dataclass
class TrainResult:
    steps: int
    tokens: int  # counted (target) tokens trained on, over all ranks
    train_loss: float  # the last step's
    eval_loss: float | None
    eval_perplexity: float | None
    seconds: float  # training time, summed over resumed segments


def causal_lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
    """Next-token cross-entropy over the positions whose label is not -100.

    Labels are already aligned (labels[t] is the target of position t; the data shifts them), so
    they are not passed to the model, which would shift them a second time. The loss is taken in
    fp32 even under bf16 autocast.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    labels = batch["labels"]
    count = int((labels != -100).sum())
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss / max(count, 1), count


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up to 1, then a cosine down to min_lr_ratio at max_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """One training run. `fit()` trains to config.max_steps (resuming first if config.resume) and
    evaluates, checkpoints and logs on the way.

    Only parameters with requires_grad reach the optimizer (fine-tuning freezes layers or wraps the
    model with peft). Weight decay applies to matrices (embeddings included, as in nanoGPT and
    GPT-2/3) and not to biases or norm gains, which are vectors. After `fit()` the caller's model
    holds the trained weights; under FSDP it is sharded, so save it from `full_state_dict()`.
    """

    def __init__(
        self,
        model: nn.Module,
        train: BatchSource,
        eval: BatchSource | None,
        config: TrainConfig,
        loss_fn: LossFn = causal_lm_loss,
        on_save: Callable[[Path], None] | None = None,
    ):
        self.config, self.train, self.loss_fn, self.on_save = config, train, loss_fn, on_save
        self.eval = eval if config.eval_batches > 0 else None
        self.dist = distributed.setup()
        self.resume_from = checkpoint.prepare(config.out_dir, config.resume)
        self.mode = distributed.resolve_mode(config.distributed, self.dist.world_size)
        self.autocast_dtype = _autocast_dtype(config.precision, self.dist.device)
        _seed(config.seed + self.dist.rank)  # dropout differs between ranks, as their data does

        self.model = model.to(self.dist.device)
        self.wrapped = distributed.wrap(self.model, self.mode, self.dist.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]  # after FSDP's sharding
        if not self.params:
            raise LLMasOSError("the model has no trainable parameters (every parameter is frozen)")
        groups = [
            {"params": [p for p in self.params if p.dim() >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in self.params if p.dim() < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]],
            lr=config.lr,
            betas=(config.beta1, config.beta2),
            fused=self.dist.device.type == "cuda" and self.mode != "fsdp",
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(step, config.warmup_steps, config.max_steps, config.min_lr_ratio),
        )

    def fit(self) -> TrainResult:
        c, d = self.config, self.dist
        state = {"step": 0, "tokens": 0, "seconds": 0.0, "train_loss": math.nan}
        if self.resume_from is not None:
            state = checkpoint.load(self.resume_from, self.model, self.optimizer, self.scheduler, d.rank)
            if tuple(state["layout"]) != self._layout():
                _console().print(
                    f"[yellow]{self.resume_from.name} was written with (world size, batch size, grad accum) "
                    f"= {tuple(state['layout'])}, this run has {self._layout()}: the data order changes"
                )
        start, tokens, train_loss = state["step"], state["tokens"], state["train_loss"]
        metrics = c.out_dir / "metrics.jsonl"
        if d.is_main:
            c.out_dir.mkdir(parents=True, exist_ok=True)
            _keep_records(metrics, until_step=start)
        eval_loss = None
        self.wrapped.train()
        began = window_start = time.perf_counter()
        window_tokens = 0
        with _progress(enabled=d.is_main and sys.stderr.isatty()) as progress:
            task = progress.add_task("training", total=c.max_steps, completed=start, loss="-", rate="-")
            for step in range(start, c.max_steps):
                train_loss, counted, grad_norm = self._step(step)
                done, now = step + 1, time.perf_counter()
                tokens, window_tokens = tokens + counted, window_tokens + counted
                rate = window_tokens / max(now - window_start, 1e-9)
                seconds = state["seconds"] + now - began
                progress.update(task, completed=done, loss=f"{train_loss:.4f}", rate=f"{rate:,.0f}")
                if done % c.log_every == 0 or done == c.max_steps:
                    lr = self.scheduler.get_last_lr()[0]
                    self._record(metrics, step=done, loss=train_loss, lr=lr, grad_norm=grad_norm,
                                 tokens=tokens, tokens_per_s=rate, seconds=seconds)  # fmt: skip
                    window_start, window_tokens = now, 0
                if self.eval is not None and (done % c.eval_every == 0 or done == c.max_steps):
                    eval_loss = self.evaluate()
                    self._record(metrics, step=done, eval_loss=eval_loss, eval_perplexity=_ppl(eval_loss))
                if done % c.save_every == 0 or done == c.max_steps:
                    self._save(done, tokens=tokens, seconds=seconds, train_loss=train_loss)
        if eval_loss is None and self.eval is not None:  # resumed a run that had already finished
            eval_loss = self.evaluate()
        if d.is_main:
            plot_losses(metrics, c.out_dir / "loss.png")
        distributed.barrier()
        return TrainResult(
            steps=c.max_steps,
            tokens=tokens,
            train_loss=train_loss,
            eval_loss=eval_loss,
            eval_perplexity=None if eval_loss is None else _ppl(eval_loss),
            seconds=state["seconds"] + time.perf_counter() - began,
        )

    def _layout(self) -> tuple[int, int, int]:
        """What the data order depends on besides the step."""
        return (self.dist.world_size, self.config.batch_size, self.config.grad_accum)

    def _record(self, metrics: Path, **record: float) -> None:
        if self.dist.is_main:
            _append(metrics, record)

    def _save(self, step: int, **counters: float) -> None:
        counters["layout"] = list(self._layout())
        path = checkpoint.save(
            self.config.out_dir, step, self.model, self.optimizer, self.scheduler, counters, self.dist.is_main
        )
        if path is not None and self.on_save is not None:
            self.on_save(path)

    def _step(self, step: int) -> tuple[float, int, float]:
        """One optimizer step over grad_accum micro-batches on every rank; returns the global mean
        loss, the global number of counted tokens, and the gradient norm before clipping."""
        c, d = self.config, self.dist
        loss_sum = torch.zeros((), device=d.device)
        counted = 0
        for micro in range(c.grad_accum):
            index = (step * c.grad_accum + micro) * d.world_size + d.rank
            batch = _to(self.train.batch(index, c.batch_size), d.device)
            with distributed.no_sync(self.wrapped, sync=micro == c.grad_accum - 1):
                with self._autocast():
                    loss, count = self.loss_fn(self.wrapped, batch)
                (loss * count).backward()
            loss_sum += loss.detach().float() * count
            counted += count
        total_loss, total_count = distributed.all_reduce_sum([loss_sum.item(), counted], d.device)
        scale = d.world_size / max(total_count, 1)
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(scale)
        max_norm = c.max_grad_norm if c.max_grad_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total_loss / max(total_count, 1), int(total_count), float(norm)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over eval_batches held-out micro-batches per rank (at most about one pass)."""
        c, d = self.config, self.dist
        assert self.eval is not None
        batches = min(c.eval_batches, math.ceil(self.eval.num_examples / (c.batch_size * d.world_size)))
        self.wrapped.eval()
        loss_sum, counted = 0.0, 0
        for i in range(batches):
            batch = _to(self.eval.batch(i * d.world_size + d.rank, c.batch_size), d.device)
            with self._autocast():
                loss, count = self.loss_fn(self.wrapped, batch)
            loss_sum += loss.item() * count
            counted += count
        self.wrapped.train()
        total_loss, total_count = distributed.all_reduce_sum([loss_sum, counted], d.device)
        return total_loss / max(total_count, 1)

    def full_state_dict(self) -> dict[str, Tensor]:
        """The whole model's weights on CPU, on rank 0 (gathered from the shards under FSDP; every
        rank must call it). Empty on other ranks."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.model, options=options)

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.autocast_dtype)


def plot_losses(metrics: Path, png: Path) -> None:
    """The loss curve (train and eval against step) from metrics.jsonl, resumed segments included."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend switch
    from matplotlib.figure import Figure

    records = _read_records(metrics)
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, label in (("loss", "train"), ("eval_loss", "eval")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if key == "eval_loss" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def _read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _keep_records(path: Path, until_step: int) -> None:
    """Drop the records a killed run wrote after the checkpoint it resumes from, so that a resumed
    run's metrics.jsonl reads as one uninterrupted run."""
    kept = [r for r in _read_records(path) if r["step"] <= until_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # exp overflows a float past ~709


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


def _console() -> Console:
    return Console(stderr=True)


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[rate]} tok/s"),
        TimeRemainingColumn(),
        console=_console(),
        disable=not enabled,
    )
