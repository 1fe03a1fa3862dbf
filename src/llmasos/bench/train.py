"""`llmasos bench train`: pretraining throughput and MFU of LLMasOS's Trainer beside transformers'.

The workload (issue 5): a GPT-2-small-sized Llama (12 layers, d_model 768, 12 heads, d_ff 2048,
vocab 32000, tied embeddings: 109.5M parameters; `llmasos pretrain`'s default model, but with full
multi-head attention where that has 4 KV heads) trained from random init on random tokens, batch
32 x 1024, bf16 autocast over fp32 weights on CUDA (fp32 on CPU), AdamW, no gradient accumulation.
Random tokens cost the same compute as text and need no download (the GPU machine has no network).

Both systems run one after the other, each in a fresh process of its own (bench/isolate.py: one
cannot crash the other or leave it a fragmented CUDA allocator; a process that dies gives a row
that says so), on the same model config, initial weights, random tokens (made from the same seed
in each process), batch, sequence length, precision, optimizer and hyperparameters: first
LLMasOS's Trainer, then a plain transformers `Trainer` (report_to none, no saving, no eval). Each
runs `warmup_steps` untimed steps, then `steps` timed ones; the clock is read after
torch.cuda.synchronize() on both ends. tokens/s = steps x batch x seq_len / those seconds (input
tokens, the same for both).

MFU follows PaLM's appendix B: model FLOPs per token = 6 N + 12 L d T, with N the parameters
(the tied embedding counted once: it is the output head's matmul; the input lookup costs no
FLOPs), L layers, d = d_model = heads x head size, T = seq_len; the attention term counts the
whole T x T score matrix, as PaLM does, although a causal kernel computes about half of it. MFU =
FLOPs per token x tokens/s / the device's peak dense bf16 FLOP/s (PEAK_BF16_TFLOPS, or
--peak-tflops). Goal: MFU >= 40% and >= 1.5x the transformers Trainer's tokens/s.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from llmasos.bench.common import Row, progress, report
from llmasos.bench.isolate import run_isolated
from llmasos.errors import LLMasOSError
from llmasos.train.pretrain import check_attention_shape

DEVICES = ("auto", "cuda", "cpu")
# Peak dense (no sparsity) bf16 tensor-core TFLOP/s by a substring of torch's device name, the first
# match winning: "NVIDIA H100 80GB HBM3" is the SXM part.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
)  # fmt: skip
GOAL_MFU = 40.0  # percent
GOAL_SPEEDUP = 1.5  # LLMasOS tokens/s over the transformers Trainer's
OURS, PEER = "LLMasOS Trainer", "transformers Trainer"
SYSTEM_TIMEOUT_S = 3600.0  # for one system's run; past it, its row says so


@dataclass
class TrainBenchConfig:
    device: str = "auto"  # auto: CUDA when there is one, as the Trainer itself chooses
    n_layers: int = 12
    d_model: int = 768
    n_heads: int = 12
    n_kv_heads: int | None = None  # None: n_heads (multi-head attention, as GPT-2)
    d_ff: int = 2048
    vocab_size: int = 32000
    seq_len: int = 1024
    batch_size: int = 32
    steps: int = 50
    warmup_steps: int = 5
    lr: float = 3e-4
    peak_tflops: float | None = None  # None: looked up by device name (PEAK_BF16_TFLOPS)
    seed: int = 0
    output: Path | None = None

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise LLMasOSError(f"device must be one of {', '.join(DEVICES)}, got '{self.device}'")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        counts = ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "vocab_size", "seq_len")
        for name in (*counts, "batch_size", "steps"):
            if getattr(self, name) < 1:
                raise LLMasOSError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup_steps < 1:
            raise LLMasOSError("warmup_steps must be at least 1: the first step pays for lazy start-up")
        check_attention_shape(self.d_model, self.n_heads, self.n_kv_heads)
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise LLMasOSError(f"peak_tflops must be positive, got {self.peak_tflops}")


def llama_config(config: TrainBenchConfig):
    """The one model both systems train; SDPA attention (flash kernels on CUDA) for both."""
    from llmasos.train.pretrain import llama_config as shaped

    return shaped(config, vocab_size=config.vocab_size, tie_word_embeddings=True, attn_implementation="sdpa")


def flops_per_token(n_params: int, config: TrainBenchConfig) -> int:
    """PaLM appendix B: 6 N (forward and backward of every weight matmul) + 12 L d T (attention
    scores and their weighted sum, forward and backward, over the full T x T matrix)."""
    return 6 * n_params + 12 * config.n_layers * config.d_model * config.seq_len


def resolve_device(name: str):
    """The device the Trainer will train on. It has no device option: it takes CUDA whenever
    torch sees one, so a CPU run on a CUDA machine must hide the GPU from the process."""
    import torch

    cuda = torch.cuda.is_available()
    if name == "cuda" and not cuda:
        raise LLMasOSError("--device cuda: torch sees no CUDA device here")
    if name == "cpu" and cuda:
        raise LLMasOSError(
            "--device cpu: LLMasOS's Trainer trains on CUDA whenever there is one; "
            "run with CUDA_VISIBLE_DEVICES= to measure the CPU"
        )
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def peak_tflops(config: TrainBenchConfig, device) -> tuple[float | None, str]:
    """The peak the MFU is taken against and where it came from; None when unknown (CPUs, GPUs
    not in the table) and not given."""
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if config.peak_tflops is not None:
        return config.peak_tflops, f"{name}, peak {config.peak_tflops:g} TFLOP/s (--peak-tflops)"
    if device.type == "cuda":
        for key, tflops in PEAK_BF16_TFLOPS:
            if key in name:
                return tflops, f"{name}, peak dense bf16 {tflops:g} TFLOP/s"
    return None, f"{name}; MFU n/a: peak unknown, pass --peak-tflops"


class RandomTokens:
    """A BatchSource of fixed random rows that also clocks the loop. The Trainer has no step
    callback, but reading a batch is the first thing each of its steps does (with grad_accum 1 and
    one process, batch index = step), so the clock is read there, after a synchronize: at index
    `start` (warm-up done) and at index `stop` (the timed steps done)."""

    def __init__(self, rows, start: int, stop: int, device):
        self.rows, self.start, self.stop, self.device = rows, start, stop, device
        self.num_examples = len(rows)
        self.clock: dict[int, float] = {}

    def batch(self, index: int, batch_size: int) -> dict:
        import torch

        if index in (self.start, self.stop):
            _synchronize(self.device)
            self.clock[index] = time.perf_counter()
        picks = torch.arange(index * batch_size, (index + 1) * batch_size) % self.num_examples
        rows = self.rows[picks]
        return {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}  # no attention_mask: plain causal

    @property
    def seconds(self) -> float:
        return self.clock[self.stop] - self.clock[self.start]


def time_llmasos(config: TrainBenchConfig, rows, device, out_dir: Path) -> float:
    """Seconds of the timed steps of LLMasOS's Trainer, used as `llmasos pretrain` uses it. It runs
    one step past them because it always checkpoints after its last step (outside the clock)."""
    import torch
    from transformers import LlamaForCausalLM

    from llmasos.train.trainer import Trainer

    train_config = _train_config(config, device, out_dir)
    data = RandomTokens(rows, config.warmup_steps, config.warmup_steps + config.steps, device)
    torch.manual_seed(config.seed)
    trainer = Trainer(LlamaForCausalLM(llama_config(config)), data, None, train_config)
    trainer.fit()
    return data.seconds


def time_transformers(config: TrainBenchConfig, rows, device, out_dir: Path) -> float:
    """Seconds of the timed steps of a plain transformers Trainer with the same settings, clocked by
    a callback at the end of optimizer steps `warmup_steps` and `warmup_steps + steps`."""
    import torch
    from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging

    ours = _train_config(config, device, out_dir)
    start, stop = config.warmup_steps, config.warmup_steps + config.steps
    clock: dict[int, float] = {}

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (start, stop):
                _synchronize(device)
                clock[state.global_step] = time.perf_counter()

    cuda = device.type == "cuda"
    args = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=stop,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=ours.lr,
        weight_decay=ours.weight_decay,
        adam_beta1=ours.beta1,
        adam_beta2=ours.beta2,
        max_grad_norm=ours.max_grad_norm,
        lr_scheduler_type="cosine",
        warmup_steps=ours.warmup_steps,
        optim="adamw_torch_fused" if cuda else "adamw_torch",  # as ours: fused on CUDA only
        bf16=cuda,
        use_cpu=not cuda,
        seed=config.seed,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
    )
    # the same input rows as ours; labels = inputs because the model shifts them itself
    dataset = [{"input_ids": row[:-1], "labels": row[:-1]} for row in rows]
    logging.set_verbosity_error()
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(llama_config(config))
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[StepClock()])
    trainer.remove_callback(PrinterCallback)  # it prints the final metrics dict to stdout
    trainer.train()
    return clock[stop] - clock[start]


def _train_config(config: TrainBenchConfig, device, out_dir: Path):
    """LLMasOS's TrainConfig for the run: defaults for every hyperparameter the bench does not set,
    no evaluation, and no checkpoint before the one the Trainer always writes after its last step."""
    from llmasos.train.config import TrainConfig

    max_steps = config.warmup_steps + config.steps + 1
    return TrainConfig(
        out_dir=out_dir,
        max_steps=max_steps,
        batch_size=config.batch_size,
        grad_accum=1,
        lr=config.lr,
        warmup_steps=config.warmup_steps,
        eval_batches=0,
        save_every=max_steps + 1,
        seed=config.seed,
        precision="bf16" if device.type == "cuda" else "fp32",
        distributed="none",
    )


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_rows(config: TrainBenchConfig):
    """The token rows of a run: its warm-up and timed steps, plus the extra step ours runs, each on
    rows of its own. Made from the seed, so every system's process trains on the same tokens."""
    import torch

    generator = torch.Generator().manual_seed(config.seed)
    shape = ((config.warmup_steps + config.steps + 1) * config.batch_size, config.seq_len + 1)
    return torch.randint(0, config.vocab_size, shape, generator=generator)


