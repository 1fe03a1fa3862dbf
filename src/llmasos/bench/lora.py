"""`llmasos bench lora`: many LoRA adapters in one batch over one base model, beside one merged model.

The workload is C3's shape: 16 requests at once, greedy, a fixed number of new tokens each; figure:
generated tokens / wall seconds of the whole batch (prefills included), the best of a few runs after
a warm-up, and with `rounds` > 1 the best over rounds that run the systems in turn (on a shared
machine the load swings within minutes, so one pass of the systems, one after the other, can give
one of them a quiet minute and the next a busy one). Systems, each in a process of its own
(bench/isolate.py):

- LLMasOS, 8 adapters mixed: the base model with `enable_lora`, request i on adapter i % 8;
- one merged model: adapter 0 as the store loads an adapter alone (merged into float32 weights);
- the same mix over the float32 base (GGUF blocks off): the LoRA cost at the merged model's precision;
- the base model alone: no adapter at all, its GGUF blocks (the ceiling of the mix).

The adapters are random rank-r LoRAs of every linear layer, made with peft and put into the store
once (`{model}-bench-lora{i}`); random weights cost what trained ones do.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from llmasos.bench.common import Row, add_speedups, progress
from llmasos.bench.isolate import run_isolated

WORKLOAD = "LoRA mix"
PROMPTS = [
    "Write a short poem about the sea.",
    "What is the capital of France? Answer in one sentence.",
    "Explain what a hash table is.",
    "Give three tips for learning to cook.",
]
# system -> (engine options, which adapter each request uses: "mix" over all, "none")
SYSTEMS = {
    "LLMasOS": ({"enable_lora": True}, "mix"),
    "one merged model (float32)": ({}, "merged"),
    "mix over float32 base": ({"enable_lora": True, "gguf_blocks": False}, "mix"),
    "base alone (no adapter)": ({}, "none"),
}


def adapter_names(model: str, count: int) -> list[str]:
    return [f"{model}-bench-lora{i}" for i in range(count)]


def ensure_adapters(model: str, count: int, rank: int) -> list[str]:
    """The bench's adapters of `model` in the store, made once: random A and B on every linear layer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmasos.store import ModelStore
    from llmasos.train.finetune import LORA_TARGETS, TOKENIZER_FILES

    store = ModelStore()
    names = adapter_names(model, count)
    missing = [name for name in names if not store._has(name)]
    if not missing:
        return names
    base_dir = store.resolve(model)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with tempfile.TemporaryDirectory(prefix="llmasos-bench-lora-") as work:
        for name in missing:
            progress.print(f"making adapter {name} (rank {rank})")
            torch.manual_seed(names.index(name))
            peft_model = get_peft_model(
                base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS)
            )
            with torch.no_grad():
                for param_name, param in peft_model.named_parameters():
                    if "lora_" in param_name:
                        param.normal_(0, 0.02)
            peft_model.peft_config["default"].base_model_name_or_path = model
            folder = Path(work) / name
            peft_model.save_pretrained(folder, save_embedding_layers=False)
            for file in ("config.json", "generation_config.json", *TOKENIZER_FILES):
                if (base_dir / file).is_file():
                    shutil.copy(base_dir / file, folder / file)
            store.import_path(folder, name, progress=False)
            base = peft_model.unload()  # the plain base again, for the next adapter
    return names


def measure(payload: dict):
    """In the child: one system's batch, after a warm-up; yields its figure."""
    from llmasos.api import LLM
    from llmasos.sampling_params import SamplingParams

    options, use = SYSTEMS[payload["system"]]
    names, requests, max_tokens = payload["adapters"], payload["requests"], payload["max_tokens"]
    model = names[0] if use == "merged" else payload["model"]
    llm = LLM(model, max_loras=len(names), max_lora_rank=payload["rank"], **options)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
    loras = [names[i % len(names)] if use == "mix" else None for i in range(requests)]

    def params(tokens: int) -> list[SamplingParams]:
        return [
            SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True, lora=lora) for lora in loras
        ]

    llm.generate(prompts, params(4))  # warm-up: every adapter loaded, the decode stack built
    best = 0.0
    for _ in range(payload["repeats"]):  # the best of a few: the machines are shared and noisy
        start = time.perf_counter()
        outputs = llm.generate(prompts, params(max_tokens))
        generated = sum(len(out.outputs[0].token_ids) for out in outputs)
        best = max(best, generated / (time.perf_counter() - start))
    yield {"tok_s": best}


def run_lora_bench(
    model: str = "smollm2",
    adapters: int = 8,
    requests: int = 16,
    max_tokens: int = 32,
    rank: int = 8,
    repeats: int = 3,
    rounds: int = 1,
) -> tuple[list[Row], list[str]]:
    """Every system's row (the mix first, as "LLMasOS") and the notes of the table."""
    import os

    names = ensure_adapters(model, adapters, rank)
    payload = {
        "model": model,
        "adapters": names,
        "requests": requests,
        "max_tokens": max_tokens,
        "rank": rank,
        "repeats": repeats,
    }
    load = os.getloadavg()
    best: dict[str, float | None] = dict.fromkeys(SYSTEMS)
    failures: dict[str, str] = {}
    for round_ in range(rounds):
        for system in SYSTEMS:
            progress.print(f"round {round_ + 1}/{rounds}: {system} ...")
            run = run_isolated("llmasos.bench.lora:measure", {**payload, "system": system}, timeout=1800)
            if run.results:
                best[system] = max(best[system] or 0.0, run.results[0]["tok_s"])
            elif run.failure:
                failures[system] = f"{run.failure}: {run.last_lines()}"
    rows = [
        Row(WORKLOAD, "LLMasOS" if system == "LLMasOS" else system, value, "tok/s",
            failures.get(system, "") if value is None else "")
        for system, value in best.items()
    ]  # fmt: skip
    add_speedups(rows)
    notes = [
        f"{requests} requests at once, {max_tokens} new tokens each, greedy, best of {repeats} "
        f"x {rounds} round(s) (the systems in turn each round); adapters of "
        f"rank {rank} on every linear layer; LLMasOS row: {adapters} adapters mixed in one batch "
        f"(request i on adapter i % {adapters})",
        f"load average before: {' '.join(f'{x:.1f}' for x in load)}, after: "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}",
    ]
    return rows, notes
