"""The engines a model runs on, and the one switch that picks among them (`open_model`).

Three engines run models; `route` picks one from config.json alone, the one place that decides:
- decoders (the families of llmasos.models.DRIVERS) run on the paged kernel: `PagedBackend`
  (runtime/paged.py) around the kernel's LLMEngine;
- encoders with a native driver (BERT, llmasos.models.ENCODERS) make sentence embeddings with
  `SentenceEmbedder` (runtime/embedder.py);
- the rest (T5 and BART, classifier heads, encoders without a native driver such as RoBERTa) run on
  transformers: `TransformersEngine` (runtime/transformers_engine.py).
Each is a `Backend` (runtime/backend.py). `LLM`, the server's registry, the safety judges and the
lm-evaluation-harness backend all open models here, so a model runs the same way whoever asks.

Importing this package loads nothing heavy: an engine's module loads when a model of its kind opens.
"""

from __future__ import annotations

from pathlib import Path

from llmasos.config import EngineConfig
from llmasos.runtime.backend import KINDS, Backend, Route, model_kind, route

__all__ = ["KINDS", "Backend", "Route", "model_kind", "open_model", "route"]


def open_model(model: str, config: EngineConfig | None = None, model_dir: Path | None = None) -> Backend:
    """Resolve `model` through the store (a name, or a folder used in place) and load it on the engine
    its kind runs on. `config` is the EngineConfig: the kernel takes all of it; the other engines take
    `device`, `dtype` (float32 when unset: these models are small and compared by cosine or against
    transformers) and, for the transformers engine, `max_num_seqs` as its batch size.

    A BERT encoder embeds with `SentenceEmbedder`, never with transformers: it follows the folder's
    sentence-transformers recipe whole (the Pooling and Normalize modules, but also max_seq_length,
    do_lower_case, truncation that keeps [CLS]/[SEP]) and takes token ids, which the transformers path
    does not, and it serves /v1/embeddings without importing transformers.
    """
    import torch

    from llmasos.store import ModelStore

    config = config or EngineConfig()
    model_dir = model_dir or ModelStore().resolve(model)
    engine = route(model_dir).engine
    if engine == "paged":
        from llmasos.kernel.engine import LLMEngine
        from llmasos.runtime.paged import PagedBackend

        return PagedBackend(LLMEngine(model, config, model_dir))
    dtype = getattr(torch, config.dtype or "float32")
    if engine == "embedder":
        from llmasos.runtime.embedder import SentenceEmbedder

        return SentenceEmbedder.from_dir(model_dir, config.device, dtype, name=model)
    from llmasos.runtime.transformers_engine import TransformersEngine

    return TransformersEngine(model_dir, config.device, dtype, config.max_num_seqs, name=model)
