"""`llmasos bench draft`: greedy decode at batch 1 with a draft model (speculative decoding,
kernel/draft.py), beside the target alone and the draft alone.

The workload is C1's shape: one chat question at a time, `max_tokens` new tokens, greedy; figure:
(n - 1) / (time of token n - time of token 1) summed over the questions, so prefill is not counted.
Systems, each in a process of its own (bench/isolate.py), each warmed up once first:

- LLMasOS, draft model: the target verifying the draft model's k greedy tokens a step;
- target alone: the same model decoding one token a step;
- draft model alone: what the draft costs as a model of its own (its own answers).

The default pair is the one model there is, as two: the target is SmolLM2 dequantized to float32
(`smollm2-f32`, made once from the GGUF with transformers and put into the store), the draft is the
Q4_1 GGUF itself, run on its integer block kernels: a quantized self-draft, whose drafts the float
model keeps nearly always. The notes say the acceptance rate and whether the answers were the target's
own, token for token. `--threads 1` keeps torch's GEMM of the k + 1 verify rows from waiting on busy
cores (on a shared, loaded machine its threads can make 5 rows cost 10 times one).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from llmasos.bench.common import Row, progress
from llmasos.bench.cpu import QUESTIONS, SYSTEM_PROMPT
from llmasos.bench.isolate import run_isolated
from llmasos.errors import LLMasOSError

WORKLOAD = "decode, batch 1"


def ensure_float_copy(source: str, name: str) -> str:
    """`name` in the store: `source` as float32 safetensors (a GGUF dequantized by transformers), once."""
    import torch

    from llmasos.models.loader import transformers_causal_lm
    from llmasos.store import ModelStore
    from llmasos.train.finetune import TOKENIZER_FILES

    store = ModelStore()
    if store._has(name):
        return name
    progress.print(f"making {name}: {source} as float32")
    source_dir = store.resolve(source)
    model = transformers_causal_lm(source_dir, torch.float32)
    with tempfile.TemporaryDirectory(prefix="llmasos-float-") as folder:
        model.save_pretrained(folder)
        for file in ("generation_config.json", *TOKENIZER_FILES):
            if (source_dir / file).is_file():
                shutil.copy(source_dir / file, Path(folder) / file)
        store.import_path(Path(folder), name, progress=False)
    return name


def measure(payload: dict) -> Iterator[dict]:
    """In a fresh process: load, warm up, then decode each question (`run_isolated`'s target)."""
    import torch

    from llmasos.api import LLM
    from llmasos.sampling_params import SamplingParams

    if payload["threads"] is not None:
        torch.set_num_threads(payload["threads"])
    llm = LLM(payload["model"], device="cpu", **payload["options"])
    params = SamplingParams(temperature=0, max_tokens=payload["max_tokens"], ignore_eos=True)
    llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(temperature=0, max_tokens=8))
    core = llm.engine.core
    drafted_before, accepted_before = core.spec_stats.num_draft_tokens, core.spec_stats.num_accepted_tokens
    tokens, seconds, answers = 0, 0.0, []
    for question in payload["questions"]:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
        out = llm.chat(messages, params)[0]
        tokens += len(out.outputs[0].token_ids) - 1
        seconds += out.metrics.finished_time - out.metrics.first_token_time
        answers.append(out.outputs[0].token_ids)
    yield {
        "tok_s": tokens / seconds,
        "answers": answers,
        "drafted": core.spec_stats.num_draft_tokens - drafted_before,
        "accepted": core.spec_stats.num_accepted_tokens - accepted_before,
        "steps": core.num_steps,
    }


def run_draft_bench(
    target: str, draft: str, k: int, max_tokens: int, questions: int, threads: int | None = None
) -> tuple[list[Row], list[str]]:
    if target == "smollm2-f32":
        ensure_float_copy("smollm2", target)
    systems = {
        "LLMasOS, draft model": (target, {"speculative": "draft", "speculative_model": draft,
                                          "num_speculative_tokens": k}),
        "target alone": (target, {}),
        "draft model alone": (draft, {}),
    }  # fmt: skip
    results = {}
    for system, (model, options) in systems.items():
        progress.print(f"{system}: {model}")
        payload = {"model": model, "options": options, "max_tokens": max_tokens,
                   "questions": QUESTIONS[:questions], "threads": threads}  # fmt: skip
        child = run_isolated(f"{__name__}:measure", payload, timeout=3600)
        if child.failure or not child.results:
            raise LLMasOSError(f"{system} {child.failure or 'gave no result'}: {child.last_lines()}")
        results[system] = child.results[0]
    ours = results["LLMasOS, draft model"]
    same = ours["answers"] == results["target alone"]["answers"]
    rate = ours["accepted"] / ours["drafted"] if ours["drafted"] else 0.0
    rows = [
        Row(WORKLOAD, "LLMasOS, draft model", ours["tok_s"], "tok/s",
            f"target {target}, draft {draft}, k={k}; acceptance {rate:.1%}; answers the target's own: "
            f"{'yes' if same else 'no'}"),
        Row(WORKLOAD, "target alone", results["target alone"]["tok_s"], "tok/s", target),
        Row(WORKLOAD, "draft model alone", results["draft model alone"]["tok_s"], "tok/s", draft),
    ]  # fmt: skip
    for row in rows[1:]:
        row.speedup = ours["tok_s"] / row.value
    notes = [
        f"{questions} chat questions of C1, {max_tokens} new tokens each, greedy; figure: decode tok/s "
        "(time of the first token to the last), over all the questions",
        f"drafted {ours['drafted']} tokens, kept {ours['accepted']}; torch threads: {threads or 'default'}",
    ]
    return rows, notes
