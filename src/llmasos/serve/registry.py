"""Which models are in memory: loaded on first use, kept alive for a while, evicted LRU under a budget.

Like an OS's process table for models. Models open through the runtime's one switch
(`llmasos.runtime.open_model`): a decoder is served by an `AsyncLLM` around its engine (with its
engine thread), a sentence-embedding encoder by its `SentenceEmbedder`. Loading runs in a worker
thread so the event loop keeps serving, and concurrent first uses of a model share one load. When
loading would go over the memory budget, idle models (no request in flight) are unloaded least
recently used first; if that cannot make room, the request gets a 503 rather than the machine running
out of memory.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from llmasos.config import EngineConfig
from llmasos.errors import LLMasOSError, ModelNotFoundError, UnsupportedModelError
from llmasos.serve.errors import APIError

if TYPE_CHECKING:
    from llmasos.api import AsyncLLM
    from llmasos.runtime.embedder import SentenceEmbedder

log = logging.getLogger("llmasos.serve")


@dataclass
class LoadedModel:
    name: str
    served: AsyncLLM | SentenceEmbedder  # what requests go to: a decoder's engine thread, or an embedder
    memory_bytes: int
    is_embedder: bool
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)  # embedders run one batch at a time

    def healthy(self) -> bool:
        return self.is_embedder or self.served.alive


def _tensor_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _servable_dir(name: str) -> Path:
    """The model's folder, once its route says the server can serve it: before anything is loaded or
    unloaded to make room for it."""
    from llmasos.runtime import route
    from llmasos.store import ModelStore

    try:
        model_dir = ModelStore().resolve(name)
        found = route(model_dir)
    except ModelNotFoundError as exc:
        raise APIError(404, str(exc), param="model", code="model_not_found") from exc
    except UnsupportedModelError as exc:
        raise APIError(400, str(exc), param="model", code="model_not_supported") from exc
    if found.engine == "transformers":
        raise APIError(
            400,
            f"{name} is a {found.kind} model, which the server does not serve: it serves decoders "
            "(generation) and sentence-embedding encoders; run it with llmasos.LLM",
            param="model",
            code="model_not_supported",
        )
    return model_dir


def _load(name: str, model_dir: Path, config: EngineConfig) -> LoadedModel:
    from llmasos.runtime import open_model

    backend = open_model(name, config, model_dir)
    if backend.kind == "encoder":
        return LoadedModel(name, backend, _tensor_bytes(backend.model), is_embedder=True)
    from llmasos.api import AsyncLLM

    llm = AsyncLLM(name, engine=backend.engine)
    return LoadedModel(name, llm, llm.engine.memory_bytes, is_embedder=False)


def _unload(model: LoadedModel) -> None:
    if not model.is_embedder:
        model.served.shutdown()
        model.served.engine.shutdown()  # its workers, if split; its disk cache's queued writes
    model.served = None  # drop the last reference before collecting
    gc.collect()


@dataclass
class RegistryConfig:
    models: list[str]  # what may be served; empty: every model in the store
    engine: EngineConfig
    memory_budget_bytes: int | None = None  # None: no limit
    keep_alive_s: float = 300.0  # idle time before a model is unloaded; < 0 keeps models forever


class ModelRegistry:
    def __init__(self, config: RegistryConfig):
        self.config = config
        self.loaded: dict[str, LoadedModel] = {}
        self._loading: dict[str, asyncio.Task] = {}

    def servable(self) -> list[str]:
        if self.config.models:
            return list(self.config.models)
        from llmasos.store import ModelStore

        return [entry.name for entry in ModelStore().list()]

    def check_servable(self, name: str) -> None:
        if name not in self.servable():
            raise APIError(
                404,
                f"the model {name!r} is not served here; GET /v1/models lists the models this server serves",
                param="model",
                code="model_not_found",
            )

    async def acquire(self, name: str) -> LoadedModel:
        """The loaded model, loading it if needed; counts a request in flight until `release`."""
        self.check_servable(name)
        model = self.loaded.get(name)
        if model is None:
            task = self._loading.get(name)
            if task is None:
                task = self._loading[name] = asyncio.ensure_future(self._load(name))
                task.add_done_callback(lambda _: self._loading.pop(name, None))
            model = await asyncio.shield(task)
        model.in_flight += 1
        model.last_used = time.monotonic()
        return model

    def release(self, model: LoadedModel) -> None:
        model.in_flight -= 1
        model.last_used = time.monotonic()

    async def _load(self, name: str) -> LoadedModel:
        model_dir = _servable_dir(name)
        self._make_room(self._estimate_bytes(model_dir))
        try:
            model = await asyncio.to_thread(_load, name, model_dir, self.config.engine)
        except LLMasOSError as exc:
            raise APIError(500, f"the model {name!r} could not be loaded: {exc}") from exc
        self.loaded[name] = model
        log.info("loaded %s (%.1f MiB)", name, model.memory_bytes / 2**20)
        try:  # the estimate may have been low (a KV cache sized at load): settle with the real size
            self._make_room(0, keep=name)
        except APIError:
            log.warning("over the memory budget with every other model busy: %s stays loaded", name)
        return model

    def _estimate_bytes(self, model_dir: Path) -> int:
        """What a load will take, before it happens: the weight files, plus the KV cache if configured."""
        files = [*model_dir.glob("*.safetensors"), *model_dir.glob("model.gguf")]  # a GGUF model's weights
        weights = sum(p.stat().st_size for p in files)
        kv_gib = self.config.engine.kv_cache_gib
        return weights + int((kv_gib or 0) * 2**30)

    def _make_room(self, needed: int, keep: str | None = None) -> None:
        """Unload idle models, least recently used first, until `needed` more bytes fit the budget."""
        budget = self.config.memory_budget_bytes
        if budget is None:
            return
        idle = sorted(
            (m for m in self.loaded.values() if m.in_flight == 0 and m.name != keep),
            key=lambda m: m.last_used,
        )
        while self.memory_in_use() + needed > budget and idle:
            self.unload(idle.pop(0).name)
        if self.memory_in_use() + needed > budget:
            raise APIError(
                503,
                f"loading this model needs about {needed / 2**20:.0f} MiB but the memory budget has "
                f"{(budget - self.memory_in_use()) / 2**20:.0f} MiB free and every loaded model is busy; "
                "retry later",
                retry_after=5,
            )

    def memory_in_use(self) -> int:
        return sum(m.memory_bytes for m in self.loaded.values())

    def unload(self, name: str) -> None:
        model = self.loaded.pop(name, None)
        if model is not None:
            _unload(model)
            log.info("unloaded %s", name)

    def expire_idle(self) -> list[str]:
        """Unload models idle for longer than the keep-alive; returns their names."""
        if self.config.keep_alive_s < 0:
            return []
        now = time.monotonic()
        expired = [
            m.name
            for m in self.loaded.values()
            if m.in_flight == 0 and now - m.last_used > self.config.keep_alive_s
        ]
        for name in expired:
            self.unload(name)
        return expired

    def close(self) -> None:
        for name in list(self.loaded):
            self.unload(name)
