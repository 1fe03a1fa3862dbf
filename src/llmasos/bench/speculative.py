"""C5 speculative decoding (`llmasos bench --workloads C5`): input-grounded single-stream decoding,
with and without drafts, LLMasOS beside llama.cpp.

Two prompts whose answers repeat their input, where prompt lookup helps: "summarize" (about 600
tokens of prose, the package's own held-out text bench/data/heldout.txt) and "edit" (rename a
function in about 400 tokens of the package's own source, kernel/sampler.py). Both ship with the
package, so a machine without a network has them. Each system decodes NEW_TOKENS greedy tokens of
each prompt, ignoring EOS, in a process of its own (bench/isolate.py): LLMasOS with prompt lookup
(`speculative="ngram"`) and without, llama.cpp (llama-cpp-python) without and with its own prompt
lookup (`LlamaPromptLookupDecoding`, its defaults). Figures:

- decode tok/s = (n - 1) / (time of token n - time of token 1): the prefill excluded, best of
  REPEATS after one untimed run of the same prompt.
- acceptance rate = accepted drafts / drafted tokens, tokens per forward = decoded tokens per
  forward (verify) step of the model. llama.cpp's are counted around its Python binding: its
  forwards are `Llama.eval` calls, its drafts what the lookup returned.
- same output: whether the speculating run's tokens equal the same system's plain run, as greedy
  decoding with exact verification must give.

The speed-up column is LLMasOS with speculation over each row: over "LLMasOS without" it is
speculation's own gain (the goal: 1.8x at batch 1 on 2 cores).
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from llmasos.bench.common import Row, progress
from llmasos.bench.isolate import load_object, run_isolated

NEW_TOKENS = 128
REPEATS = 3
SUMMARIZE_TOKENS = 600  # the prose of the summarize prompt
EDIT_TOKENS = 400  # the code of the edit prompt
HELDOUT = Path(__file__).with_name("data") / "heldout.txt"
CODE = Path(__file__).parents[1] / "kernel" / "sampler.py"
SYSTEMS = {
    "LLMasOS": "llmasos.bench.speculative:LLMasOSNgram",
    "LLMasOS without": "llmasos.bench.speculative:LLMasOSPlain",
    "llama.cpp": "llmasos.bench.speculative:LlamaCppPlain",
    "llama.cpp lookup": "llmasos.bench.speculative:LlamaCppLookup",
}
LLAMA_CPP = ("llama.cpp", "llama.cpp lookup")
PLAIN = {"LLMasOS": "LLMasOS without", "llama.cpp lookup": "llama.cpp"}  # each speculating system's plain one


@dataclass
class C5Workload:
    """What every system gets: the same token ids, made once in the parent with the model's tokenizer."""

    model: str
    model_dir: str
    activation_bits: int
    num_speculative_tokens: int
    prompts: dict[str, list[int]]  # by prompt name: "summarize", "edit"
    new_tokens: int = NEW_TOKENS
    repeats: int = REPEATS


@dataclass
class Decoded:
    """One greedy decode: its tokens, when the first and the last came, and the drafting behind them
    (forwards: the model's forward steps after the first token; zeros without speculation)."""

    tokens: list[int]
    first: float
    last: float
    forwards: int = 0
    draft_tokens: int = 0
    accepted: int = 0


# ---- the systems: decode(ids, n) -> Decoded ------------------------------------------------------


