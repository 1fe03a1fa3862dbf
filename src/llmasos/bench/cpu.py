"""`llmasos bench`: the CPU workloads of BENCHMARKS.md (C1-C4), LLMasOS against its peers.

A figure means something only next to a peer measured in the same run on the same machine, so
every system runs here, one after the other, each in a fresh process of its own (bench/isolate.py)
so that one native library (llama.cpp, torch, LLMasOS's kernels) can neither crash nor slow
another: C1-C3 in one process per system (torch on every core, each system warmed up once before
it is timed), C4 in fresh processes per start. This process builds the workload once, with the
model's tokenizer, and sends every system the same token ids; a system whose process crashes,
fails or runs past its time gets a row that says so, and the other rows still print. Every system
runs greedy and never stops early (ignore_eos / min_new_tokens). Definitions:

- C1 decode: (n - 1) / (time of token n - time of token 1) over n = 128 new tokens: prefill
  excluded. Best of 3.
- C2 prompt: prompt tokens / time to first token, max_tokens=1, on a prompt no cache has seen.
  Best of 3 (three different prompts).
- C3 concurrency: generated tokens / wall time of the whole batch of 16 (prefills included).
- C4 cold start: wall time of a fresh process that loads the model and generates 1 token, an
  upper bound on "process start to first generated token".
- C4w warm start: the same `llmasos run` with `llmasos serve MODEL` already running and warm: the
  process asks the daemon (LLMasOS only; its goal is under 0.5 s).
- C5 speculative: input-grounded decoding with and without prompt-lookup drafts, beside llama.cpp's
  own lookup decoding (bench/speculative.py says how).

The speed-up column is LLMasOS over the peer of that row (> 1: LLMasOS is faster): the ratio of
the figures for rates (tok/s), the inverse ratio for times (s). Benchmarks are commands, never
tests: nothing here passes or fails on a number.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from llmasos.bench.common import Row, add_speedups, machine_facts, print_table, progress, to_markdown
from llmasos.bench.isolate import describe_exit, last_lines, load_object, run_isolated
from llmasos.config import SPECULATIVE_TOKENS
from llmasos.errors import LLMasOSError

WORKLOADS = ("C1", "C2", "C3", "C4", "C4W", "C5")
LABELS = {
    "C1": "C1 decode",
    "C2": "C2 prompt",
    "C3": "C3 concurrency",
    "C4": "C4 cold start",
    "C4W": "C4w warm start",
    "C5": "C5 speculative",
}
# The CPU workloads, on any machine; and no daemon (port 9 has no listener), so that a cold start of
# `llmasos run` is never answered by a server that happens to run here.
CPU_ONLY = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "LLMASOS_HOST": "127.0.0.1:9"}
# The systems, by the name the table gives them (each class's `name`), as "module:class" paths that
# their own process imports; run_bench takes another mapping (a test's crashing system, say).
SYSTEMS = {
    "LLMasOS": "llmasos.bench.cpu:LLMasOSSystem",
    "transformers": "llmasos.bench.cpu:TransformersSystem",
    "llama.cpp": "llmasos.bench.cpu:LlamaCppSystem",
}
SYSTEM_TIMEOUT_S = 3600.0  # for one system's C1-C3 or one cold start; past it, its row says so
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


@dataclass
class Workload:
    """What every system gets, made once in the parent with the model's tokenizer and sent to each
    system's process as JSON: the same model and the same token ids for all."""

    model: str  # the store's name (LLMasOS loads it by name)
    model_dir: str  # its folder in the store (the peers load its files)
    activation_bits: int  # LLMasOS's block kernels
    workloads: list[str]  # those of C1-C3 to run
    warmup: list[int]  # a short chat prompt, decoded once, untimed
    chat: list[int]  # C1's prompt
    long_prompts: list[list[int]]  # C2's, one per repeat
    batch: list[list[int]]  # C3's


# ---- the systems: the same three calls on each ---------------------------------------------------
# Each is built from the Workload in its own process. decode(ids, n) -> (tokens, time of the first,
# time of the last); prefill(ids) -> seconds to the first token; batch(prompts, n) -> (generated
# tokens, wall seconds), or None if it cannot batch.


