"""The web console at `/`: chat, models, a live dashboard and training runs, in the browser.

The page is static: index.html, a few ES modules and vendored libraries (console/vendor, each with its
licence), all shipped in the package, so it works offline and needs no build step. It talks to the
same endpoints as any client (/v1/chat/completions, /api/*), with the key the user typed kept in the
tab's sessionStorage and sent as a bearer header. The page itself needs no key: it holds no data.

Every console response carries a strict Content-Security-Policy: scripts and styles only from this
origin, no inline script, no eval, no plugins, no framing. Together with DOMPurify on rendered
Markdown it means a model's answer holding `<script>` or `<img onerror>` runs nothing.

`GET /api/runs` is the data of the Runs page: each training run's metrics.jsonl under the runs folder
(`runs/` in the server's working directory, where `llmasos pretrain`, `finetune` and `dpo` write by
default; LLMASOS_RUNS_DIR moves it) and the evaluation results recorded in the store's model cards.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse

from llmasos.serve.errors import APIError

if TYPE_CHECKING:
    from llmasos.serve.gateway import Gateway

ASSETS = Path(__file__).with_name("console")
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",  # module scripts are refused without a JavaScript type
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-cache",  # revalidate, so an upgraded server never runs yesterday's scripts
}
RUN_DEPTH = 3  # runs/<name>/metrics.jsonl, and one or two folders deeper (runs/sweep/lr-3e-4/...)


def runs_dir() -> Path:
    return Path(os.environ.get("LLMASOS_RUNS_DIR") or "runs")


def router(server: Gateway) -> APIRouter:
    api = APIRouter()
    reader = Depends(server.authenticate)

    @api.get("/", include_in_schema=False)
    async def index():
        return _asset("index.html")

    @api.get("/console/{path:path}", include_in_schema=False)
    async def asset(path: str):
        return _asset(path)

    @api.get("/api/runs", dependencies=[reader])
    async def runs():
        return await asyncio.to_thread(
            lambda: {"runs": training_runs(runs_dir()), "evaluations": evaluations()}
        )

    return api


def _asset(relpath: str) -> FileResponse:
    """A file of the console, and nothing outside its folder."""
    path = (ASSETS / relpath).resolve()
    media_type = MEDIA_TYPES.get(path.suffix)
    if not (path.is_relative_to(ASSETS.resolve()) and path.is_file() and media_type):
        raise APIError(404, f"the console has no file {relpath!r}")
    return FileResponse(path, media_type=media_type, headers=SECURITY_HEADERS)


def training_runs(root: Path) -> list[dict]:
    """Each run under `root` (a folder holding metrics.jsonl), newest first, with its records."""
    if not root.is_dir():
        return []
    found = [p for depth in range(1, RUN_DEPTH + 1) for p in root.glob("*/" * depth + "metrics.jsonl")]
    runs = [
        {
            "name": str(metrics.parent.relative_to(root)),
            "path": str(metrics.parent),
            "modified": metrics.stat().st_mtime,
            "records": _records(metrics),
        }
        for metrics in found
    ]
    return sorted(runs, key=lambda run: -run["modified"])


def _records(metrics: Path) -> list[dict]:
    """The run's records; a line a live run is still writing (not yet valid JSON) is left out."""
    records = []
    for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def evaluations() -> list[dict]:
    """The evaluation results recorded in the store's model cards (`llmasos eval` records them), of
    each model's current bytes."""
    from llmasos.store import ModelStore
    from llmasos.store.card import read_card_data

    store = ModelStore()
    return [
        {"model": manifest.name, **asdict(record)}
        for manifest in store.list()
        for record in read_card_data(store, manifest.name).evaluations.get(manifest.digest, [])
    ]
