"""Footprint: what one GGUF model costs on disk and in memory (`llmasos bench footprint`).

For one .gguf (default: the embedded SmolLM2), in one run:
- store bytes: the file imported into a fresh store (a temporary LLMASOS_HOME), over the file's size;
  beside it the layout GGUF imports of old stored (the GGUF plus a dequantized float32
  `model.safetensors` and the repacked `gguf_blocks.safetensors`), rebuilt here from the same weights
  (`write_converted_layout`), which LLMasOS still loads;
- load seconds (`LLM(...)` until it can generate) and peak RSS (the process's maximum resident set:
  load, then a greedy 64-token generation) of each layout, each in a fresh process;
- the same peak RSS for llama.cpp (llama-cpp-python) on the same file at the same context length,
  generating the same number of tokens (checked: a peer that stops early is no peer).
Each system runs in a process of its own (bench/isolate.py), so one's memory is never another's.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from llmasos.bench.common import Row, progress, report
from llmasos.bench.isolate import run_isolated

PROMPT = "Write a short story about a robot who learns to paint."
TOKENS = 64  # generated per run
CONTEXT = 2048  # tokens of KV cache for every system
BLOCK_SIZE = 16


def write_converted_layout(model_dir: Path, out_dir: Path) -> None:
    """The folder a GGUF import of old stored, from a GGUF model folder: its files, the floats
    dequantized to model.safetensors and the kernels' blocks in gguf_blocks.safetensors."""
    import shutil

    from safetensors.torch import save_file

    from llmasos.models.loader import iter_weights
    from llmasos.store.gguf import GGUF_BLOCKS_FILE
    from llmasos.store.gguf_tensors import TENSORS_FILE, GGUFTensors

    out_dir.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():
        if path.name != TENSORS_FILE:
            shutil.copyfile(path, out_dir / path.name)
    save_file(dict(iter_weights(model_dir)), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    with GGUFTensors(model_dir) as reader:
        blocks = {name: reader.blocks(name) for name in reader.block_names()}
        layouts = {name: layout for name, (_, layout) in blocks.items()}
        if blocks:  # as imports of old: none for a file of floats
            save_file(
                {name: raw.contiguous() for name, (raw, _) in blocks.items()},
                str(out_dir / GGUF_BLOCKS_FILE),
                layouts,
            )
        del blocks


def _peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: that keeps the parent's
    peak across fork and exec, so every child would report at least the bench process's own."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status: peak RSS is measured on Linux only")


def llmasos_child(job: dict):
    """Load the folder and generate: load seconds, tokens generated, peak RSS."""
    from llmasos import LLM, SamplingParams
    from llmasos.ops.kernels import kernels

    kernels()  # compiled once per machine (or after a source change): not part of a load
    start = time.perf_counter()
    llm = LLM(job["model"], max_model_len=job["context"], block_size=BLOCK_SIZE,
              num_kv_blocks=job["context"] // BLOCK_SIZE)  # fmt: skip
    load = time.perf_counter() - start
    params = SamplingParams(temperature=0, max_tokens=job["tokens"], ignore_eos=True)
    out = llm.generate([job["prompt"]], params)[0].outputs[0]
    yield {"load_s": load, "tokens": len(out.token_ids), "peak_rss_mib": _peak_rss_mib()}


def llama_cpp_child(job: dict):
    """llama.cpp on the GGUF at the same context: greedy tokens until `tokens` are generated (its
    end-of-text token does not stop it, as `ignore_eos` does not stop LLMasOS)."""
    from llama_cpp import Llama

    start = time.perf_counter()
    llm = Llama(model_path=job["gguf"], n_ctx=job["context"], n_threads=job.get("threads"), verbose=False)
    load = time.perf_counter() - start
    generated = 0
    for _ in llm.generate(llm.tokenize(job["prompt"].encode()), temp=0.0, top_k=1):
        generated += 1
        if generated == job["tokens"]:
            break
    yield {"load_s": load, "tokens": generated, "peak_rss_mib": _peak_rss_mib()}


def _measure(target: str, job: dict, system: str, rows: list[Row], workload: str) -> dict | None:
    progress.log(f"{workload}: {system}")
    run = run_isolated(target, job, timeout=1800)
    if run.failure or not run.results:
        rows.append(Row(workload, system, None, "MiB", f"{run.failure}: {run.last_lines()}"))
        return None
    result = run.results[0]
    if result["tokens"] != job["tokens"]:
        note = f"generated {result['tokens']} tokens, not {job['tokens']}: not comparable"
        rows.append(Row(workload, system, None, "MiB", note))
        return None
    return result


def run_footprint_bench(gguf: Path | None, context: int, output: Path | None) -> list[Row]:
    import os

    from llmasos.store import ModelStore
    from llmasos.store.catalog import CATALOG

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="llmasos-footprint-") as tmp:
        store = ModelStore(Path(tmp) / "home")
        if gguf is None:
            manifest = store.pull("smollm2", progress=False)
            gguf_name = CATALOG["smollm2"].member
        else:
            manifest = store.import_path(gguf, "model", progress=False)
            gguf_name = gguf.name
        folder = store.path(manifest.name)
        gguf_path = folder / "model.gguf"
        file_size = gguf_path.stat().st_size
        old = Path(tmp) / "converted"
        write_converted_layout(folder, old)
        old_size = sum(p.stat().st_size for p in old.iterdir())
        mib = 2**20
        for system, size in (("LLMasOS", manifest.size), ("LLMasOS, layout of old", old_size)):
            note = f"{size:,} bytes, {size / file_size:.3f}x the GGUF's {file_size:,}"
            rows.append(Row("store bytes", system, size / mib, "MiB", note))

        job = {"prompt": PROMPT, "tokens": TOKENS, "context": context}
        os.environ["LLMASOS_HOME"] = str(store.home)  # the children open the folders in this store
        figures = {}
        for system, model in (("LLMasOS", str(folder)), ("LLMasOS, layout of old", str(old))):
            result = _measure(
                "llmasos.bench.footprint:llmasos_child", {**job, "model": model}, system, rows, "peak RSS"
            )
            if result is not None:
                figures[system] = result
        peer = _measure(
            "llmasos.bench.footprint:llama_cpp_child",
            {**job, "gguf": str(gguf_path)},
            "llama.cpp",
            rows,
            "peak RSS",
        )
        if peer is not None:
            figures["llama.cpp"] = peer
        for system, result in figures.items():
            rows.append(Row("load", system, result["load_s"], "s"))
        for system, result in figures.items():
            ratio = f"{result['peak_rss_mib'] / peer['peak_rss_mib']:.2f}x llama.cpp's" if peer else ""
            note = f"{TOKENS} tokens at context {context}; {ratio}".rstrip("; ")
            rows.append(Row("peak RSS", system, result["peak_rss_mib"], "MiB", note))
    report(rows, gguf_name, [f"model {gguf_name}; load average {os.getloadavg()[0]:.2f} at the end"], output)
    return rows
