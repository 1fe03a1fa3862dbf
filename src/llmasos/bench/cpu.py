"""`llmasos bench`: the CPU workloads of BENCHMARKS.md (C1-C4), LLMasOS against its peers.

A figure means something only next to a peer measured in the same run on the same machine, so
every system runs here, one after the other: C1-C3 in this process (torch on every core, each
system warmed up once before it is timed), C4 in fresh subprocesses. All systems get the same
token ids, greedy, and never stop early (ignore_eos / min_new_tokens). Definitions:

- C1 decode: (n - 1) / (time of token n - time of token 1) over n = 128 new tokens: prefill
  excluded. Best of 3.
- C2 prompt: prompt tokens / time to first token, max_tokens=1, on a prompt no cache has seen.
  Best of 3 (three different prompts).
- C3 concurrency: generated tokens / wall time of the whole batch of 16 (prefills included).
- C4 cold start: wall time of a fresh process that loads the model and generates 1 token, an
  upper bound on "process start to first generated token".

The speed-up column is LLMasOS over the peer of that row (> 1: LLMasOS is faster): the ratio of
the figures for rates (tok/s), the inverse ratio for times (s). Benchmarks are commands, never
tests: nothing here passes or fails on a number.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

from llmasos.bench.common import Row, add_speedups, machine_facts, print_table, progress, to_markdown
from llmasos.errors import LLMasOSError

WORKLOADS = ("C1", "C2", "C3", "C4")
PEERS = ("transformers", "llama.cpp")
NEW_TOKENS = 128
CONCURRENCY = 16
LONG_PROMPT_TOKENS = 600
REPEATS = 3  # C1 and C2 report the best of 3 (the machines are shared and noisy); C3, C4 run once
SYSTEM_PROMPT = "You are a helpful assistant."
QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a short poem about the sea and the wind.",
    "Explain in simple words how a rainbow forms.",
    "Give me three tips for learning a new language.",
    "What are the main differences between cats and dogs?",
    "Describe a good breakfast for a busy morning.",
    "Why is the sky blue? Keep it short and clear.",
    "List five fruits that are rich in vitamin C.",
    "How do plants turn sunlight into their food?",
    "Tell me a story about a robot who learns to paint.",
    "What should I pack for a weekend hiking trip?",
    "Explain what a computer program is to a child.",
    "What are some good habits for getting better sleep?",
    "How does a bicycle stay upright when it moves?",
    "Suggest a name for a small coffee shop by the river.",
    "What is the difference between weather and climate?",
]
PARAGRAPH = (
    "The old lighthouse stood on the rocks at the edge of the bay, and every evening the keeper "
    "climbed its narrow stairs to light the lamp. Ships passing in the dark trusted that light to "
    "guide them past the reef, and the people of the village slept better knowing it was there. "
    "In winter the storms came from the north, the waves broke over the walls, and the keeper "
    "wrote in his log the names of the ships he saw and the hours at which they passed. "
)
TRANSFORMERS_COLD = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, gguf, prompt = sys.argv[1], sys.argv[2] or None, sys.argv[3]
tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=1, do_sample=False)
"""
LLAMA_CPP_COLD = """
import os, sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=2048, n_threads=os.cpu_count(), verbose=False)
llm.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=1)
"""

# ---- the systems: the same three calls on each ---------------------------------------------------
# decode(ids, n) -> (tokens, time of the first, time of the last); prefill(ids) -> seconds to the
# first token; batch(prompts, n) -> (generated tokens, wall seconds), or None if it cannot batch.


class LLMasOSSystem:
    name = "LLMasOS"

    def __init__(self, model: str, activation_bits: int):
        from llmasos import LLM

        self.llm = LLM(model, device="cpu", activation_bits=activation_bits)

    def _params(self, n: int):
        from llmasos import SamplingParams

        return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)

    def decode(self, ids: list[int], n: int) -> tuple[int, float, float]:
        out = self.llm.generate([ids], self._params(n))[0]
        return len(out.outputs[0].token_ids), out.metrics.first_token_time, out.metrics.finished_time

    def prefill(self, ids: list[int]) -> float:
        out = self.llm.generate([ids], self._params(1))[0]
        if out.num_cached_tokens:
            raise RuntimeError(f"C2 hit the prefix cache ({out.num_cached_tokens} tokens): not a cold prompt")
        return out.metrics.first_token_time - out.metrics.arrival_time

    def batch(self, prompts: list[list[int]], n: int) -> tuple[int, float]:
        start = time.perf_counter()
        outs = self.llm.generate(prompts, self._params(n))
        return sum(len(o.outputs[0].token_ids) for o in outs), time.perf_counter() - start


