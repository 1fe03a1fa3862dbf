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
from llmasos.models.gguf import GGUF_BLOCKS_FILE


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

    files = sorted(f for f in model_dir.glob("*.safetensors") if f.name != GGUF_BLOCKS_FILE)
    if not files:
        raise UnsupportedModelError(
            f"{model_dir} has no *.safetensors weights (other formats are not supported)"
        )
    for file in files:
        with safe_open(file, framework="pt", device=device) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_weights(
    model: nn.Module, weights: Iterator[tuple[str, torch.Tensor]], held: set[str] = frozenset()
) -> None:
    """Fill every parameter from the checkpoint; `held` names weights already in quantized blocks."""
    params = dict(model.named_parameters())
    loaded: set[tuple[str, int | None]] = set()
    for ckpt_name, tensor in weights:
        mapped = model.map_weight(ckpt_name, tensor)
        if mapped is None or mapped[0] in held:
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


def use_gguf_blocks(model: nn.Module, model_dir: Path) -> set[str]:
    """Swap in QuantLinear/QuantEmbedding where the folder has GGUF blocks; returns the weights they hold.

    Packed parameters (q/k/v, gate/up) are swapped only when every part is in the same layout;
    anything else stays float. With tied embeddings the LM head shares the embedding's blocks.
    """
    from safetensors import safe_open

    from llmasos.ops.quant import QuantEmbedding, QuantLinear

    path = model_dir / GGUF_BLOCKS_FILE
    if not path.exists():
        return set()
    parts: dict[str, dict[int, tuple[torch.Tensor, str]]] = {}
    with safe_open(path, framework="pt") as f:
        layouts = f.metadata()
        for ckpt_name in f.keys():
            mapped = model.map_weight(ckpt_name, torch.empty(0))
            if mapped is not None:
                name, shard, _ = mapped
                parts.setdefault(name, {})[shard or 0] = (f.get_tensor(ckpt_name), layouts[ckpt_name])
    held = set()
    for name, shards in parts.items():
        module_name = name.removesuffix(".weight")
        module = model.get_submodule(module_name)
        expected = len(model.shard_sizes(name) or [None])
        layout = {lay for _, lay in shards.values()}
        if len(shards) != expected or len(layout) != 1:
            continue
        blocks, layout = torch.cat([shards[i][0] for i in range(expected)]), layout.pop()
        if isinstance(module, nn.Embedding):
            replacement = QuantEmbedding(blocks, layout, module.embedding_dim)
        else:
            replacement = QuantLinear(blocks, layout, module.in_features, bias=module.bias is not None)
        model.set_submodule(module_name, replacement)
        held.add(name)
    if getattr(model.config, "tie_word_embeddings", False) and "embed_tokens.weight" in held:
        embed = model.embed_tokens
        model.lm_head = QuantLinear(embed.blocks, embed.qtype, embed.embedding_dim)
    return held


def load_model(
    model_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    gguf_blocks: bool = False,
    encoder: bool = False,
) -> nn.Module:
    """The folder's driver with its weights: a decoder for the kernel, or with `encoder` an embedder's."""
    hf_config = read_hf_config(model_dir)
    model_cls, config_cls = get_driver(hf_config, encoder)
    cfg = config_cls.from_hf(hf_config)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = model_cls(cfg)
    finally:
        torch.set_default_dtype(default_dtype)
    model = model.to_empty(device=device)
    held = use_gguf_blocks(model, model_dir) if gguf_blocks else set()
    if getattr(cfg, "tie_word_embeddings", False) and "embed_tokens.weight" not in held:
        model.lm_head.weight = model.embed_tokens.weight  # to_empty unties shared parameters
    with torch.no_grad():
        load_weights(model, iter_safetensors(model_dir, "cpu"), held)
    return model.eval()