def _torch_on_every_core() -> None:
    """In the torch systems' processes (llama.cpp's runs without torch loaded), and in the parent,
    whose facts report the thread count."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)


class LLMasOSSystem:
    name = "LLMasOS"

    def __init__(self, workload: Workload):
        from llmasos import LLM

        _torch_on_every_core()
        self.llm = LLM(workload.model, device="cpu", activation_bits=workload.activation_bits)

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

    def __init__(self, workload: Workload):
        import torch
        from transformers.utils import logging

        from llmasos.models.loader import transformers_causal_lm

        _torch_on_every_core()
        logging.set_verbosity_error()
        logging.disable_progress_bar()
        self.torch = torch
        self.model = transformers_causal_lm(Path(workload.model_dir), torch.float32).eval()
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

    def __init__(self, workload: Workload):
        from llama_cpp import Llama

        gguf = Path(workload.model_dir) / "model.gguf"
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


def measure_system(payload: dict) -> Iterator[dict]:
    """C1-C3 of one system, in its own process (run_isolated's target): build the system that
    payload["system"] names from payload["workload"], warm it up once, and yield each row as soon as
    it is measured, so that the rows finished before a crash still reach the table."""
    workload = Workload(**payload["workload"])
    system = load_object(payload["system"])(workload)
    progress.log(f"{system.name}: warm-up")
    system.decode(workload.warmup, 16)  # untimed
    single = None
    if "C1" in workload.workloads or "C3" in workload.workloads:
        progress.log(f"{system.name}: C1 decode")
        single = c1_decode(system, workload.chat)
        if "C1" in workload.workloads:
            yield asdict(single)
    if "C2" in workload.workloads:
        progress.log(f"{system.name}: C2 prompt")
        yield asdict(c2_prompt(system, workload.long_prompts))
    if "C3" in workload.workloads:
        progress.log(f"{system.name}: C3 concurrency")
        yield from map(asdict, c3_concurrency(system, workload.batch, single))


def measure_in_processes(
    systems: dict[str, str], workload: Workload, timeout: float
) -> tuple[list[Row], list[str]]:
    """C1-C3 of each system (name -> "module:class") in a process of its own, one after the other.
    A process that dies keeps the rows it finished; every workload it did not finish gets a row
    without a figure that says how it died, and a note gets its last output."""
    rows, notes = [], []
    for name, spec in systems.items():
        progress.log(f"{name}: C1-C3 in a process of its own")
        payload = {"system": spec, "workload": asdict(workload)}
        run = run_isolated(f"{__name__}:measure_system", payload, timeout)
        finished = [Row(**result) for result in run.results]
        rows += finished
        if run.failure is not None:
            done = {row.workload for row in finished}
            lost = [LABELS[w] for w in workload.workloads if LABELS[w] not in done]
            rows += [Row(label, name, None, "tok/s", run.failure) for label in lost]
            notes.append(f"{name}: {run.failure}; its last output: {run.last_lines()}")
            progress.log(f"{name}: {run.failure}")
    return rows, notes


def c4_cold_start(name: str, workload: Workload, chat_hi: str, timeout: float) -> tuple[Row, str | None]:
    """A fresh process to 1 generated token, timed whole; run once untimed first so that every
    system starts with its files in the page cache. The transformers peer gets the chat prompt as
    text (`chat_hi`), because the tokenizer it builds from the GGUF has no chat template. A start
    that crashes, fails or runs past `timeout` gives a row without a figure and a note of why."""
    model, model_dir = workload.model, Path(workload.model_dir)
    gguf = model_dir / "model.gguf"
    gguf_name = gguf.name if gguf.exists() else ""
    if name == "LLMasOS":
        launcher = "from llmasos.cli import main; main()"
        command = [sys.executable, "-c", launcher, "run", model, "Hi", "--max-tokens", "1"]
        command += ["--activation-bits", str(workload.activation_bits)]
        note = f'`llmasos run {model} "Hi" --max-tokens 1`'
    elif name == "transformers":
        command = [sys.executable, "-c", TRANSFORMERS_COLD, str(model_dir), gguf_name, chat_hi]
        note = f"from_pretrained(gguf_file={gguf_name!r}) + generate 1"
    else:
        command = [sys.executable, "-c", LLAMA_CPP_COLD, str(gguf)]
        note = "Llama(model.gguf) + 1 chat token"
    return _timed_start("C4", name, command, CPU_ONLY, timeout, note)


def c4w_warm_start(workload: Workload, timeout: float) -> tuple[Row, str | None]:
    """C4 through the resident daemon: `llmasos serve MODEL` started and warmed first, then a fresh
    `llmasos run` process that finds it at LLMASOS_HOST and asks it (no model load, no torch)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "llmasos", "serve", workload.model, "--port", str(port)]
    command += ["--activation-bits", str(workload.activation_bits)]
    server = subprocess.Popen(
        command, env=CPU_ONLY, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    env = {**CPU_ONLY, "LLMASOS_HOST": f"127.0.0.1:{port}"}
    try:
        deadline = time.monotonic() + timeout
        while server.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            failure = describe_exit(server.returncode) if server.poll() is not None else "never ready"
            return Row(LABELS["C4W"], "LLMasOS", None, "s", failure), f"LLMasOS C4w: the server {failure}"
        command = [sys.executable, "-m", "llmasos", "run", workload.model, "Hi", "--max-tokens", "1", "-v"]
        note = f'`llmasos run {workload.model} "Hi" --max-tokens 1` with `llmasos serve` warm'
        return _timed_start("C4W", "LLMasOS", command, env, timeout, note, must_say="on the server at")
    finally:
        server.terminate()
        server.wait(timeout=60)


def _timed_start(
    workload: str, name: str, command: list[str], env: dict, timeout: float, note: str, must_say: str = ""
) -> tuple[Row, str | None]:
    """The wall time of `command` as a fresh process, run once untimed first so that every system
    starts with its files in the page cache; a start that crashes, fails, runs past `timeout` or does
    not say `must_say` on stderr gives a row without a figure and a note of why."""

    def start_once() -> tuple[float, str | None, str]:
        start = time.perf_counter()
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            output = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
            return timeout, f"timed out after {timeout:g} s", output or ""
        failure = describe_exit(done.returncode)
        if failure is None and must_say not in done.stderr:
            failure = f"did not say {must_say!r}"
        return time.perf_counter() - start, failure, done.stderr

    for _ in range(2):  # the first one untimed
        seconds, failure, output = start_once()
        if failure is not None:
            why = f"{name} {workload}: {failure}; its last output: {last_lines(output.splitlines())}"
            return Row(LABELS[workload], name, None, "s", failure), why
    return Row(LABELS[workload], name, seconds, "s", note + "; whole process (upper bound)"), None


# ---- the run -------------------------------------------------------------------------------------


def build_workload(
    model: str, model_dir: Path, workloads: list[str], activation_bits: int
) -> tuple[Workload, str]:
    """The token ids of C1-C3, with the model's tokenizer, and C4's chat prompt as text."""
    from llmasos.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(model_dir)

    def chat(question: str) -> list[int]:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
        return tokenizer.encode(tokenizer.apply_chat_template(messages))

    chat_hi = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])  # what `llmasos run` sends
    long_prompts = [
        tokenizer.encode(f"Notes of lighthouse keeper number {i}. " + PARAGRAPH * 12)[:LONG_PROMPT_TOKENS]
        for i in range(REPEATS)
    ]
    workload = Workload(
        model=model,
        model_dir=str(model_dir),
        activation_bits=activation_bits,
        workloads=[w for w in workloads if w in ("C1", "C2", "C3")],
        warmup=chat("Say hello."),
        chat=chat(QUESTIONS[0]),
        long_prompts=long_prompts,
        batch=[chat(q) for q in QUESTIONS[:CONCURRENCY]],
    )
    return workload, chat_hi


