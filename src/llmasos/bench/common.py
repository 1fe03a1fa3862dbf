"""What every benchmark shares: a row of figures, the speed-up column, the facts of the machine, and
one table printed on the terminal and written as Markdown.

A figure means something only next to a peer measured in the same run on the same machine, so every
table carries the machine's facts (CPU, versions, the command) and, per row, LLMasOS's speed-up over
that row's system. Benchmarks are commands, never tests: nothing here passes or fails on a number.
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.table import Table

from llmasos.errors import LLMasOSError

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


def report(rows: list[Row], model: str, notes: list[str], output: Path | None) -> None:
    """Print the table, and write it as Markdown to `output` when one is given."""
    facts = machine_facts()
    print_table(rows, model, facts, notes)
    if output is not None:
        output.write_text(to_markdown(rows, model, facts, notes))
        progress.log(f"wrote {output}")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (a server started next binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(
    command: Sequence[str], ready_url: str, log_path: Path, timeout: float = 600, env: dict | None = None
) -> Iterator[subprocess.Popen]:
    """A server (ours or a peer) as its own process, so that the load generator does not share its
    GIL or cores' scheduling with it: handed over once `ready_url` answers 200, its output in
    `log_path`; SIGTERM after the block (SIGKILL if it lingers). A server that exits or is not ready
    within `timeout` raises with the tail of its log."""
    import httpx

    with open(log_path, "wb") as log:
        process = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(ready_url, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise LLMasOSError(f"`{' '.join(map(str, command))}` did not become ready:\n{tail}")
            time.sleep(0.2)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
