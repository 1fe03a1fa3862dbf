"""Load a model folder (HF layout: config.json + safetensors shards) into a native driver.

The driver is built on the meta device (no time spent on random init), materialized empty on
the target device, then every parameter is filled from the checkpoint; a tensor the driver does
not expect, a wrong shape or a missing one is an error, never a silently random weight.

A folder can also be a LoRA adapter (peft's adapter_config.json + adapter_model.safetensors, as
`llmasos finetune --method lora` stores it): then the base model it names is loaded and each
adapted matrix gets W + (B @ A) * alpha / r as it streams past, before the driver packs q/k/v and
gate/up, so the kernel runs the tuned model at full speed with no LoRA code in the hot path.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import nn

from llmasos.errors import LLMasOSError, StoreError, UnsupportedModelError
from llmasos.models import get_driver
from llmasos.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_lora
from llmasos.models.parallel import SINGLE, TensorParallel, quant_linear, shard_blocks
from llmasos.store.gguf import GGUF_BLOCKS_FILE
from llmasos.store.gguf_tensors import GGUFTensors, is_gguf_folder


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

    files = sorted(
        f for f in model_dir.glob("*.safetensors") if f.name not in (GGUF_BLOCKS_FILE, ADAPTER_WEIGHTS)
    )
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
        module_name, _, leaf = name.rpartition(".")
        load_shard = getattr(model.get_submodule(module_name), "load_shard", None)
        if load_shard is not None:  # a tensor-parallel layer takes its rank's rows (models/parallel.py)
            tensor = load_shard(leaf, tensor, shard)
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


def use_gguf_blocks(model: nn.Module, model_dir: Path, activation_bits: int = 16) -> set[str]:
    """Swap in QuantLinear/QuantEmbedding where the folder has GGUF blocks; returns the weights they hold.

    The blocks are `llmasos quantize`'s (gguf_blocks.safetensors) where the folder has them, else a
    GGUF model's own, repacked straight from its memory-mapped file. Packed parameters (q/k/v,
    gate/up) are swapped only when every part is in the same layout; anything else stays float. With
    tied embeddings the LM head shares the embedding's packed blocks.
    """
    from llmasos.ops.quant import QuantEmbedding, QuantLinear, pack_blocks

    with ExitStack() as stack:
        sources, release = _block_sources(model_dir, stack)
        parts: dict[str, dict[int, tuple[Callable[[], torch.Tensor], str]]] = {}
        for ckpt_name, (fetch, layout) in sources.items():
            mapped = model.map_weight(ckpt_name, torch.empty(0))
            if mapped is not None:
                name, shard, _ = mapped
                parts.setdefault(name, {})[shard or 0] = (fetch, layout)
        held = set()
        for name, shards in parts.items():
            module_name = name.removesuffix(".weight")
            module = model.get_submodule(module_name)
            expected = len(model.shard_sizes(name) or [None])
            layout = {lay for _, lay in shards.values()}
            kind_ok = isinstance(module, (nn.Linear, nn.Embedding))
            if len(shards) != expected or len(layout) != 1 or not kind_ok:
                continue  # (a vocabulary split over ranks keeps its float32 copy)
            layout = layout.pop()
            # a tensor-parallel rank's part of each (models/parallel.py)
            split = [
                shard_blocks(module, fetch(), i if expected > 1 else None, layout)
                for i, (fetch, _) in sorted(shards.items())
            ]
            if any(blocks is None for blocks in split):
                continue
            packed, rows = pack_blocks(split, layout), sum(blocks.shape[0] for blocks in split)
            del split
            release()  # a mapped GGUF's pages that were read: the packed copy is what stays
            if isinstance(module, nn.Embedding):
                replacement = QuantEmbedding(packed, layout, rows, module.embedding_dim)
            else:
                replacement = quant_linear(module, packed, layout, activation_bits)
            model.set_submodule(module_name, replacement)
            held.add(name)
    if getattr(model.config, "tie_word_embeddings", False) and "embed_tokens.weight" in held:
        embed = model.embed_tokens
        model.lm_head = QuantLinear(
            embed.packed,
            embed.qtype,
            embed.embedding_dim,
            embed.num_embeddings,
            activation_bits=activation_bits,
        )  # the same bytes
    return held


def _block_sources(
    model_dir: Path, stack: ExitStack
) -> tuple[dict[str, tuple[Callable[[], torch.Tensor], str]], Callable[[], None]]:
    """(checkpoint name -> (a function reading its [rows, bytes] GGUF blocks, layout), a function that
    drops the pages of a mapped GGUF read so far). Nothing is read before it is asked for; files
    stay open until `stack` closes."""
    from safetensors import safe_open

    path = model_dir / GGUF_BLOCKS_FILE
    if path.exists():
        f = stack.enter_context(safe_open(path, framework="pt"))
        layouts = f.metadata()
        sources = {name: (functools.partial(f.get_tensor, name), layouts[name]) for name in f.keys()}
        return sources, lambda: None
    if not is_gguf_folder(model_dir):
        return {}, lambda: None
    reader = stack.enter_context(GGUFTensors(model_dir))
    sources = {
        name: (functools.partial(lambda n: reader.blocks(n)[0], name), reader.entries[name].type)
        for name in reader.block_names()
    }
    return sources, reader.release_all


def iter_weights(
    model_dir: Path, skip: Callable[[str], bool] = lambda name: False
) -> Iterator[tuple[str, torch.Tensor]]:
    """The folder's float weights by checkpoint name: its safetensors, or a GGUF model's tensors
    dequantized one at a time from its file (none for the names `skip` says are not needed)."""
    if not is_gguf_folder(model_dir):
        yield from ((name, t) for name, t in iter_safetensors(model_dir, "cpu") if not skip(name))
        return
    with GGUFTensors(model_dir) as reader:
        yield from reader.floats(skip)


def transformers_causal_lm(folder: Path, dtype: torch.dtype, **kwargs):
    """`AutoModelForCausalLM.from_pretrained` of a model folder, a GGUF model's too (its config and
    the floats `iter_weights` dequantizes: transformers would read the GGUF again, slowly, and needs
    the `gguf_file` argument). `kwargs` go to from_pretrained (output_loading_info, ...)."""
    import transformers

    if not is_gguf_folder(folder):
        return transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, local_files_only=True, **kwargs
        )
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    model_class = getattr(transformers, (config.architectures or ["?"])[0], None)
    if model_class is None:
        raise UnsupportedModelError(
            f"{folder}/config.json names no transformers model class; import it again"
        )
    return model_class.from_pretrained(
        None, config=config, state_dict=dict(iter_weights(folder)), dtype=dtype, **kwargs
    )


def adapter_base(adapter_dir: Path) -> Path:
    """The folder of the base model a LoRA adapter folder names, checked to be the one it was trained on.

    The reference is peft's `base_model_name_or_path`: a store name (or a local folder). The model
    card records the base's digest, so a base replaced under the same name is caught here instead
    of silently running the adapter over weights it was not trained for.
    """
    from llmasos.store import ModelStore

    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise UnsupportedModelError(
            f"{adapter_dir / ADAPTER_CONFIG} names no base model (base_model_name_or_path)"
        )
    store = ModelStore()
    base_dir = store.resolve(base, progress=False)
    if (base_dir / ADAPTER_CONFIG).is_file():
        raise UnsupportedModelError(f"the base of adapter {adapter_dir.name}, {base}, is itself an adapter")
    card_path = adapter_dir / "model_card.json"
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    expected = (card.get("base_model") or {}).get("digest")
    if expected and _is_store_name(store, base) and store.get(base).digest != expected:
        raise StoreError(
            f"adapter {adapter_dir.name} was trained on {base} {expected}, but the store's {base} is now "
            f"{store.get(base).digest}; put that model back under the name {base}, or fine-tune again"
        )
    return base_dir


def _is_store_name(store, name: str) -> bool:
    try:
        store.get(name)
    except LLMasOSError:  # a local folder: no digest to compare
        return False
    return True


def lora_deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Checkpoint weight name -> the float32 update (B @ A) * scaling a peft LoRA adapter makes to it."""
    adapter = read_lora(adapter_dir)
    return {f"{module}.weight": (b @ a) * adapter.scaling for module, (a, b) in adapter.matrices.items()}


