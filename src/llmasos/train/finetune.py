"""Supervised fine-tuning of a store model on chat data: all weights, the last layers, or LoRA.

    llmasos finetune MODEL --data chat.jsonl --method full|freeze|lora [--merge] [--name NAME]

The model comes from the store as a transformers model (peft's LoRA needs one), trains in our loop
(`Trainer`), and goes back into the store: a full model folder, or for LoRA without `--merge` a small
adapter folder (peft's files plus the base's config and tokenizer) that the kernel applies to the
base model at load time. Either way with a `model_card.json` that says where the model came from.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from llmasos.errors import LLMasOSError, ModelNotFoundError
from llmasos.train.config import TrainConfig, option

if TYPE_CHECKING:  # torch and transformers load inside the functions, so the CLI starts without them
    import torch
    from torch import nn

METHODS = ("full", "freeze", "lora")
# LoRA on every linear layer of the blocks: the QLoRA paper (Dettmers et al., 2023) found that needed
# to match full fine-tuning; torchtune's Llama 3 LoRA configs adapt all of them but k_proj.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# What a tuned model folder takes over from its base unchanged (save_pretrained writes the rest).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
)  # fmt: skip


@dataclass(frozen=True)
class MethodDefaults:
    """What a method trains with when neither a flag nor the config file says: one learning rate does
    not serve them all, since LoRA's few new weights need a step about ten times larger than full
    fine-tuning's, which moves every pretrained weight."""

    lr: float
    warmup_steps: int  # at most a tenth of max_steps, so a short run still reaches its peak rate


# From the published recipes (AdamW, cosine schedule with linear warm-up, as our loop):
# lora: torchtune's lora_finetune_single_device configs (llama3/8B, llama3_2/1B): lr 3e-4, 100 warm-up
#   steps; rank 8 and alpha 16 as in the 8B config (the 1B's: 64 and 128). LitGPT's Llama 3.2 1B: 2e-4.
# full: torchtune's full_finetune_single_device configs (llama3_2/1B, llama3_1/8B): lr 2e-5; they hold
#   the rate constant, so the warm-up is LitGPT's full fine-tuning config's (llama-3.2-1B/full.yaml): 25.
# freeze: neither project has a recipe; it updates pretrained weights as full does, so full's values.
FINETUNE_DEFAULTS = {
    "full": MethodDefaults(lr=2e-5, warmup_steps=25),
    "freeze": MethodDefaults(lr=2e-5, warmup_steps=25),
    "lora": MethodDefaults(lr=3e-4, warmup_steps=100),
}


def by_method(defaults: dict[str, MethodDefaults], name: str) -> str:
    """The `--help` line of a field the method decides: "full 2e-5, freeze 2e-5, lora 3e-4"."""
    values = {method: getattr(d, name) for method, d in defaults.items()}
    text = {m: f"{v:.0e}".replace("e-0", "e-") if isinstance(v, float) else str(v) for m, v in values.items()}
    return "by method: " + ", ".join(f"{method} {value}" for method, value in text.items())


