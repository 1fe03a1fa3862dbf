"""What `llmasos top` (cli/top.py) draws: one frame of a server's GET /api/stats snapshot
(serve/stats.py documents it) in rich panels, and the keys pressed meanwhile.

Keys are read from the terminal in cbreak mode (no Enter needed, nothing echoed), waiting on select()
for at most the refresh interval, so a key press acts at once and no thread is needed; the terminal's
settings are restored however the program ends. Imported by the verb only, so that other verbs do
not pay for rich.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from llmasos.cli.app import human_size

SPARK = "▁▂▃▄▅▆▇█"
SPARK_POINTS = 60  # the last minute of the 1 s series
BAR_WIDTH = 24


@contextmanager
def keys_pressed() -> Iterator[Callable[[float], str]]:
    """A function that waits up to `timeout` seconds for keys and returns those pressed ("" if none).
    On a terminal it puts stdin in cbreak mode for the while; otherwise it only waits."""
    stdin = sys.stdin
    if not stdin.isatty():

        def wait(timeout: float) -> str:
            time.sleep(timeout)
            return ""

        yield wait
        return
    fd = stdin.fileno()
    saved = termios.tcgetattr(fd)

    def read(timeout: float) -> str:
        ready, _, _ = select.select([fd], [], [], timeout)
        return os.read(fd, 64).decode(errors="replace") if ready else ""

    tty.setcbreak(fd)
    try:
        yield read
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


# -- one frame ----------------------------------------------------------------------------------------------


def frame(stats: dict, url: str) -> RenderableType:
    """Everything the snapshot says, in panels; pure, so it can be printed once or redrawn live."""
    requests = stats["requests"]
    hit_rate = stats["prefix_cache_hit_rate"]
    header = Text.assemble(
        ("llmasos top", "bold"),
        f"  {url}  up {_duration(stats['uptime_s'])}",
        ("   q quits\n", "dim"),
        "requests: ",
        (f"{requests['running']} running", "green"),
        f", {requests['waiting']} waiting, {requests['admitted']} admitted, ",
        (f"{requests['rate_limited']} rate-limited", "yellow" if requests["rate_limited"] else ""),
        f", {requests['queue_full']} queue full   prefix cache hits: {_percent(hit_rate)}",
    )
    parts: list[RenderableType] = [header, _models(stats["models"]), _traffic(stats)]
    if stats["keys"]:
        parts.append(_keys(stats["keys"]))
    if stats["guards"]["enabled"]:
        parts.append(_guards(stats["guards"]))
    return Group(*parts)


def _models(models: list[dict]) -> RenderableType:
    table = Table(
        "MODEL", "MEMORY", "RUNNING", "WAITING", "PREEMPTED", "KV BLOCKS used/cached/free", "PREFIX HITS",
        box=None, expand=False,
    )  # fmt: skip
    for row in models:
        blocks = row["kv_blocks"]
        table.add_row(
            row["model"],
            human_size(row["memory_bytes"]),
            str(row["running"]),
            str(row["waiting"]),
            str(row["preemptions"]),
            _blocks(blocks) if blocks else Text("embedding model", "dim"),
            _percent(row["prefix_cache_hit_rate"]),
        )
    if not models:
        table.add_row(Text("no model loaded", "dim"), "", "", "", "", "", "")
    return Panel(table, title="models", title_align="left")


def _blocks(blocks: dict) -> Text:
    """A bar of the KV cache, used | cached | free, and the counts."""
    total = max(blocks["total"], 1)
    used = round(BAR_WIDTH * blocks["used"] / total)
    cached = min(round(BAR_WIDTH * blocks["cached"] / total), BAR_WIDTH - used)
    return Text.assemble(
        ("█" * used, "red"),
        ("█" * cached, "blue"),
        ("░" * (BAR_WIDTH - used - cached), "dim"),
        f" {blocks['used']}/{blocks['cached']}/{blocks['free']}",
    )


def _traffic(stats: dict) -> RenderableType:
    tokens, latency = stats["tokens"], stats["latency"]
    table = Table("", "TOK/S", f"LAST {SPARK_POINTS} S", box=None)
    for name, label in (("prefill", "prefill"), ("cached", "from cache"), ("decode", "decode")):
        table.add_row(
            label, f"{tokens['per_s'][name]:.1f}", Text(sparkline(tokens[name][-SPARK_POINTS:]), "cyan")
        )
    times = Table("", "P50", "P90", "P99", "SAMPLES", box=None)
    for name, label in (("ttft_s", "TTFT"), ("itl_s", "ITL")):
        figures = latency[name]
        times.add_row(label, *(_ms(figures[p]) for p in ("p50", "p90", "p99")), str(figures["count"]))
    grid = Table.grid(padding=(0, 4))
    grid.add_row(table, times)
    return Panel(grid, title=f"tokens and latency (last {latency['window_s']:.0f} s)", title_align="left")


def _keys(rows: list[dict]) -> RenderableType:
    table = Table("KEY", "REQUESTS", "TOKENS", "429s", "BUDGET LEFT", box=None)
    for row in rows:
        left = row["budget_left"]
        table.add_row(
            row["key"] or "(open server)",
            str(row["requests"]),
            str(row["tokens"]),
            str(row["rate_limited"]),
            "unlimited" if left is None else f"{left} of {row['token_budget']}",
        )
    return Panel(table, title="keys, since the server started", title_align="left")


def _guards(guards: dict) -> RenderableType:
    table = Table("", "ALLOW", "REDACT", "BLOCK", box=None)
    for stage, actions in guards["verdicts"].items():
        table.add_row(stage, *(str(actions.get(a, 0)) for a in ("allow", "redact", "block")))
    for category, actions in guards["categories"].items():
        table.add_row(
            Text(category, "yellow"), *(str(actions.get(a, 0)) for a in ("allow", "redact", "block"))
        )
    return Panel(table, title="guard verdicts (by stage, then by category found)", title_align="left")


def sparkline(points: list[float]) -> str:
    """One character per point, scaled to the largest; all zero is a flat line."""
    peak = max(points, default=0)
    if peak <= 0:
        return SPARK[0] * len(points)
    return "".join(SPARK[min(int(p / peak * (len(SPARK) - 1) + 0.5), len(SPARK) - 1)] for p in points)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.0%}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
