"""What every benchmark shares: a row of figures, the speed-up column, the facts of the machine, and
one table printed on the terminal and written as Markdown.

A figure means something only next to a peer measured in the same run on the same machine, so every
table carries the machine's facts (CPU, versions, the command) and, per row, LLMasOS's speed-up over
that row's system. Benchmarks are commands, never tests: nothing here passes or fails on a number.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.table import Table

progress = Console(stderr=True)  # what a benchmark is doing, on stderr; the table goes to stdout


@dataclass
class Row:
    workload: str
    system: str
    value: float | None  # None: the system gave no figure (its process crashed; the note says how)
    unit: str  # "tok/s" (higher is better) or "s" (lower is better)
    note: str = ""
    speedup: float | None = None  # LLMasOS over this row's system; None on LLMasOS's own rows

    @property
    def figure(self) -> str:
        if self.value is None:
            return "n/a"
        return f"{self.value:.2f} s" if self.unit == "s" else f"{self.value:.1f} {self.unit}"


def add_speedups(rows: list[Row]) -> None:
    """Fill the speed-up column: LLMasOS over each other row of the same workload (> 1: LLMasOS is
    faster), the ratio of the figures for rates and the inverse ratio for times; only between rows
    that have figures."""
    ours = {r.workload: r for r in rows if r.system == "LLMasOS" and r.value is not None}
    for row in rows:
        mine = ours.get(row.workload)
        if mine is not None and row is not mine and row.value is not None:
            row.speedup = row.value / mine.value if row.unit == "s" else mine.value / row.value


def machine_facts() -> dict[str, str]:
    """Date, CPU, versions and the command: the caption of every table. llama.cpp's version is read
    from its package's metadata: importing it would load its native library into this process."""
    from importlib.metadata import PackageNotFoundError, version

    import torch
    import transformers

    import llmasos

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        llama_version = version("llama-cpp-python")
    except PackageNotFoundError:
        llama_version = "not installed"
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "versions": f"python {platform.python_version()}, llmasos {llmasos.__version__}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, llama-cpp-python {llama_version}",
        "command": "llmasos " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "llmasos bench",
    }


def _speedup(row: Row) -> str:
    return "" if row.speedup is None else f"{row.speedup:.2f}x"


def print_table(rows: list[Row], model: str, facts: dict[str, str], notes: list[str]) -> None:
    table = Table(
        "workload",
        "system",
        "figure",
        "LLMasOS speed-up",
        "note",
        title=f"llmasos bench: {model}",
        caption="\n".join([*facts.values(), *notes]),
    )
    for row in rows:
        table.add_row(row.workload, row.system, row.figure, _speedup(row), row.note)
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def to_markdown(rows: list[Row], model: str, facts: dict[str, str], notes: list[str]) -> str:
    lines = [f"`{facts['command']}` (model {model})", ""]
    lines += [f"- {key}: {value}" for key, value in facts.items() if key != "command"]
    lines += [f"- {note}" for note in notes]
    lines += ["", "| workload | system | figure | LLMasOS speed-up | note |", "|---|---|---:|---:|---|"]
    lines += [f"| {r.workload} | {r.system} | {r.figure} | {_speedup(r)} | {r.note} |" for r in rows]
    return "\n".join(lines) + "\n"
