"""Tiny GGUF files written with gguf-py in the layout llama.cpp's converter writes: random weights, a
small BPE vocabulary and a ChatML template, for every architecture and quantization the store converts."""

import json
from pathlib import Path

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, CONTEXT = 64, 128, 2, 4, 2, 1024


def _tiny_vocab() -> tuple[list[str], list[str], list[int]]:
    """A byte-level BPE vocabulary (tokens, merges, token types) trained here, with ChatML specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(["Hello world, the quick brown fox jumps over the lazy dog."] * 20, trainer)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [" ".join(pair) for pair in json.loads(tokenizer.to_str())["model"]["merges"]]
    token_types = [3 if token.startswith("<|") else 1 for token in tokens]  # 3: control, 1: normal
    return tokens, merges, token_types


def write_tiny_gguf(path: Path, arch: str, qtype: int, name: str = "tiny", tied: bool = True) -> Path:
    """A random-weight model in the layout llama.cpp's converter writes, matrices stored as `qtype`."""
    rng = np.random.default_rng(0)
    tokens, merges, token_types = _tiny_vocab()
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_block_count(LAYERS)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_head_count(HEADS)
    if arch == "gpt2":
        writer.add_feed_forward_length(4 * HIDDEN)  # transformers ignores it: GPT-2's is always 4x
        writer.add_layer_norm_eps(1e-5)
    else:
        writer.add_feed_forward_length(FFN)
        writer.add_head_count_kv(KV_HEADS)
        writer.add_rope_freq_base(10000.0)
        writer.add_layer_norm_rms_eps(1e-6)
    writer.add_file_type({Q.F32: 0, Q.F16: 1, Q.Q4_0: 2, Q.Q4_1: 3, Q.Q8_0: 7, Q.BF16: 32}.get(qtype, 7))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types(token_types)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_unk_token_id(tokens.index("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)

    def add(tensor_name: str, *shape: int):
        values = rng.standard_normal(shape, dtype=np.float32) * 0.1
        if len(shape) == 1 or qtype == Q.F32:  # llama.cpp keeps vectors in float32
            writer.add_tensor(tensor_name, values)
        elif qtype == Q.F16:
            writer.add_tensor(tensor_name, values.astype(np.float16))
        else:
            writer.add_tensor(tensor_name, gguf.quantize(values, qtype), raw_dtype=qtype)

    vocab = len(tokens)
    add("token_embd.weight", vocab, HIDDEN)
    if arch == "gpt2":
        add("position_embd.weight", CONTEXT, HIDDEN)
        for i in range(LAYERS):
            for norm in ("attn_norm", "ffn_norm"):
                add(f"blk.{i}.{norm}.weight", HIDDEN)
                add(f"blk.{i}.{norm}.bias", HIDDEN)
            for layer, rows, cols in (
                ("attn_qkv", 3 * HIDDEN, HIDDEN),
                ("attn_output", HIDDEN, HIDDEN),
                ("ffn_up", 4 * HIDDEN, HIDDEN),
                ("ffn_down", HIDDEN, 4 * HIDDEN),
            ):
                add(f"blk.{i}.{layer}.weight", rows, cols)
                add(f"blk.{i}.{layer}.bias", rows)
        add("output_norm.bias", HIDDEN)
    else:
        head_dim = 128 if arch == "qwen3" else HIDDEN // HEADS  # transformers reads no head_dim for qwen3
        for i in range(LAYERS):
            add(f"blk.{i}.attn_norm.weight", HIDDEN)
            add(f"blk.{i}.attn_q.weight", HEADS * head_dim, HIDDEN)
            add(f"blk.{i}.attn_k.weight", KV_HEADS * head_dim, HIDDEN)
            add(f"blk.{i}.attn_v.weight", KV_HEADS * head_dim, HIDDEN)
            add(f"blk.{i}.attn_output.weight", HIDDEN, HEADS * head_dim)
            if arch == "qwen2":
                for proj, heads in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
                    add(f"blk.{i}.attn_{proj}.bias", heads * head_dim)
            if arch == "qwen3":
                add(f"blk.{i}.attn_q_norm.weight", head_dim)
                add(f"blk.{i}.attn_k_norm.weight", head_dim)
            add(f"blk.{i}.ffn_norm.weight", HIDDEN)
            add(f"blk.{i}.ffn_gate.weight", FFN, HIDDEN)
            add(f"blk.{i}.ffn_up.weight", FFN, HIDDEN)
            add(f"blk.{i}.ffn_down.weight", HIDDEN, FFN)
    add("output_norm.weight", HIDDEN)
    if not tied:
        add("output.weight", vocab, HIDDEN)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
