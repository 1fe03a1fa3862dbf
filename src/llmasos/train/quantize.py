"""`llmasos quantize MODEL --to int8|int4`: a quantized copy of a model, stored beside it.

The copy is the model's folder plus `gguf_blocks.safetensors`: every matrix of the decoder (and
the embedding) in GGUF blocks, Q8_0 for int8 and Q4_1 for int4, the layouts the CPU kernel runs
directly (`ops/quant.py`). Everything else is the same files, so the store shares their blobs;
the float weights stay for devices that do not run the blocks (GPU): the safetensors, or a GGUF
model's `model.gguf`, whose own blocks these replace.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from llmasos.errors import LLMasOSError
from llmasos.store.store import Manifest, ModelStore

TARGETS = {"int8": "Q8_0", "int4": "Q4_1"}
# The vocabulary matrices (input embedding, output head) stay in 8 bits at int4, as llama.cpp's 4-bit
# mixes keep them: each row is one token, so 4-bit error there goes straight into the logits (on
# SmolLM2, all-Q4_1 costs +5.7% perplexity; with these at Q8_0, as in its own GGUF, the float figure).
HIGH_PRECISION = ("embed_tokens", "lm_head")
QUANTIZABLE_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def quantize_model(store: ModelStore, model: str, to: str, name: str | None = None) -> Manifest:
    from safetensors.torch import save_file

    from llmasos.models.loader import iter_weights, read_hf_config
    from llmasos.ops.quant import BLOCK, quantize_blocks
    from llmasos.store.gguf import GGUF_BLOCKS_FILE

    if to not in TARGETS:
        raise LLMasOSError(f"cannot quantize to {to!r}; choose one of: {', '.join(TARGETS)}")
    source = store.resolve(model)
    architectures = read_hf_config(source).get("architectures") or []
    if not any(arch in QUANTIZABLE_ARCHITECTURES for arch in architectures):
        raise LLMasOSError(
            f"{model} is {', '.join(architectures) or 'of no known architecture'}; quantize takes the "
            f"Llama family ({', '.join(QUANTIZABLE_ARCHITECTURES)})"
        )
    if (source / "adapter_config.json").is_file():
        raise LLMasOSError(f"{model} is a LoRA adapter; quantize a merged model (`llmasos finetune --merge`)")
    layout = TARGETS[to]
    blocks, layouts = {}, {}
    for key, tensor in iter_weights(source):  # a GGUF model's dequantized from its file
        if tensor.dim() == 2 and "norm" not in key and tensor.shape[1] % BLOCK == 0:
            kept = "Q8_0" if any(part in key for part in HIGH_PRECISION) else layout
            blocks[key], layouts[key] = quantize_blocks(tensor, kept), kept
    if not blocks:
        raise LLMasOSError(
            f"{model} has no matrix whose rows are a multiple of {BLOCK} long; nothing to quantize"
        )
    with tempfile.TemporaryDirectory() as work:  # not the store's tmp/: import_path clears that
        folder = Path(work) / "model"
        for path in source.rglob("*"):  # links to the blobs: nothing is copied, the store dedups
            if path.is_file() and path.name != GGUF_BLOCKS_FILE:
                (folder / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
                (folder / path.relative_to(source)).symlink_to(path.resolve())
        save_file(blocks, str(folder / GGUF_BLOCKS_FILE), layouts)
        return store.import_path(folder, name or f"{model}-{to}")
