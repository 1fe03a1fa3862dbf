"""The daemon's own API, under /api: the store and the loaded models, for `llmasos` verbs that talk to a
running server, the console and `llmasos top`.

The names are Ollama's where Ollama has the endpoint (tags, show, pull, delete, ps), since its users know
them. Reading (version, tags, show, ps) needs any valid key; changing what the server holds (pull,
import, delete, load, stop, keys) needs an admin key once keys exist (`Gateway.authenticate_admin`).
Store work runs in a worker thread, so the event loop keeps serving tokens meanwhile; a pull streams its
progress as NDJSON, one JSON object per line, and a failure after the first byte is a last line
`{"error": {...}}`, since the status code has gone out by then.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from llmasos import __version__
from llmasos.errors import LLMasOSError
from llmasos.serve.errors import APIError, user_error

if TYPE_CHECKING:
    from llmasos.serve.gateway import Gateway


class ModelRequest(BaseModel):
    model: str = Field(min_length=1)


class PullRequest(ModelRequest):
    stream: bool = True


class ImportRequest(BaseModel):
    path: str = Field(min_length=1)
    name: str | None = None


class KeyRequest(BaseModel):
    name: str
    models: list[str] = ["*"]
    tools: list[str] = ["*"]
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    token_budget: int | None = None
    admin: bool = False


def _store():
    from llmasos.store import ModelStore

    return ModelStore()


def router(server: Gateway) -> APIRouter:
    api = APIRouter(prefix="/api")
    reader, admin = Depends(server.authenticate), Depends(server.authenticate_admin)
    registry = server.registry

    @api.get("/version")
    async def version():
        return {"version": __version__}

    @api.get("/tags", dependencies=[reader])
    async def tags():
        manifests = await asyncio.to_thread(lambda: _store().list())
        return {
            "models": [
                {
                    "name": m.name,
                    "format": m.format,
                    "architecture": m.facts.get("architecture"),
                    "parameters": m.facts.get("parameter_count"),
                    "quantization": m.facts.get("quantization"),
                    "context_length": m.facts.get("context_length"),
                    "size": m.size,
                    "digest": m.digest,
                    "modified": m.created,
                }
                for m in manifests
            ]
        }

    @api.post("/show", dependencies=[reader])
    async def show(body: ModelRequest):
        from llmasos.store.card import build_card

        def read() -> dict:
            store = _store()
            return {
                "name": body.model,
                "details": store.show(body.model),
                "card": asdict(build_card(store, body.model)),
            }

        return await asyncio.to_thread(read)

    @api.get("/ps", dependencies=[reader])
    async def ps():
        return server.loaded_models()

    @api.post("/pull", dependencies=[admin])
    async def pull(body: PullRequest):
        if not body.stream:
            manifest = await asyncio.to_thread(lambda: _store().pull(body.model, progress=False))
            return {"status": "success", "name": manifest.name, "digest": manifest.digest}
        return StreamingResponse(_pull_events(body.model), media_type="application/x-ndjson")

    @api.post("/import", dependencies=[admin])
    async def import_(body: ImportRequest):
        manifest = await asyncio.to_thread(lambda: _store().import_path(body.path, body.name, progress=False))
        return {"name": manifest.name, "digest": manifest.digest}

    @api.delete("/delete", dependencies=[admin])
    async def delete(body: ModelRequest):
        _unload_idle(body.model)
        await asyncio.to_thread(lambda: _store().remove(body.model))
        return {"deleted": body.model}

    @api.post("/load", dependencies=[admin])
    async def load(body: ModelRequest):
        model = await registry.acquire(body.model)
        registry.release(model)
        return {"loaded": body.model, "memory_bytes": model.memory_bytes}

    @api.post("/stop", dependencies=[admin])
    async def stop(body: ModelRequest):
        registry.check_servable(body.model)
        return {"unloaded": body.model if _unload_idle(body.model) else None}

    @api.get("/keys", dependencies=[admin])
    async def list_keys():
        return {"keys": [{k: v for k, v in asdict(key).items() if k != "hash"} for key in server.keys.list()]}

    @api.post("/keys", dependencies=[admin])
    async def add_key(body: KeyRequest):
        key, secret = await asyncio.to_thread(lambda: server.keys.add(**body.model_dump()))
        return {"name": key.name, "secret": secret}

    @api.delete("/keys/{name}", dependencies=[admin])
    async def revoke_key(name: str):
        await asyncio.to_thread(server.keys.revoke, name)
        return {"revoked": name}

    def _unload_idle(name: str) -> bool:
        """Unload the model now if it is loaded; 409 while requests still run on it."""
        model = registry.loaded.get(name)
        if model is None:
            return False
        if model.in_flight:
            raise APIError(
                409,
                f"{name} has {model.in_flight} requests in flight; retry when they are done",
                param="model",
                code="model_busy",
            )
        registry.unload(name)
        server.metrics.forget_model(name)
        return True

    return api


async def _pull_events(name: str) -> AsyncIterator[bytes]:
    """The store's progress events as NDJSON lines while the pull runs in a worker thread."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def report(event: dict) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    def work():
        return _store().pull(name, progress=report)

    task = asyncio.ensure_future(asyncio.to_thread(work))
    task.add_done_callback(lambda _: events.put_nowait(None))
    while (event := await events.get()) is not None:
        yield (json.dumps(event) + "\n").encode()
    try:
        manifest = task.result()
    except LLMasOSError as error:  # the 200 has gone out: the error is the last line
        yield (json.dumps(user_error(error).body()) + "\n").encode()
        return
    yield (
        json.dumps({"status": "success", "name": manifest.name, "digest": manifest.digest}) + "\n"
    ).encode()
