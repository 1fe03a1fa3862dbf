"""Load a model folder (HF layout: config.json + safetensors shards) into a native driver.

The driver is built on the meta device (no time spent on random init), materialized empty on
the target device, then every parameter is filled from the checkpoint; a tensor the driver does
not expect, a wrong shape or a missing one is an error, never a silently random weight.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from llmasos.errors import UnsupportedModelError
from llmasos.models import get_driver


def read_hf_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.exists():
        raise UnsupportedModelError(
            f"{model_dir} has no config.json; a model folder needs config.json, *.safetensors "
            "and tokenizer files"
        )
    return json.loads(path.read_text())


def iter_safetensors(model_dir: Path, device: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(
            f"{model_dir} has no *.safetensors weights (other formats are not supported)"
        )
    for file in files:
        with safe_open(file, framework="pt", device=device) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_weights(model: nn.Module, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    params = dict(model.named_parameters())
    loaded: set[tuple[str, int | None]] = set()
    for ckpt_name, tensor in weights:
        mapped = model.map_weight(ckpt_name, tensor)
        if mapped is None:
            continue
        name, shard, tensor = mapped
        if name not in params:
            raise UnsupportedModelError(
                f"unexpected weight {ckpt_name!r} in the checkpoint for this architecture"
            )
        target = params[name].data
        if shard is not None:
            sizes = model.shard_sizes(name)
            offset = sum(sizes[:shard])
            target = target[offset : offset + sizes[shard]]
        if target.shape != tensor.shape:
            raise UnsupportedModelError(
                f"weight {ckpt_name!r} has shape {tuple(tensor.shape)}, "
                f"the config implies {tuple(target.shape)}"
            )
        target.copy_(tensor)
        loaded.add((name, shard))
    missing = []
    for name in params:
        sizes = model.shard_sizes(name)
        shards = range(len(sizes)) if sizes else [None]
        missing += [name for shard in shards if (name, shard) not in loaded][:1]
    if missing:
        raise UnsupportedModelError(f"the checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")


def load_model(model_dir: Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    hf_config = read_hf_config(model_dir)
    model_cls, config_cls = get_driver(hf_config)
    cfg = config_cls.from_hf(hf_config)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = model_cls(cfg)
    finally:
        torch.set_default_dtype(default_dtype)
    model = model.to_empty(device=device)
    if getattr(cfg, "tie_word_embeddings", False):
        model.lm_head.weight = model.embed_tokens.weight  # to_empty unties shared parameters
    with torch.no_grad():
        load_weights(model, iter_safetensors(model_dir, "cpu"))
    return model.eval()