def run_bench(
    model: str,
    workloads: list[str],
    peers: list[str],
    output: Path | None = None,
    activation_bits: int = 16,
    systems: dict[str, str] = SYSTEMS,
    timeout: float = SYSTEM_TIMEOUT_S,
    num_speculative_tokens: int = SPECULATIVE_TOKENS["ngram"],
) -> list[Row]:
    """Measure, print one table, and write it as Markdown to `output` if given. `systems` maps each
    name to the "module:class" its process builds (SYSTEMS; a test adds one that crashes)."""
    from llmasos.store import ModelStore

    workloads = [w.strip().upper() for w in workloads if w.strip()]
    peers = [p.strip().lower() for p in peers if p.strip()]
    known_peers = [name for name in systems if name != "LLMasOS"]
    for value, known, what in ((workloads, WORKLOADS, "workload"), (peers, known_peers, "peer")):
        if unknown := [v for v in value if v not in known]:
            raise LLMasOSError(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(known)}")
    missing = [p for p in peers if p == "llama.cpp" and importlib.util.find_spec("llama_cpp") is None]
    peers = [p for p in peers if p not in missing]
    _torch_on_every_core()  # as the torch systems' processes do: the facts report the thread count

    model_dir = ModelStore().resolve(model)
    workload, chat_hi = build_workload(model, model_dir, workloads, activation_bits)
    names = ["LLMasOS", *peers]
    rows: list[Row] = []
    notes = [
        f"LLMasOS: {activation_bits}-bit activations in the block kernels",
        "each system in a process of its own",
    ]
    notes += [f"{p}: not installed (pip install llama-cpp-python), skipped" for p in missing]
    if workload.workloads:
        measured, failures = measure_in_processes({n: systems[n] for n in names}, workload, timeout)
        rows += measured
        notes += failures
    if "C4" in workloads:
        for name in names:
            progress.log(f"{name}: C4 cold start")
            row, failure = c4_cold_start(name, workload, chat_hi, timeout)
            rows.append(row)
            notes += [failure] if failure else []
    if "C4W" in workloads:
        progress.log("LLMasOS: C4w warm start through llmasos serve")
        row, failure = c4w_warm_start(workload, timeout)
        rows.append(row)
        notes += [failure] if failure else []
    if "C5" in workloads:
        from llmasos.bench import speculative

        c5 = speculative.build_workload(model, model_dir, activation_bits, num_speculative_tokens)
        measured, c5_notes = speculative.run_c5(c5, peers, timeout)
        rows += measured
        notes += c5_notes

    rows.sort(key=lambda r: WORKLOADS.index(r.workload[:2]))  # stable: LLMasOS first in each workload
    add_speedups(rows)
    facts = machine_facts()
    print_table(rows, model, facts, notes)
    if output is not None:
        output.write_text(to_markdown(rows, model, facts, notes))
        progress.log(f"wrote {output}")
    return rows