class TransformersSystem:
    """Loads the store's converted folder: the same float32 weights that `from_pretrained(dir,
    gguf_file=...)` dequantizes (checked equal), without its 30 s of dequantizing."""

    name = "transformers"

    def __init__(self, model_dir: Path):
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        config = self.model.generation_config
        eos = config.eos_token_id
        self.pad = config.pad_token_id if config.pad_token_id is not None else eos
        self.pad = self.pad[0] if isinstance(self.pad, list) else self.pad

    def _generate(self, input_ids: list[list[int]], n: int, **kwargs):
        with self.torch.inference_mode():
            return self.model.generate(
                self.torch.tensor(input_ids),
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=self.pad,
                **kwargs,
            )

    def decode(self, ids: list[int], n: int) -> tuple[int, float, float]:
        clock = _TokenClock()
        self._generate([ids], n, streamer=clock)
        return len(clock.times), clock.times[0], clock.times[-1]

    def prefill(self, ids: list[int]) -> float:
        start = time.perf_counter()
        self._generate([ids], 1)
        return time.perf_counter() - start

    def batch(self, prompts: list[list[int]], n: int) -> tuple[int, float]:
        """One generate() over the padded batch (left padding, attention mask)."""
        width = max(map(len, prompts))
        ids = [[self.pad] * (width - len(p)) + p for p in prompts]
        mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
        start = time.perf_counter()
        out = self._generate(ids, n, attention_mask=self.torch.tensor(mask))
        return (out.shape[1] - width) * len(prompts), time.perf_counter() - start


