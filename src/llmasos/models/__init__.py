"""Device drivers: one model family per file, picked by the checkpoint's `architectures` field."""

from __future__ import annotations

from llmasos.errors import UnsupportedModelError

# architecture name in config.json -> (module, model class, config class)
DRIVERS = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM", "LlamaConfig"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM", "LlamaConfig"),
    "Qwen2ForCausalLM": ("llama", "LlamaForCausalLM", "LlamaConfig"),
    "Qwen3ForCausalLM": ("llama", "LlamaForCausalLM", "LlamaConfig"),
    "GPT2LMHeadModel": ("gpt2", "GPT2LMHeadModel", "GPT2Config"),
}

# Encoders turn text into hidden states for embeddings (llmasos/runtime/embedder.py), not into logits: the
# kernel cannot run them, so they have their own table. A masked-LM checkpoint is the same encoder
# with a head that the driver skips.
ENCODERS = {
    "BertModel": ("bert", "BertModel", "BertConfig"),
    "BertForMaskedLM": ("bert", "BertModel", "BertConfig"),
}


def is_encoder(hf_config: dict) -> bool:
    """True for a checkpoint that the embedder runs, not the kernel."""
    return any(arch in ENCODERS for arch in hf_config.get("architectures") or [])


def get_driver(hf_config: dict, encoder: bool = False) -> tuple[type, type]:
    """(model class, config class) for a Hugging Face config.json: a decoder, or with `encoder` an encoder."""
    import importlib

    drivers = ENCODERS if encoder else DRIVERS
    architectures = hf_config.get("architectures") or []
    for arch in architectures:
        if arch in drivers:
            module_name, model_name, config_name = drivers[arch]
            module = importlib.import_module(f"llmasos.models.{module_name}")
            return getattr(module, model_name), getattr(module, config_name)
    if not encoder and is_encoder(hf_config):
        raise UnsupportedModelError(
            f"{', '.join(architectures)} is an embedding model: it turns text into vectors "
            "(POST /v1/embeddings), it does not generate text"
        )
    raise UnsupportedModelError(
        f"architecture {architectures or hf_config.get('model_type')!r} is not supported; "
        f"supported: {', '.join(drivers)}"
    )
