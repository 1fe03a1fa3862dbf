"""LLMasOS: an operating system for open large language models.

`from llmasos import LLM, SamplingParams` is the whole user-facing surface for offline use;
heavy modules (torch, the drivers) load only when a model is.
"""

from llmasos.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "AsyncLLM", "SamplingParams", "EngineConfig"]


def __getattr__(name: str):
    if name in ("LLM", "AsyncLLM"):
        from llmasos import api

        return getattr(api, name)
    if name == "EngineConfig":
        from llmasos.config import EngineConfig

        return EngineConfig
    raise AttributeError(f"module 'llmasos' has no attribute {name!r}")