class LLMasOSPlain:
    name = "LLMasOS without"
    speculative: str | None = None

    def __init__(self, workload: C5Workload):
        import torch

        from llmasos import LLM

        torch.set_num_threads(os.cpu_count() or 1)
        self.llm = LLM(
            workload.model,
            device="cpu",
            activation_bits=workload.activation_bits,
            speculative=self.speculative,
            num_speculative_tokens=workload.num_speculative_tokens,
        )

    def decode(self, ids: list[int], n: int) -> Decoded:
        from llmasos import SamplingParams

        before = self.llm.engine.stats().speculative
        out = self.llm.generate([ids], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0]
        after = self.llm.engine.stats().speculative
        times = out.metrics
        decoded = Decoded(out.outputs[0].token_ids, times.first_token_time, times.finished_time)
        if after is not None:
            decoded.forwards = after.num_drafts - before.num_drafts  # verify steps; plain steps below
            decoded.draft_tokens = after.num_draft_tokens - before.num_draft_tokens
            decoded.accepted = after.num_accepted_tokens - before.num_accepted_tokens
            # every token after the first came from a verify step (accepted + 1) or a plain step (1)
            decoded.forwards += len(decoded.tokens) - 1 - decoded.forwards - decoded.accepted
        return decoded


class LLMasOSNgram(LLMasOSPlain):
    name = "LLMasOS"
    speculative = "ngram"


class LlamaCppPlain:
    name = "llama.cpp"

    def __init__(self, workload: C5Workload):
        from llama_cpp import Llama

        self.lookup = self._lookup()
        gguf = Path(workload.model_dir) / "model.gguf"
        # with a draft model it keeps every row's logits, but sizes their array by `logits_all` alone
        # (llama-cpp-python 0.3.36): without it a prompt longer than a batch overflows the array
        lookup = self.lookup is not None
        self.llm = Llama(
            model_path=str(gguf),
            n_ctx=2048,
            n_threads=os.cpu_count(),
            verbose=False,
            draft_model=self.lookup,
            logits_all=lookup,
        )
        self.forwards = 0
        evaluate = self.llm.eval

        def counted_eval(tokens):  # generate() calls eval once per forward step (the prompt's included)
            self.forwards += 1
            return evaluate(tokens)

        self.llm.eval = counted_eval

    def _lookup(self) -> _CountedLookup | None:
        return None

    def decode(self, ids: list[int], n: int) -> Decoded:
        """Greedy; reset() so that no earlier run's KV cache is reused."""
        self.llm.reset()
        tokens, times = [], []
        for token in self.llm.generate(ids, temp=0.0, top_k=1):
            times.append(time.perf_counter())
            tokens.append(token)
            if len(tokens) == 1:  # the prefill's forward is not the decode's; the first drafts come next
                self.forwards = 0
                if self.lookup is not None:
                    self.lookup.drafted = 0
            if len(tokens) == n:
                break
        drafted = self.lookup.drafted if self.lookup is not None else 0
        accepted = len(tokens) - 1 - self.forwards if drafted else 0
        return Decoded(tokens, times[0], times[-1], self.forwards, drafted, accepted)


class LlamaCppLookup(LlamaCppPlain):
    name = "llama.cpp lookup"

    def _lookup(self) -> _CountedLookup:
        return _CountedLookup()


class _CountedLookup:
    """llama-cpp-python's prompt lookup at its defaults, counting the tokens it drafts (its Llama calls
    `draft_model(input_ids)` and verifies what comes back)."""

    def __init__(self):
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        self.lookup = LlamaPromptLookupDecoding()
        self.drafted = 0

    def __call__(self, input_ids, **kwargs):
        drafts = self.lookup(input_ids, **kwargs)
        self.drafted += len(drafts)
        return drafts


# ---- the workload --------------------------------------------------------------------------------


def measure_system(payload: dict) -> Iterator[dict]:
    """Both prompts on one system, in its own process (run_isolated's target): one untimed run of each
    prompt, then the best of `repeats`; yields a row per prompt with the tokens of its last run (the
    parent compares the speculating runs' tokens with the plain runs')."""
    workload = C5Workload(**payload["workload"])
    system = load_object(payload["system"])(workload)
    for prompt, ids in workload.prompts.items():
        progress.log(f"{system.name}: C5 {prompt}")
        system.decode(ids, workload.new_tokens)  # untimed
        runs = [system.decode(ids, workload.new_tokens) for _ in range(workload.repeats)]
        best = max(runs, key=lambda r: (len(r.tokens) - 1) / (r.last - r.first))
        yield {"prompt": prompt, "system": system.name, **asdict(best)}


