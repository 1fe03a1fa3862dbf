"""Tiny LoRA adapters of a store model, made with peft as `llmasos finetune --method lora` stores them:
random A and B (peft starts B at zero, which would adapt nothing), the base named by its store name,
and the base's config and tokenizer beside the adapter's files."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from llmasos.models.loader import transformers_causal_lm
from llmasos.train.finetune import LORA_TARGETS, TOKENIZER_FILES


def save_tiny_lora(
    store, base: str, name: str, seed: int, work: Path, rank: int = 8, targets: list[str] = LORA_TARGETS
) -> Path:
    """Import into `store` a random rank-`rank` adapter of `base` under `name`; returns its store folder."""
    from peft import LoraConfig, get_peft_model

    base_dir = store.path(base)
    model = transformers_causal_lm(base_dir, torch.float32)  # a GGUF model's folder holds no safetensors
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    with torch.no_grad():  # an update as large as fine-tuning's, so each adapter answers differently
        for param_name, param in peft_model.named_parameters():
            if "lora_" in param_name:
                param.normal_(0, 0.3)
    peft_model.peft_config["default"].base_model_name_or_path = base
    folder = work / name
    peft_model.save_pretrained(folder, save_embedding_layers=False)
    for file in ("config.json", "generation_config.json", *TOKENIZER_FILES):
        if (base_dir / file).is_file():
            shutil.copy(base_dir / file, folder / file)
    store.import_path(folder, name, progress=False)
    return store.path(name)
