"""The pretraining recipe: a Llama-family model from scratch on the user's text, into the store.

    data files -> tokenizer (a store model's, or byte-level BPE trained on the data)
               -> packed sequences (cached) -> LlamaForCausalLM -> Trainer
               -> out_dir/model (safetensors + tokenizer + model_card.json) -> the store

The result is a plain Hugging Face folder, so `llmasos run NAME` and `LLM(NAME)` load it like any
imported model. torch and transformers are imported inside `run_pretrain`, so that the CLI can
read PretrainConfig's flags without paying for them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from llmasos.errors import LLMasOSError
from llmasos.train.config import TrainConfig, option

# What a tokenizer folder may hold; the trained model gets every one the tokenizer has.
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
]


@dataclass
class PretrainConfig(TrainConfig):
    out_dir: Path = option(Path("runs/pretrain"), "checkpoints, metrics, the tokenizer and the model go here")
    data: list[str] = option(
        [], "text files (.txt; .jsonl or .parquet with a 'text' field), folders, or store datasets by name"
    )
    tokenizer: str | None = option(None, "reuse this model's tokenizer (default: train one on the data)")
    vocab_size: int = option(32000, "vocabulary size of a newly trained tokenizer")
    seq_len: int = option(256, "tokens per training sequence, the model's context length")
    n_layers: int = option(12, "decoder layers")
    d_model: int = option(768, "hidden size")
    n_heads: int = option(12, "attention heads")
    n_kv_heads: int = option(4, "key/value heads (grouped-query attention; = n_heads for none)")
    d_ff: int = option(2048, "MLP hidden size")
    rope_theta: float = option(10000.0, "RoPE base")
    tie_embeddings: bool = option(True, "share the input embedding and the output head")
    eval_fraction: float = option(0.05, "share of the sequences held out for evaluation (at least one)")
    name: str | None = option(None, "store name of the result (default: out_dir's folder name)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.seq_len < 1:
            raise LLMasOSError(f"seq_len must be at least 1, got {self.seq_len}")
        if min(self.n_layers, self.d_model, self.n_heads, self.n_kv_heads, self.d_ff) < 1:
            raise LLMasOSError("n_layers, d_model, n_heads, n_kv_heads and d_ff must be at least 1")
        check_attention_shape(self.d_model, self.n_heads, self.n_kv_heads)
        if not 0 <= self.eval_fraction < 1:
            raise LLMasOSError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")

    @property
    def model_name(self) -> str:
        return self.name or Path(self.out_dir).resolve().name


def run_pretrain(config: PretrainConfig) -> Path:
    """Train, save and register the model; returns its folder in the store. Under torchrun every
    rank runs this; rank 0 alone writes the tokenizer, the cache, the model and the store entry."""
    import torch

    from llmasos.store import ModelStore
    from llmasos.store.store import check_name  # store names are checked before any compute
    from llmasos.train import checkpoint, data, distributed
    from llmasos.train.trainer import Trainer

    check_name(config.model_name)
    dist = distributed.setup()
    try:
        checkpoint.prepare(config.out_dir, config.resume)
        files = data.find_files(config.data)
        digest = data.digest_files(files)
        store = ModelStore()
        tokenizer_dir = _tokenizer(config, files, store, dist.is_main)
        packed = (files, digest, tokenizer_dir, config.seq_len, store.cache / "train")
        tokens = data.packed_tokens(*packed) if dist.is_main else None
        distributed.barrier()  # one rank tokenizes; the others then map its cache
        if tokens is None:
            tokens = data.packed_tokens(*packed)
        train_rows, eval_rows = data.split(len(tokens), config.eval_fraction, config.seed)
        train = data.PackedText(tokens, train_rows, config.seed)
        held_out = data.PackedText(tokens, eval_rows, config.seed) if len(eval_rows) else None

        torch.manual_seed(config.seed)
        model = build_model(config, tokenizer_dir)
        trainer = Trainer(model, train, held_out, config)
        result = trainer.fit()
        weights = trainer.full_state_dict()
        if dist.is_main:
            folder = config.out_dir / "model"
            save_model(model.config, weights, folder)
            for name in TOKENIZER_FILES:
                if (tokenizer_dir / name).is_file():
                    shutil.copyfile(tokenizer_dir / name, folder / name)
            card = {
                "name": config.model_name,
                "base": None,
                "method": "pretrain",
                "data": {
                    "files": [str(f) for f in files],
                    "digest": digest,
                    "datasets": data.store_datasets(config.data),
                },
                "tokenizer": config.tokenizer or f"byte-level BPE trained on the data ({config.vocab_size})",
                "parameters": sum(t.numel() for t in weights.values()),
                "hyperparameters": {
                    k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()
                },
                "steps": result.steps,
                "tokens": result.tokens,
                "train_loss": result.train_loss,
                "eval_loss": result.eval_loss,
                "eval_perplexity": result.eval_perplexity,
                "seconds": round(result.seconds, 1),
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            (folder / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
            store.import_path(folder, config.model_name, progress=False)
        distributed.barrier()
        return store.path(config.model_name)
    finally:
        distributed.teardown()


def _tokenizer(config: PretrainConfig, files: list[Path], store, is_main: bool) -> Path:
    """A store model's tokenizer folder, or out_dir/tokenizer trained on the data (once: a resumed
    run keeps the one its checkpoints were trained with)."""
    from llmasos.train import data, distributed

    if config.tokenizer is not None:
        folder = store.resolve(config.tokenizer)
        if not (folder / "tokenizer.json").is_file():
            raise LLMasOSError(f"model '{config.tokenizer}' has no tokenizer.json to reuse")
        return folder
    folder = config.out_dir / "tokenizer"
    if is_main and not (config.resume and (folder / "tokenizer.json").is_file()):
        data.train_tokenizer(files, config.vocab_size, folder)
    distributed.barrier()
    return folder


def build_model(config: PretrainConfig, tokenizer_dir: Path):
    """A randomly initialized LlamaForCausalLM sized by the config, its vocabulary the tokenizer's."""
    from transformers import LlamaForCausalLM

    from llmasos.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    eos = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None
    model_config = llama_config(
        config,
        vocab_size=tokenizer.vocab_size,
        rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
        eos_token_id=eos,
    )
    return LlamaForCausalLM(model_config)


def check_attention_shape(d_model: int, n_heads: int, n_kv_heads: int) -> None:
    """Rotary needs an even head size; grouped-query attention needs whole groups."""
    if d_model % n_heads or (d_model // n_heads) % 2:
        raise LLMasOSError(f"d_model ({d_model}) must be n_heads ({n_heads}) times an even head size")
    if n_heads % n_kv_heads:
        raise LLMasOSError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")


def llama_config(shape, **extra):
    """transformers' LlamaConfig for a config with n_layers, d_model, n_heads, n_kv_heads, d_ff, seq_len."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=shape.d_model,
        intermediate_size=shape.d_ff,
        num_hidden_layers=shape.n_layers,
        num_attention_heads=shape.n_heads,
        num_key_value_heads=shape.n_kv_heads,
        max_position_embeddings=shape.seq_len,
        **extra,
    )


def save_model(model_config, weights: dict, folder: Path) -> None:
    """save_pretrained (safetensors, config.json, generation_config.json) from full weights, through
    a model on the meta device: the trained module may be sharded (FSDP2) or wrapped."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    model.load_state_dict(weights, assign=True, strict=False)
    model.tie_weights()
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder)