@dataclass
class FinetuneConfig(TrainConfig):
    """A fine-tuning run: the loop's hyperparameters plus what to tune, on what, and how."""

    out_dir: Path = option(Path("runs/finetune"), "checkpoints, metrics.jsonl and loss.png go here")
    lr: float | None = option(None, "peak learning rate", by_method(FINETUNE_DEFAULTS, "lr"))
    warmup_steps: int | None = option(
        None,
        "steps of linear warm-up (by default the method's, at most max-steps / 10)",
        by_method(FINETUNE_DEFAULTS, "warmup_steps"),
    )
    weight_decay: float = option(0.0, "AdamW weight decay (matrices only)")
    model: str = option("", "the model to tune: a store name, catalog name or Hugging Face folder")
    data: Path | None = option(
        None, 'chat JSONL: one {"messages": [{"role", "content"}, ...]} per line; or a store dataset\'s name'
    )
    eval_data: Path | None = option(None, "held-out chat JSONL (default: eval_fraction of data)")
    eval_fraction: float = option(0.1, "share of data held out for evaluation when no eval_data is given")
    method: str = option("lora", "full (every weight), freeze (the last layers / chosen modules), lora")
    max_seq_len: int | None = option(None, "longest conversation in tokens (default: the model's context)")
    truncate: bool = option(False, "cut conversations longer than max_seq_len instead of refusing them")
    trainable_layers: int = option(2, "freeze: train the last N decoder layers")
    trainable_modules: list[str] = option([], "freeze: also train parameters matching these name patterns")
    train_lm_head: bool = option(False, "freeze: also train the output layer (the embeddings when tied)")
    train_norm: bool = option(False, "freeze: also train the final norm")
    lora_rank: int = option(8, "lora: rank r of the update B @ A (torchtune's Llama 3 8B recipe)")
    lora_alpha: float = option(16.0, "lora: the update is scaled by alpha / r (torchtune: 2 r)")
    lora_dropout: float = option(0.0, "lora: dropout on the adapter's input (torchtune: 0)")
    target_modules: list[str] = option(LORA_TARGETS, "lora: the linear layers that get adapters")
    merge: bool = option(False, "lora: merge the adapter and store a full model (default: store the adapter)")
    name: str | None = option(None, "store name of the result (default: MODEL-METHOD)")

    # The defaults of the fields left None: DPO's recipes differ from supervised fine-tuning's.
    method_defaults: ClassVar[dict[str, MethodDefaults]] = FINETUNE_DEFAULTS

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LLMasOSError(f"unknown method '{self.method}'; use one of {', '.join(METHODS)}")
        defaults = self.method_defaults[self.method]
        if self.lr is None:
            self.lr = defaults.lr
        if self.warmup_steps is None:
            self.warmup_steps = min(defaults.warmup_steps, self.max_steps // 10)
        super().__post_init__()
        if not self.model:
            raise LLMasOSError("give the model to fine-tune: a store name, catalog name or folder")
        if self.data is None:
            raise LLMasOSError("give the training data with --data (a chat JSONL file)")
        self.data = Path(self.data)
        self.eval_data = Path(self.eval_data) if self.eval_data is not None else None
        if self.lora_rank < 1 or self.trainable_layers < 0:
            raise LLMasOSError("lora_rank must be at least 1 and trainable_layers not negative")

    @property
    def result_name(self) -> str:
        return self.name or f"{Path(self.model).name}-{self.method}"


@dataclass
class Base:
    """The model being tuned, as the store knows it."""

    folder: Path
    reference: str  # what an adapter names as its base: the store name, or the folder's path
    digest: str | None  # the store's content digest of the base (None for a folder outside it)
    context: int


def resolve_base(config: FinetuneConfig) -> Base:
    """Find the base model and check the result's name, before anything is loaded."""
    from llmasos.models.loader import read_hf_config
    from llmasos.store import ModelStore

    store = ModelStore()
    folder = store.resolve(config.model)
    try:
        manifest = store.get(config.model)
        reference, digest = manifest.name, manifest.digest
    except LLMasOSError:  # a local folder, used in place
        reference, digest = str(folder), None
    name = config.result_name
    if name == reference:
        raise LLMasOSError(f"the result would replace its own base model '{name}'; choose another --name")
    try:
        store.get(name)  # refuses an invalid name now rather than after training
    except ModelNotFoundError:
        pass
    hf = read_hf_config(folder)
    return Base(folder, reference, digest, hf.get("max_position_embeddings") or hf.get("n_positions") or 2048)


def max_seq_len(config: FinetuneConfig, base: Base) -> int:
    if config.max_seq_len is not None and not 1 <= config.max_seq_len <= base.context:
        raise LLMasOSError(f"max_seq_len must be between 1 and the model's context, {base.context}")
    return config.max_seq_len or base.context


def load_base_model(base: Base) -> nn.Module:
    import torch

    from llmasos.models.loader import transformers_causal_lm

    return transformers_causal_lm(base.folder, torch.float32)


def prepare(model: nn.Module, config: FinetuneConfig) -> nn.Module:
    """The model with exactly the parameters the method trains set to requires_grad.

    Seeded first: LoRA's A matrices are random, and the same config must give the same model.
    """
    import torch

    torch.manual_seed(config.seed)
    if config.method == "full":
        return model.requires_grad_(True)
    if config.method == "freeze":
        return freeze(model, config)
    return add_lora(model, config)


def freeze(model: nn.Module, config: FinetuneConfig) -> nn.Module:
    """Train the last `trainable_layers` decoder layers and the parameters the patterns name, nothing else."""
    from llmasos.train.distributed import decoder_layers

    model.requires_grad_(False)
    layers = decoder_layers(model)
    if config.trainable_layers > len(layers):
        raise LLMasOSError(
            f"trainable_layers is {config.trainable_layers}, the model has {len(layers)} layers"
        )
    for layer in layers[len(layers) - config.trainable_layers :]:
        layer.requires_grad_(True)
    patterns = list(config.trainable_modules)
    if config.train_lm_head:
        patterns += [f"{name}.*" for name, m in model.named_modules() if m is model.get_output_embeddings()]
    if config.train_norm:
        patterns += [f"{name}.*" for name, m in model.named_modules() if m is final_norm(model)]
    params = dict(model.named_parameters())
    for pattern in patterns:
        matched = [name for name in params if fnmatch.fnmatch(name, pattern)]
        if not matched:
            raise LLMasOSError(
                f"trainable module pattern '{pattern}' matches no parameter; names look like "
                f"{', '.join(list(params)[:3])}"
            )
        for name in matched:
            params[name].requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise LLMasOSError("method freeze with nothing to train: set trainable_layers or trainable_modules")
    return model


def final_norm(model: nn.Module) -> nn.Module:
    """The norm after the last decoder layer (`model.norm` in Llama, `transformer.ln_f` in GPT-2)."""
    inner = model.base_model
    norm = getattr(inner, "norm", None) or getattr(inner, "ln_f", None)
    if norm is None:
        raise LLMasOSError(f"train_norm: no final norm found in {type(model).__name__}")
    return norm


def add_lora(model: nn.Module, config: FinetuneConfig) -> nn.Module:
    """peft's LoRA on the target modules; everything else frozen."""
    from peft import LoraConfig, get_peft_model

    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _is_linear(m)})
    missing = [target for target in config.target_modules if target not in linear]
    if missing:
        raise LLMasOSError(
            f"target_modules {', '.join(missing)} are not linear layers of this model; "
            f"its linear layers are {', '.join(linear)}"
        )
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def _is_linear(module: nn.Module) -> bool:
    from torch import nn

    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's transposed linear


