"""`llmasos top`: a terminal dashboard of a running server (LLMASOS_HOST, with LLMASOS_API_KEY as its
key), redrawn every second from its GET /api/stats: models and their KV blocks, requests, tokens/s
with a sparkline of the last minute, latency percentiles, per-key usage, guard verdicts; `q` quits.

Like every client verb it imports httpx and rich only, never torch: it starts at once and weighs
nothing beside the server it watches. The drawing is in cli/dashboard.py.
"""

from __future__ import annotations

from typing import Annotated

import typer

from llmasos.cli.app import app

REFRESH_S = 1.0


@app.command()
def top(
    once: Annotated[bool, typer.Option("--once", help="print one frame and exit (for scripts)")] = False,
) -> None:
    """A live dashboard of the running server (LLMASOS_HOST): models, KV blocks, requests, tokens/s,
    latency, per-key usage and guard verdicts, every second; `q` quits."""
    from rich.console import Console
    from rich.live import Live

    from llmasos.cli.daemon import Daemon
    from llmasos.cli.dashboard import frame, keys_pressed

    daemon = Daemon.required()
    console = Console()
    if once:
        console.print(frame(daemon.get("/api/stats"), daemon.url))
        return
    with keys_pressed() as pressed, Live(console=console, screen=True, auto_refresh=False) as live:
        while True:
            live.update(frame(daemon.get("/api/stats"), daemon.url), refresh=True)
            if "q" in pressed(REFRESH_S).lower():
                return
