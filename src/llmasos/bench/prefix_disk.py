"""`llmasos bench prefix-disk`: time to first token of a request whose long prefix was computed before a
restart (kernel/disk_cache.py), against the same request on a cold engine.

Each round draws a fresh prefix of `prefix_tokens` random token ids and runs three processes, each a new
engine (so nothing is in memory that the round's earlier ones computed):

- cold: no disk cache; the request computes its whole prompt;
- cold, writing: the disk cache on, over an empty folder; the same cost plus queuing the blocks for disk
  (they are written in the background and at exit); this is the process that a restart follows;
- after restart: the disk cache on, over what "cold, writing" left; the prompt is the prefix and another
  question, so only the prefix's blocks can come from disk.

Every process first runs a short warm-up request (no prefix), so first-step costs (memory first touched,
kernels built) count in none of the figures. Figure: TTFT (the request queued to its first token), the
median over the rounds; the speed-up is the cold TTFT over each row's.
"""

from __future__ import annotations

import random
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path

from llmasos.bench.common import Row, progress, report
from llmasos.bench.isolate import run_isolated
from llmasos.errors import LLMasOSError

QUESTION_TOKENS = 16  # each request's own tail after the shared prefix
SYSTEMS = ("cold", "cold, writing the disk cache", "after restart, disk cache")


def measure(payload: dict) -> Iterator[dict]:
    """In a fresh process: load the model, warm up, then time one request (`run_isolated`'s target)."""
    import time

    from llmasos.api import LLM
    from llmasos.sampling_params import SamplingParams

    started = time.monotonic()
    llm = LLM(payload["model"], kv_disk_cache_gb=payload["disk_gb"], kv_disk_cache_dir=payload["disk_dir"])
    load_s = time.monotonic() - started
    one = SamplingParams(temperature=0, max_tokens=1)
    llm.generate([payload["warmup"]], one)
    out = llm.generate([payload["prompt"]], one)[0]
    stats = llm.engine.stats()
    yield {
        "ttft_s": out.metrics.first_token_time - out.metrics.arrival_time,
        "cached_tokens": out.num_cached_tokens,
        "disk_hit_tokens": stats.prefix_disk_hit_tokens,
        "load_s": load_s,
    }


def run_prefix_disk_bench(model: str, prefix_tokens: int, rounds: int, output: Path | None) -> list[Row]:
    from llmasos.store import ModelStore
    from llmasos.tokenizer import Tokenizer

    vocab = Tokenizer.from_dir(ModelStore().resolve(model)).vocab_size
    results: dict[str, list[dict]] = {system: [] for system in SYSTEMS}
    for r in range(rounds):
        rng = random.Random(r)
        prefix = [rng.randrange(100, vocab) for _ in range(prefix_tokens)]
        warmup = [rng.randrange(100, vocab) for _ in range(8)]
        with tempfile.TemporaryDirectory(prefix="llmasos-kv-") as folder:
            for system in SYSTEMS:
                disk = system != "cold"
                question = [rng.randrange(100, vocab) for _ in range(QUESTION_TOKENS)]
                progress.print(f"round {r + 1}/{rounds}: {system}")
                payload = {
                    "model": model,
                    "prompt": prefix + question,
                    "warmup": warmup,
                    "disk_gb": 4.0 if disk else None,
                    "disk_dir": folder if disk else None,
                }
                child = run_isolated(f"{__name__}:measure", payload, timeout=1800)
                if child.failure or not child.results:
                    raise LLMasOSError(f"the {system} process {child.failure or 'gave no result'}: "
                                       f"{child.last_lines()}")  # fmt: skip
                results[system].append(child.results[0])
    cold = statistics.median(m["ttft_s"] for m in results["cold"])
    rows = []
    for system in SYSTEMS:
        runs = results[system]
        ttft = statistics.median(m["ttft_s"] for m in runs)
        last = runs[-1]
        note = (
            f"prompt {prefix_tokens + QUESTION_TOKENS} tokens, {last['cached_tokens']} cached "
            f"({last['disk_hit_tokens']} from disk); model load {last['load_s']:.1f} s"
        )
        rows.append(Row(f"TTFT, {prefix_tokens}-token prefix", system, ttft, "s", note, cold / ttft))
    report(rows, model, [f"median of {rounds} rounds; speed-up: the cold TTFT over the row's"], output)
    return rows