def load_examples(config: FinetuneConfig, base, tokenizer, load) -> tuple[list, list]:
    """(training, held-out) examples: `load(path, tokenizer, max_seq_len, truncate)` on the data and
    the eval data, or a seeded split of the data when no eval data is given."""
    from llmasos.train.sft import split_eval

    length = max_seq_len(config, base)
    train = load(config.data, tokenizer, length, config.truncate)
    if config.eval_data is not None:
        return train, load(config.eval_data, tokenizer, length, config.truncate)
    return split_eval(train, config.eval_fraction, config.seed)


def run_finetune(config: FinetuneConfig) -> Path:
    """Fine-tune `config.model` on `config.data` and put the result in the store; returns its folder."""
    from llmasos.tokenizer import Tokenizer
    from llmasos.train.data import store_dataset
    from llmasos.train.sft import ChatData, load_chat, pad_id
    from llmasos.train.trainer import Trainer

    config.data, dataset = store_dataset(config.data)  # a store dataset by name: its JSONL export
    base = resolve_base(config)
    tokenizer = Tokenizer.from_dir(base.folder)
    train, held_out = load_examples(config, base, tokenizer, load_chat)
    pad = pad_id(tokenizer)
    model = prepare(load_base_model(base), config)
    trainer = Trainer(
        model,
        ChatData(train, pad, config.seed),
        ChatData(held_out, pad, config.seed) if held_out else None,
        config,
    )
    result = trainer.fit()
    trained = unsharded(trainer, model, base, config)
    card = model_card(
        config, base, result, model, examples=len(train), **({"dataset": dataset} if dataset else {})
    )
    return register(trained, config, base, card)


def unsharded(trainer, model: nn.Module, base: Base, config: FinetuneConfig) -> nn.Module | None:
    """The trained model whole: itself, or under FSDP (on rank 0) a fresh copy filled from the gathered
    shards; None on the ranks that do not write the result."""
    if trainer.mode != "fsdp":
        return model if trainer.dist.is_main else None
    state = trainer.full_state_dict()  # every rank takes part in the gather
    if not trainer.dist.is_main:
        return None
    fresh = prepare(load_base_model(base), config)
    fresh.load_state_dict(state)
    return fresh


def model_card(config: FinetuneConfig, base: Base, result, model: nn.Module, **extra) -> dict:
    """Where the model came from and how it was made: recorded with it in the store."""
    hyperparameters = {
        key: str(value) if isinstance(value, Path) else value for key, value in asdict(config).items()
    }
    return {
        "base_model": {"name": base.reference, "digest": base.digest},
        "method": config.method,
        "data": {"path": str(config.data), "digest": file_digest(config.data), **extra},
        "eval_data": {"path": str(config.eval_data), "digest": file_digest(config.eval_data)}
        if config.eval_data
        else None,
        "hyperparameters": hyperparameters,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "results": asdict(result),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def file_digest(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


def register(model: nn.Module | None, config: FinetuneConfig, base: Base, card: dict) -> Path:
    """Save the tuned model (or adapter) next to its base's tokenizer and import it into the store.

    Only one process writes (`model` is None on the others); all return once the store has it.
    """
    from llmasos.store import ModelStore
    from llmasos.train.distributed import barrier

    if model is None:
        barrier()
        return ModelStore().models / config.result_name
    adapter = config.method == "lora" and not config.merge
    if config.method == "lora" and config.merge:
        model = model.merge_and_unload()
    config.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=config.out_dir, prefix="export-") as work:
        folder = Path(work)
        if adapter:
            # peft's reference to the base: the store name the kernel resolves when it loads the adapter
            model.peft_config["default"].base_model_name_or_path = base.reference
            model.save_pretrained(folder, save_embedding_layers=False)
            # config and tokenizer of the base, so that the engine reads an adapter folder like any model
            for name in ("config.json", "generation_config.json"):
                if (base.folder / name).is_file():
                    shutil.copy(base.folder / name, folder / name)
        else:
            dtype = saved_dtype(base.folder)
            model.to(dtype).save_pretrained(folder)
        for name in TOKENIZER_FILES:
            if (base.folder / name).is_file():
                shutil.copy(base.folder / name, folder / name)
        (folder / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
        store = ModelStore()
        manifest = store.import_path(folder, config.result_name, progress=False)
    barrier()
    return store.path(manifest.name)


def saved_dtype(base_folder: Path) -> torch.dtype:
    """The base checkpoint's dtype, so a tuned model is stored as its base was (float32 by default)."""
    import torch

    hf = json.loads((base_folder / "config.json").read_text())
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return getattr(torch, name) if isinstance(getattr(torch, name, None), torch.dtype) else torch.float32
