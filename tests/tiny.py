"""Tiny random models of every native family, saved with transformers' `save_pretrained`.

Model hubs are unreachable from tests, so each test builds its own model folder: random weights
from a fixed seed, a small byte-level BPE tokenizer trained on a few sentences, and a chat
template, exactly the files a real Hugging Face model folder has.
"""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "Once upon a time there was a small model that wanted to run on every machine.",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "def add(a, b):\n    return a + b\n",
    "Hello, world! How are you today? I am fine, thank you.",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB_SIZE = 384


def save_tokenizer(path: Path) -> int:
    """A byte-level BPE tokenizer with <|im_start|>/<|im_end|> specials; returns its EOS id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - 16,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast.convert_tokens_to_ids("<|im_end|>")


def hf_config(family: str, eos_token_id: int):
    import transformers as tf

    common = dict(vocab_size=VOCAB_SIZE, eos_token_id=eos_token_id, bos_token_id=0)
    llama_like = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **common,
    )
    if family == "llama":
        return tf.LlamaConfig(**llama_like)
    if family == "llama3":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64, "rope_theta": 500000.0}  # fmt: skip
        return tf.LlamaConfig(**llama_like, rope_parameters=rope)
    if family == "mistral":
        return tf.MistralConfig(**llama_like, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**llama_like, tie_word_embeddings=True)
    if family == "qwen3":
        return tf.Qwen3Config(**llama_like, head_dim=32)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
    raise ValueError(family)


FAMILIES = ["llama", "llama3", "mistral", "qwen2", "qwen3", "gpt2"]


def save_tiny_model(path: Path, family: str = "llama", seed: int = 0, **save_kwargs) -> Path:
    from transformers import AutoModelForCausalLM

    eos = save_tokenizer(path)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, eos))
    with torch.no_grad():  # random init is small; widen it so logits are far from ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model.save_pretrained(path, **save_kwargs)
    return path