class _TokenClock:
    """A generate() streamer that notes when each new token arrives (its first put is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


class LlamaCppSystem:
    name = "llama.cpp"

    def __init__(self, gguf: Path):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=os.cpu_count(), verbose=False)

    def _token_times(self, ids: list[int], n: int) -> list[float]:
        """Greedy; Llama.generate never stops at EOS by itself. reset() so that no earlier prompt's
        KV cache is reused."""
        self.llm.reset()
        times = []
        for _ in self.llm.generate(ids, temp=0.0, top_k=1):
            times.append(time.perf_counter())
            if len(times) == n:
                break
        return times

    def decode(self, ids: list[int], n: int) -> tuple[int, float, float]:
        times = self._token_times(ids, n)
        return len(times), times[0], times[-1]

    def prefill(self, ids: list[int]) -> float:
        start = time.perf_counter()
        return self._token_times(ids, 1)[0] - start

    def batch(self, prompts: list[list[int]], n: int) -> None:
        return None  # llama-cpp-python's Llama serves one sequence at a time


# ---- the workloads -------------------------------------------------------------------------------


def c1_decode(system, ids: list[int]) -> Row:
    rates = []
    for _ in range(REPEATS):
        n, first, last = system.decode(ids, NEW_TOKENS)
        rates.append((n - 1) / (last - first))
    note = f"{len(ids)}-token chat prompt, best of {REPEATS}"
    return Row("C1 decode", system.name, max(rates), "tok/s", note)


def c2_prompt(system, prompts: list[list[int]]) -> Row:
    """One prompt per repeat, each new to every cache."""
    seconds = min(system.prefill(ids) for ids in prompts)
    note = f"{len(prompts[0])} tokens in {seconds:.2f} s, best of {len(prompts)}"
    return Row("C2 prompt", system.name, len(prompts[0]) / seconds, "tok/s", note)


def c3_concurrency(system, prompts: list[list[int]], single: Row | None) -> list[Row]:
    """LLMasOS: one generate() call with all 16. A peer: its single-request rate (its C1 decode
    figure, the baseline of the goal) and, if it can batch, one padded batched generate()."""
    rows = []
    if single is not None and system.name != "LLMasOS":
        label, note = f"{system.name} single-request", "its C1 decode rate"
        rows.append(Row("C3 concurrency", label, single.value, "tok/s", note))
    result = system.batch(prompts, NEW_TOKENS)
    if result is not None:
        tokens, seconds = result
        label = system.name if system.name == "LLMasOS" else f"{system.name} batched"
        note = f"{len(prompts)} x {NEW_TOKENS} tokens in {seconds:.1f} s"
        rows.append(Row("C3 concurrency", label, tokens / seconds, "tok/s", note))
    return rows


def c4_cold_start(name: str, model: str, model_dir: Path, chat_hi: str, activation_bits: int) -> Row:
    """A fresh process to 1 generated token, timed whole; run once untimed first so that every
    system starts with its files in the page cache. The transformers peer gets the chat prompt as
    text (`chat_hi`), because the tokenizer it builds from the GGUF has no chat template."""
    gguf = model_dir / "model.gguf"
    gguf_name = gguf.name if gguf.exists() else ""
    if name == "LLMasOS":
        launcher = "from llmasos.cli import main; main()"
        command = [sys.executable, "-c", launcher, "run", model, "Hi", "--max-tokens", "1"]
        command += ["--activation-bits", str(activation_bits)]
        note = f'`llmasos run {model} "Hi" --max-tokens 1`'
    elif name == "transformers":
        command = [sys.executable, "-c", TRANSFORMERS_COLD, str(model_dir), gguf_name, chat_hi]
        note = f"from_pretrained(gguf_file={gguf_name!r}) + generate 1"
    else:
        command = [sys.executable, "-c", LLAMA_CPP_COLD, str(gguf)]
        note = "Llama(model.gguf) + 1 chat token"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU workload, on any machine

    def wall_seconds() -> float:
        start = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            raise LLMasOSError(f"C4 for {name} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
        return time.perf_counter() - start

    wall_seconds()  # untimed
    return Row("C4 cold start", name, wall_seconds(), "s", note + "; whole process (upper bound)")


# ---- the run -------------------------------------------------------------------------------------


def run_bench(
    model: str, workloads: list[str], peers: list[str], output: Path | None = None, activation_bits: int = 16
) -> list[Row]:
    """Measure, print one table, and write it as Markdown to `output` if given."""
    import torch

    from llmasos.store import ModelStore
    from llmasos.tokenizer import Tokenizer

    workloads = [w.strip().upper() for w in workloads if w.strip()]
    peers = [p.strip().lower() for p in peers if p.strip()]
    for value, known, what in ((workloads, WORKLOADS, "workload"), (peers, PEERS, "peer")):
        if unknown := [v for v in value if v not in known]:
            raise LLMasOSError(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(known)}")
    missing = [p for p in peers if p == "llama.cpp" and importlib.util.find_spec("llama_cpp") is None]
    peers = [p for p in peers if p not in missing]
    torch.set_num_threads(os.cpu_count() or 1)

    model_dir = ModelStore().resolve(model)
    tokenizer = Tokenizer.from_dir(model_dir)

    def chat(question: str) -> list[int]:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
        return tokenizer.encode(tokenizer.apply_chat_template(messages))

    chat_hi = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])  # what `llmasos run` sends
    warmup_ids, chat_ids = chat("Say hello."), chat(QUESTIONS[0])
    batch_ids = [chat(q) for q in QUESTIONS[:CONCURRENCY]]
    long_prompts = [
        tokenizer.encode(f"Notes of lighthouse keeper number {i}. " + PARAGRAPH * 12)[:LONG_PROMPT_TOKENS]
        for i in range(REPEATS)
    ]
    rows: list[Row] = []

    loaders = {
        "LLMasOS": lambda: LLMasOSSystem(model, activation_bits),
        "transformers": lambda: TransformersSystem(model_dir),
        "llama.cpp": lambda: LlamaCppSystem(model_dir / "model.gguf"),
    }
    if {"C1", "C2", "C3"} & set(workloads):
        for name in ["LLMasOS", *peers]:
            progress.log(f"loading {name}")
            system = loaders[name]()
            system.decode(warmup_ids, 16)  # warm-up, untimed
            single = None
            if "C1" in workloads or "C3" in workloads:
                progress.log(f"{name}: C1 decode")
                single = c1_decode(system, chat_ids)
                rows += [single] if "C1" in workloads else []
            if "C2" in workloads:
                progress.log(f"{name}: C2 prompt")
                rows.append(c2_prompt(system, long_prompts))
            if "C3" in workloads:
                progress.log(f"{name}: C3 concurrency")
                rows += c3_concurrency(system, batch_ids, single)
            del system
            gc.collect()
    if "C4" in workloads:
        for name in ["LLMasOS", *peers]:
            progress.log(f"{name}: C4 cold start")
            rows.append(c4_cold_start(name, model, model_dir, chat_hi, activation_bits))

    rows.sort(key=lambda r: WORKLOADS.index(r.workload[:2]))  # stable: LLMasOS first in each workload
    add_speedups(rows)
    facts = machine_facts()
    notes = [f"LLMasOS: {activation_bits}-bit activations in the block kernels"]
    notes += [f"{p}: not installed (pip install llama-cpp-python), skipped" for p in missing]
    print_table(rows, model, facts, notes)
    if output is not None:
        output.write_text(to_markdown(rows, model, facts, notes))
        progress.log(f"wrote {output}")
    return rows
