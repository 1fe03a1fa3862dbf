"""`llmasos bench data`: a generated JSONL corpus (data_corpus.py) through `data import` and a
cleaning recipe (`data prepare`), beside the same steps run bare in a datatrove pipeline
(JsonlReader -> the steps -> JsonlWriter, datatrove's LocalPipelineExecutor, no store, no lineage).

Each system runs in a child process of its own (`python -m llmasos.bench.data ...`), so its peak RSS
is its own (ru_maxrss from wait4) and its time excludes the interpreter's start. The recipe's
datatrove filters are datatrove's objects in both; LLMasOS's own steps (dedup, scrub) are the same
objects in both, wrapped as a datatrove step in the bare pipeline: the difference between the two is
what the store and lineage cost (Parquet shards, digests, manifests), the figure the goal is about.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from llmasos.bench.common import machine_facts, progress
from llmasos.errors import LLMasOSError

DEFAULT_STEPS = ("gopher_quality", "exact_dedup", "near_dedup", "scrub")
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9}


@dataclass
class StepResult:
    size: int  # corpus bytes
    system: str  # LLMasOS or datatrove bare
    step: str  # import, prepare, import+prepare, pipeline
    seconds: float
    peak_rss_mib: float | None  # None for a sum of steps
    rows_out: int | None = None

    @property
    def mb_per_s(self) -> float:
        return self.size / 1e6 / self.seconds


def parse_size(text: str) -> int:
    """'250MB' -> 250_000_000 (decimal units, as MB/s is)."""
    match = re.fullmatch(r"\s*([\d.]+)\s*(KB|MB|GB)\s*", text.upper())
    if not match:
        raise LLMasOSError(f"size {text!r}: write a number and KB, MB or GB, e.g. 250MB or 1GB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def write_recipe(path: Path, steps: list[str]) -> Path:
    path.write_text(yaml.safe_dump({"column": "text", "steps": [{s: {}} for s in steps]}))
    return path


def run_data_bench(
    sizes: list[int], steps: list[str], workdir: Path | None = None, peer: bool = True, tasks: int = 1
) -> list[StepResult]:
    """For each size: write the corpus, run LLMasOS (import, then prepare with `tasks` processes)
    and the bare datatrove pipeline (one task: the corpus is one file, datatrove's unit of work), each
    step in its own child process."""
    with tempfile.TemporaryDirectory(prefix="llmasos-bench-data-") as scratch:
        work = Path(workdir or scratch)
        work.mkdir(parents=True, exist_ok=True)
        recipe = write_recipe(work / "recipe.yaml", steps)
        results: list[StepResult] = []
        for size in sizes:
            results += _one_size(work, size, recipe, peer, tasks)
        return results


def _one_size(work: Path, size: int, recipe: Path, peer: bool, tasks: int) -> list[StepResult]:
    from llmasos.bench.data_corpus import write_corpus

    corpus = work / f"corpus-{size}.jsonl"
    if not corpus.exists():
        progress.print(f"writing a {size / 1e6:.0f} MB corpus to {corpus}")
        write_corpus(corpus.with_suffix(".partial"), size)
        corpus.with_suffix(".partial").rename(corpus)
    home, bare = work / f"home-{size}", work / f"bare-{size}"
    for folder in (home, bare):  # a previous run's, in a kept --workdir
        shutil.rmtree(folder, ignore_errors=True)
    size = corpus.stat().st_size  # from here on, the bytes actually written
    imported = _child(work, size, "LLMasOS", "import", str(home), str(corpus))
    prepared = _child(work, size, "LLMasOS", "prepare", str(home), str(recipe), str(tasks))
    total = StepResult(size, "LLMasOS", "import+prepare", imported.seconds + prepared.seconds, None,
                       prepared.rows_out)  # fmt: skip
    results = [imported, prepared, total]
    if peer:
        results.append(_child(work, size, "datatrove bare", "bare", str(bare), str(corpus), str(recipe)))
    return results


def _child(work: Path, size: int, system: str, step: str, *args: str) -> StepResult:
    """Run one step in a child process: its own time (from its report) and peak RSS (from wait4)."""
    progress.print(f"{system}: {step} of {size / 1e6:.0f} MB")
    log = work / f"{step}-{size}.log"
    with open(log, "wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "llmasos.bench.data", step, *args], stdout=subprocess.PIPE, stderr=err
        )
        out = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise LLMasOSError(f"bench data: {system} {step} failed (exit {process.returncode}):\n{tail}")
    report = json.loads(out.decode().strip().splitlines()[-1])
    return StepResult(size, system, step, report["seconds"], usage.ru_maxrss / 1024, report.get("rows"))


def format_table(
    results: list[StepResult], steps: list[str], output: Path | None = None, tasks: int = 1
) -> str:
    """One table: per size and system each step's MB/s and peak RSS, and LLMasOS's import+prepare
    MB/s over the bare pipeline's (goal: at least 1/1.5 = 0.67)."""
    from rich.console import Console
    from rich.table import Table

    facts = machine_facts()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    notes = [f"recipe: {', '.join(steps)}", f"prepare: {tasks} task(s), the bare pipeline: 1",
             f"load average at the end: {load}"]  # fmt: skip
    header = ("corpus", "system", "step", "rows out", "seconds", "MB/s", "peak RSS", "LLMasOS / bare")
    lines = []
    for r in results:
        ratio = ""
        if r.step == "import+prepare":
            bare = next((b for b in results if b.size == r.size and b.step == "bare"), None)
            ratio = f"{r.mb_per_s / bare.mb_per_s:.2f}x" if bare else ""
        rss = "" if r.peak_rss_mib is None else f"{r.peak_rss_mib:.0f} MiB"
        lines.append((f"{r.size / 1e6:.1f} MB", r.system, r.step, str(r.rows_out), f"{r.seconds:.1f}",
                      f"{r.mb_per_s:.2f}", rss, ratio))  # fmt: skip
    table = Table(*header, title="llmasos bench data", caption="\n".join([*facts.values(), *notes]))
    for line in lines:
        table.add_row(*line)
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    markdown = [f"`{facts['command']}`", ""]
    markdown += [f"- {k}: {v}" for k, v in facts.items() if k != "command"] + [f"- {n}" for n in notes]
    markdown += ["", "| " + " | ".join(header) + " |", "|---|---|---|---:|---:|---:|---:|---:|"]
    markdown += ["| " + " | ".join(line) + " |" for line in lines]
    text = "\n".join(markdown) + "\n"
    if output:
        output.write_text(text)
    return text


# ---- the child processes -------------------------------------------------------------------------


def _import(home: str, corpus: str) -> dict:
    from llmasos.data.store import DatasetStore

    made = DatasetStore(Path(home)).import_path(corpus, "corpus")
    return {"rows": made.rows}


def _prepare(home: str, recipe: str, tasks: str) -> dict:
    from llmasos.data.pipeline.run import prepare
    from llmasos.data.store import DatasetStore

    made = prepare(DatasetStore(Path(home)), "corpus", recipe, "clean", progress=False, tasks=int(tasks))
    return {"rows": made.rows}


def _bare(folder: str, corpus: str, recipe: str) -> dict:
    """The recipe's steps in a datatrove pipeline over the JSONL, written back as JSONL."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    from llmasos.data.pipeline import steps as llmasos_steps
    from llmasos.data.pipeline.recipe import build_step
    from llmasos.data.store import DatasetStore

    spec = yaml.safe_load(Path(recipe).read_text())
    store = DatasetStore(Path(folder) / "unused-home")  # decontamination sources are read through it
    source = Path(corpus)
    pipeline: list = [JsonlReader(str(source.parent), glob_pattern=source.name, add_file_path=False)]
    built = []
    for entry in spec["steps"]:
        ((name, options),) = entry.items()
        step = build_step(name, options or {}, spec.get("column", "text"), store)
        built.append(step)
        is_filter = isinstance(step, llmasos_steps.QualityFilter)
        pipeline.append(step.filter if is_filter else _as_datatrove_step(step))
    pipeline.append(JsonlWriter(str(Path(folder) / "out"), compression=None))
    logs = Path(folder) / "logs"
    try:
        LocalPipelineExecutor(pipeline, tasks=1, workers=1, logging_dir=str(logs)).run()
    finally:
        for step in built:
            step.close()
    writer = json.loads((logs / "stats.json").read_text())[-1]  # the executor's copy of the steps counted
    return {"rows": writer["stats"].get("total", 0)}


def _as_datatrove_step(step):
    """One of LLMasOS's steps as a datatrove pipeline step: documents in batches through it."""
    from datatrove.data import Document
    from datatrove.pipeline.base import PipelineStep

    from llmasos.data.store.readers import BATCH_ROWS

    class Batched(PipelineStep):
        name = step.name
        type = "LLMasOS"

        def run(self, data, rank: int = 0, world_size: int = 1):
            batch: list[Document] = []
            for doc in data:
                batch.append(doc)
                if len(batch) >= BATCH_ROWS:
                    yield from self._through(batch)
                    batch = []
            yield from self._through(batch)

        def _through(self, docs: list[Document]):
            rows = [(i, {**doc.metadata, step.column: doc.text}) for i, doc in enumerate(docs)]
            for i, row in step(rows):
                docs[i].text = row[step.column]
                yield docs[i]

    return Batched()


_STEPS = {"import": _import, "prepare": _prepare, "bare": _bare}


def main(argv: list[str]) -> None:
    """A child: run one step, print {"seconds", "rows"} as the last line of stdout."""
    step, *args = argv
    import datatrove.executor  # noqa: F401 (imports are not what is timed)

    import llmasos.data.pipeline.run  # noqa: F401

    start = time.perf_counter()
    report = _STEPS[step](*args)
    print(json.dumps({"seconds": time.perf_counter() - start, **report}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