def merged(
    weights: Iterator[tuple[str, torch.Tensor]], deltas: dict[str, torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors with the adapter's updates added, in float32; every update must land."""
    unused = set(deltas)
    for name, tensor in weights:
        if name in deltas:
            tensor = tensor.float() + deltas[name]
            unused.discard(name)
        yield name, tensor
    if unused:
        raise UnsupportedModelError(
            f"the adapter updates weights its base model does not have, e.g. {sorted(unused)[:3]}; "
            "it was trained on another model"
        )


def load_model(
    model_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    gguf_blocks: bool = False,
    encoder: bool = False,
    activation_bits: int = 16,
    tp: TensorParallel = SINGLE,
) -> nn.Module:
    """The folder's driver with its weights: a decoder for the kernel, or with `encoder` an embedder's.

    An adapter folder loads its base in float (GGUF blocks off: the updates need float matrices).
    `tp`: a decoder split over several ranks gets this rank's shard of each matrix.
    """
    weights_dir, deltas = model_dir, {}
    if (model_dir / ADAPTER_CONFIG).is_file():
        weights_dir, deltas, gguf_blocks = adapter_base(model_dir), lora_deltas(model_dir), False
    hf_config = read_hf_config(weights_dir)
    model_cls, config_cls = get_driver(hf_config, encoder)
    cfg = config_cls.from_hf(hf_config)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = model_cls(cfg) if encoder else model_cls(cfg, tp)
    finally:
        torch.set_default_dtype(default_dtype)
    # to_empty's empty_like goes through torch's Python meta decompositions for meta tensors (their
    # import and the calls cost ~2 s of a 4 s cold start); torch.empty is one C++ call a tensor
    model = model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
    held = use_gguf_blocks(model, weights_dir, activation_bits) if gguf_blocks else set()
    if getattr(cfg, "tie_word_embeddings", False) and "embed_tokens.weight" not in held:
        model.lm_head.weight = model.embed_tokens.weight  # a fresh tensor a parameter unties shared ones

    def in_blocks(ckpt_name: str) -> bool:  # no float copy is made of what the blocks hold
        mapped = model.map_weight(ckpt_name, torch.empty(0))
        return mapped is not None and mapped[0] in held

    with torch.no_grad():
        load_weights(model, merged(iter_weights(weights_dir, in_blocks), deltas), held)
    return model.eval()
