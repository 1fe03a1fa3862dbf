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


def get_driver(hf_config: dict) -> tuple[type, type]:
    """(model class, config class) for a Hugging Face config.json."""
    import importlib

    architectures = hf_config.get("architectures") or []
    for arch in architectures:
        if arch in DRIVERS:
            module_name, model_name, config_name = DRIVERS[arch]
            module = importlib.import_module(f"llmasos.models.{module_name}")
            return getattr(module, model_name), getattr(module, config_name)
    raise UnsupportedModelError(
        f"architecture {architectures or hf_config.get('model_type')!r} is not supported; "
        f"supported: {', '.join(DRIVERS)}"
    )