def time_in_process(payload: dict) -> Iterator[dict]:
    """One system's timed steps, in a process of its own (run_isolated's target)."""
    config = TrainBenchConfig(**payload["config"])
    timer = time_llmasos if payload["system"] == OURS else time_transformers
    with tempfile.TemporaryDirectory(prefix="llmasos-bench-train-") as tmp:
        yield {"seconds": timer(config, random_rows(config), resolve_device(config.device), Path(tmp))}


def run_train_bench(config: TrainBenchConfig) -> list[Row]:
    """Measure both systems, print one table, and write it as Markdown to config.output if given."""
    import torch
    from transformers import LlamaForCausalLM

    device = resolve_device(config.device)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in LlamaForCausalLM(llama_config(config)).parameters())
    flops = flops_per_token(n_params, config)
    peak, peak_note = peak_tflops(config, device)

    seconds, failed, failures = {}, {}, []
    for name in (OURS, PEER):
        progress.log(f"{name}: {config.warmup_steps} warm-up + {config.steps} timed steps on {device}")
        payload = {"system": name, "config": {**asdict(config), "output": None}}
        run = run_isolated(f"{__name__}:time_in_process", payload, SYSTEM_TIMEOUT_S)
        if run.results:
            seconds[name] = run.results[0]["seconds"]
        if run.failure is not None:
            failed[name] = run.failure
            failures.append(f"{name}: {run.failure}; its last output: {run.last_lines()}")

    tokens = config.steps * config.batch_size * config.seq_len
    rate = {name: tokens / s for name, s in seconds.items()}
    speedup = rate[OURS] / rate[PEER] if len(rate) == 2 else None
    mfu = {name: 100 * flops * r / (peak * 1e12) for name, r in rate.items()} if peak else {}
    done = {name: f"{config.steps} timed steps: {s:.2f} s" for name, s in seconds.items()}
    done |= {name: failed[name] for name in (OURS, PEER) if name not in seconds}
    rows_out = [
        Row("pretrain tok/s", OURS, rate.get(OURS), "tok/s", done[OURS]),
        Row("pretrain tok/s", PEER, rate.get(PEER), "tok/s", done[PEER], speedup),
    ]
    if peak:
        met = "met" if mfu.get(OURS, 0.0) >= GOAL_MFU else "not met"
        rows_out += [
            Row("pretrain MFU", OURS, mfu.get(OURS), "%", f"goal >= {GOAL_MFU:g}%: {met}"),
            Row("pretrain MFU", PEER, mfu.get(PEER), "%", "", speedup),
        ]
    if speedup is not None:
        goal = f"tok/s; goal >= {GOAL_SPEEDUP:g}x: {'met' if speedup >= GOAL_SPEEDUP else 'not met'}"
        rows_out.append(Row("pretrain speed-up", f"{OURS} / {PEER}", speedup, "x", goal))
    rows_out.append(Row("pretrain FLOPs", "per token", flops / 1e6, "MFLOP/token",
                        f"6N + 12 L d T (PaLM app. B), N = {n_params:,} parameters"))  # fmt: skip

    c = config
    kv = "" if c.n_kv_heads == c.n_heads else f" ({c.n_kv_heads} KV)"
    model = (
        f"Llama {n_params / 1e6:.1f}M ({c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads{kv}, "
        f"d_ff {c.d_ff}, vocab {c.vocab_size}), batch {c.batch_size} x {c.seq_len}"
    )
    cuda = device.type == "cuda"
    notes = [
        peak_note,
        f"both: {'bf16 autocast over fp32 weights' if cuda else 'fp32'}, SDPA attention, "
        f"AdamW{' (fused)' if cuda else ''}, lr {c.lr:g}, grad accum 1, random tokens, "
        f"{c.warmup_steps} warm-up steps{', clock read after torch.cuda.synchronize()' if cuda else ''}",
        *failures,
    ]
    report(rows_out, model, notes, config.output)
    return rows_out
