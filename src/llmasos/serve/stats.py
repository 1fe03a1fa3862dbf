"""GET /api/stats: the live numbers of a running server as one JSON snapshot, for the console's
dashboard and `llmasos top`; GET /api/stats/stream: the same as server-sent events, one snapshot a
second (`data: <snapshot>`), until the client leaves or the server shuts down.

Any valid key may read them (the server is open when it has no keys); a key that is not an admin key
sees only its own row of `keys`. The numbers are kept by the Gateway's `Monitor` (serve/monitor.py)
and the engines' `EngineStats`, read when a snapshot is asked for: polling costs the token path
nothing. The snapshot (docs/stats.md has an example):

    time            unix seconds of the snapshot; uptime_s: since the server started
    models          per loaded model, what /v1/ps shows (memory_bytes, in_flight, running, waiting,
                    kv_cache_usage, kv_disk_cache_bytes, prefix_disk_hit_tokens, loaded_at,
                    expires_in_s, speculative) and:
                    preemptions      since the model was loaded
                    kv_blocks        {total, used, cached, free}: used + cached + free = total; cached
                                     blocks are free ones still holding a reusable prefix (None for an
                                     embedding model, which has no KV cache)
                    prefix_cache_hit_rate   hit tokens / queried tokens since loaded (None before any)
    requests        {running, waiting} over the models; {admitted, rate_limited, queue_full} since start
    tokens          window_s (300), resolution_s (1); prefill, cached, decode: tokens per second, oldest
                    first, the last point the second in progress (prefill: prompt tokens computed;
                    cached: prompt tokens taken from the prefix cache; counted as a request's first
                    tokens arrive); per_s: the mean of each over the last 10 complete seconds;
                    totals: since start
    latency         window_s (60); ttft_s, itl_s: {p50, p90, p99, count} in seconds over the window
                    (None without samples), from the engine's timestamps
    prefix_cache_hit_rate   cached / (prefill + cached) over the tokens window (None before any)
    keys            [{key, requests, tokens, rate_limited, token_budget, tokens_used, budget_left}]:
                    requests, tokens and rate_limited since the server started; tokens_used over the
                    key's life; budget_left = token_budget - tokens_used (None: no budget). key is None
                    for the calls of an open server
    guards          {enabled, verdicts: {stage: {action: n}}, categories: {category: {action: n}}}: the
                    guard verdicts audited since start (every checked prompt message and answer)
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from llmasos.kernel.engine import EngineStats
from llmasos.serve.keys import ApiKey
from llmasos.serve.monitor import KeyUsage

if TYPE_CHECKING:
    from llmasos.serve.gateway import Gateway

STREAM_EVERY_S = 1.0


def router(server: Gateway) -> APIRouter:
    api = APIRouter(prefix="/api")
    auth = Depends(server.authenticate)

    @api.get("/stats")
    async def stats(key: ApiKey | None = auth):
        return snapshot(server, key)

    @api.get("/stats/stream")
    async def stream(key: ApiKey | None = auth):
        async def events() -> AsyncIterator[str]:
            while not server.is_shutting_down():  # a client that leaves cancels this generator
                yield f"data: {json.dumps(snapshot(server, key))}\n\n"
                await asyncio.sleep(STREAM_EVERY_S)

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may hold events back
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    return api


def snapshot(server: Gateway, reader: ApiKey | None) -> dict:
    """The numbers now, as `reader` may see them (see the module's docstring)."""
    models = server.loaded_models()["models"]
    for row in models:
        loaded = server.registry.loaded.get(row["model"])
        row.update(_engine_figures(None if loaded is None or loaded.is_embedder else loaded.served.stats))
    monitor = server.monitor
    admitted = sum(usage.requests for usage in monitor.keys.values())
    rate_limited = sum(usage.rate_limited for usage in monitor.keys.values())
    return {
        "time": time.time(),
        "uptime_s": time.time() - server.started,
        "models": models,
        "requests": {
            "running": sum(row["running"] for row in models),
            "waiting": sum(row["waiting"] for row in models),
            "admitted": admitted,
            "rate_limited": rate_limited,
            "queue_full": monitor.queue_full,
        },
        **monitor.traffic(),
        "keys": _key_rows(server, reader),
        "guards": {"enabled": server.guards is not None, **monitor.guards()},
    }


def _engine_figures(stats: EngineStats | None) -> dict:
    if stats is None:
        return {"preemptions": 0, "kv_blocks": None, "prefix_cache_hit_rate": None}
    free = stats.num_free_blocks
    cached = min(stats.num_cached_free_blocks, free)  # read between steps, so maybe a step apart
    queried = stats.prefix_queried_tokens
    return {
        "preemptions": stats.num_preemptions,
        "kv_blocks": {
            "total": stats.num_blocks,
            "used": stats.num_blocks - free,
            "cached": cached,
            "free": free - cached,
        },
        "prefix_cache_hit_rate": stats.prefix_hit_tokens / queried if queried else None,
    }


def _key_rows(server: Gateway, reader: ApiKey | None) -> list[dict]:
    """Every live key (and any revoked one used since start), or only the reader's own when it is not
    an admin key: a tenant need not learn who else uses the server, nor how much."""
    usage = server.monitor.keys
    if reader is None:  # an open server: its callers are one row
        return [_key_row(None, usage[None], None, usage[None].tokens)] if None in usage else []
    keys = [k for k in server.keys.list() if not k.revoked or k.name in usage]
    if not reader.admin:
        keys = [k for k in keys if k.name == reader.name]
    return [_key_row(k.name, usage.get(k.name, KeyUsage()), k.token_budget, k.tokens_used) for k in keys]


def _key_row(name: str | None, used: KeyUsage, budget: int | None, tokens_used: int) -> dict:
    return {
        "key": name,
        "requests": used.requests,
        "tokens": used.tokens,
        "rate_limited": used.rate_limited,
        "token_budget": budget,
        "tokens_used": tokens_used,
        "budget_left": None if budget is None else max(budget - tokens_used, 0),
    }
