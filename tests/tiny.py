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
# Qwen2.5's template in short (its tool instructions and schemas would fill the tiny model's 256
# positions): the tools' names in the system message, calls as <tool_call> JSON, results as <tool_response>
TOOLS_CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}\n{{ t.function.name }}{% endfor %}"
    "\n</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}"
    "\n</tool_response><|im_end|>\n{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}\n<tool_call>\n{{ {'name': c.function.name, "
    "'arguments': c.function.arguments} | tojson }}\n</tool_call>{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tokenizer(path: Path, chat_template: str = CHAT_TEMPLATE) -> int:
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
    fast.chat_template = chat_template
    fast.save_pretrained(path)
    return fast.convert_tokens_to_ids("<|im_end|>")


def hf_config(family: str, eos_token_id: int, draft: bool = False):
    """The family's tiny config; draft: a smaller one of the same vocabulary (a speculative draft model)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB_SIZE, eos_token_id=eos_token_id, bos_token_id=0)
    llama_like = dict(
        hidden_size=32 if draft else 64,
        intermediate_size=64 if draft else 128,
        num_hidden_layers=1 if draft else 2,
        num_attention_heads=2 if draft else 4,
        num_key_value_heads=1 if draft else 2,
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
        return tf.GPT2Config(n_embd=32 if draft else 64, n_layer=1 if draft else 2, n_head=2 if draft else 4,
                             n_positions=256, **common)  # fmt: skip
    raise ValueError(family)


FAMILIES = ["llama", "llama3", "mistral", "qwen2", "qwen3", "gpt2"]


def save_tiny_model(
    path: Path,
    family: str = "llama",
    seed: int = 0,
    chat_template: str = CHAT_TEMPLATE,
    draft: bool = False,
    **save_kwargs,
) -> Path:
    from transformers import AutoModelForCausalLM

    eos = save_tokenizer(path, chat_template)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, eos, draft))
    with torch.no_grad():  # random init is small; widen it so logits are far from ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model.save_pretrained(path, **save_kwargs)
    return path


def save_tiny_bert(path: Path, pooling: str = "mean", normalize: bool = True, seed: int = 0) -> Path:
    """A tiny random BertModel laid out as a sentence-transformers folder.

    A WordPiece tokenizer whose post-processor adds [CLS]/[SEP], saved with the fixed padding and
    truncation to 128 that all-MiniLM-L6-v2's tokenizer.json carries; modules.json, 1_Pooling and
    sentence_bert_config.json (max_seq_length 48 of 64 positions) as sentence-transformers writes them.
    """
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )  # fmt: skip
    fast.save_pretrained(path)
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]", length=128)
    tok.enable_truncation(max_length=128)
    tok.save(str(path / "tokenizer.json"))

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64,
    )  # fmt: skip
    model = BertModel(config)
    with torch.no_grad():  # widen the init, biases and LayerNorms included, so a misplaced weight shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.2 if p.dim() > 1 else 0.1))
    model.save_pretrained(path)

    kinds = ["Transformer", "Pooling"] + ["Normalize"] * normalize
    paths = {"Transformer": "", "Pooling": "1_Pooling", "Normalize": "2_Normalize"}
    modules = [
        {"idx": i, "name": str(i), "path": paths[kind], "type": f"sentence_transformers.models.{kind}"}
        for i, kind in enumerate(kinds)
    ]
    (path / "modules.json").write_text(json.dumps(modules, indent=2))
    keys = {
        "cls": "pooling_mode_cls_token",
        "mean": "pooling_mode_mean_tokens",
        "max": "pooling_mode_max_tokens",
        "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
        "weightedmean": "pooling_mode_weightedmean_tokens",
        "lasttoken": "pooling_mode_lasttoken",
    }
    (path / "1_Pooling").mkdir(exist_ok=True)
    pooling_config = {"word_embedding_dimension": 64, **{key: mode == pooling for mode, key in keys.items()}}
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config, indent=2))
    st_config = {"max_seq_length": 48, "do_lower_case": False}
    (path / "sentence_bert_config.json").write_text(json.dumps(st_config))
    return path


def widen_context(path: Path, max_position_embeddings: int = 1024) -> Path:
    """Give a saved tiny model a longer context (RoPE models take any), for long chat prompts such as an
    agent's tools in the tiny byte-level vocabulary."""
    import json

    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "max_position_embeddings": max_position_embeddings}))
    return path