def build_workload(
    model: str, model_dir: Path, activation_bits: int, num_speculative_tokens: int
) -> C5Workload:
    """The two chat prompts, as the model's tokenizer encodes them."""
    from llmasos.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(model_dir)

    def head(text: str, tokens: int, end: str) -> str:
        """The text's first `tokens` tokens, cut back to the last `end` (a sentence's, a line's)."""
        kept = tokenizer.decode(tokenizer.encode(text)[:tokens])
        return kept[: kept.rfind(end) + len(end)].strip() if end in kept else kept

    def chat(request: str, text: str) -> list[int]:
        messages = [{"role": "user", "content": f"{request}\n\n{text}"}]
        return tokenizer.encode(tokenizer.apply_chat_template(messages))

    prose = head(HELDOUT.read_text(), SUMMARIZE_TOKENS, ". ")
    code = head(CODE.read_text(), EDIT_TOKENS, "\n")
    prompts = {
        "summarize": chat("Summarize this story, keeping its own words where you can.", prose),
        "edit": chat(
            "Rename the function apply_penalties to penalize in this Python file. "
            "Answer with the whole file, changed.",
            code,
        ),
    }
    return C5Workload(model, str(model_dir), activation_bits, num_speculative_tokens, prompts)


def run_c5(
    workload: C5Workload, peers: list[str], timeout: float, systems: dict[str, str] = SYSTEMS
) -> tuple[list[Row], list[str]]:
    """Every system in a process of its own, one after the other; rows per prompt, and notes."""
    names = ["LLMasOS", "LLMasOS without"]
    if "llama.cpp" in peers and importlib.util.find_spec("llama_cpp") is not None:
        names += [n for n in LLAMA_CPP if n in systems]
    results: dict[tuple[str, str], dict] = {}
    rows, notes = [], []
    for name in names:
        progress.log(f"{name}: C5 in a process of its own")
        run = run_isolated(
            f"{__name__}:measure_system", {"system": systems[name], "workload": asdict(workload)}, timeout
        )
        for result in run.results:
            results[result["prompt"], name] = result
        if run.failure is not None:
            notes.append(f"{name} C5: {run.failure}; its last output: {run.last_lines()}")
    for prompt, ids in workload.prompts.items():
        label = f"C5 {prompt}"
        for name in names:
            result = results.get((prompt, name))
            if result is None:
                rows.append(Row(label, name, None, "tok/s", "no figure: see the notes"))
                continue
            plain = PLAIN.get(name)  # None: this system does not speculate
            note = "" if plain is None else _note(result, results.get((prompt, plain)))
            rows.append(Row(label, name, _rate(result), "tok/s", note))
        notes.append(
            f"C5 {prompt}: {len(ids)}-token prompt, {workload.new_tokens} new tokens, greedy, "
            f"best of {workload.repeats}"
        )
    notes.append(
        f"LLMasOS drafts up to {workload.num_speculative_tokens} tokens (--num-speculative-tokens); "
        "llama.cpp: LlamaPromptLookupDecoding() at its defaults"
    )
    return rows, notes


def _rate(result: dict) -> float:
    return (len(result["tokens"]) - 1) / (result["last"] - result["first"])


def _note(result: dict, plain: dict | None) -> str:
    """A speculating system's acceptance, tokens per forward, gain over its plain decode and whether its
    output is its plain run's."""
    decoded, drafted = len(result["tokens"]) - 1, result["draft_tokens"]
    parts = [
        f"acceptance {result['accepted'] / drafted:.2f}" if drafted else "no drafts",
        f"{decoded / max(result['forwards'], 1):.2f} tokens per forward",
    ]
    if plain is not None:
        same = result["tokens"] == plain["tokens"]
        parts += [f"{_rate(result) / _rate(plain):.2f}x its plain decode"]
        parts += ["same output" if same else "OUTPUT DIFFERS from its plain run"]
    return ", ".join(parts)
