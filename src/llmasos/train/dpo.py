"""Direct preference optimization: teach a model to prefer one answer over another, without a reward model.

    llmasos dpo MODEL --data pairs.jsonl [--method lora|full|freeze]

Each line of the data is {"prompt": messages or text, "chosen": text, "rejected": text}. The loss
(Rafailov et al., 2023) is -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), where pi and ref
are the summed log-probabilities of a response's tokens under the policy being trained and under the
reference (the model as it started). For full and freeze the reference is a frozen copy; for LoRA it
is the same peft model with its adapters switched off, so no second copy is held in memory.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from llmasos.errors import LLMasOSError
from llmasos.files import read_jsonl
from llmasos.tokenizer import Tokenizer
from llmasos.train.config import option
from llmasos.train.finetune import (
    FinetuneConfig,
    MethodDefaults,
    by_method,
    load_base_model,
    load_examples,
    model_card,
    prepare,
    register,
    resolve_base,
    unsharded,
)
from llmasos.train.sft import (
    IGNORE,
    Example,
    ShuffledStream,
    check_messages,
    collate,
    fit_length,
    pad_id,
    tokenize_chat,
)

if TYPE_CHECKING:  # torch loads inside the functions, so the CLI starts without it
    import torch
    from torch import nn


# torchtune's DPO recipes: lora_dpo_single_device (llama3_1/8B): lr 5e-4, 100 warm-up steps;
# full_dpo_distributed (llama3_1/8B): lr 2e-5, 20 warm-up steps. freeze takes full's, as in fine-tuning.
DPO_DEFAULTS = {
    "full": MethodDefaults(lr=2e-5, warmup_steps=20),
    "freeze": MethodDefaults(lr=2e-5, warmup_steps=20),
    "lora": MethodDefaults(lr=5e-4, warmup_steps=100),
}


@dataclass
class DPOConfig(FinetuneConfig):
    """A DPO run: fine-tuning's options (method, LoRA, freeze, store name) plus the preference strength."""

    out_dir: Path = option(Path("runs/dpo"), "checkpoints, metrics.jsonl and loss.png go here")
    lr: float | None = option(None, "peak learning rate", by_method(DPO_DEFAULTS, "lr"))
    warmup_steps: int | None = option(
        None,
        "steps of linear warm-up (by default the method's, at most max-steps / 10)",
        by_method(DPO_DEFAULTS, "warmup_steps"),
    )
    data: Path | None = option(None, 'pairs JSONL: one {"prompt", "chosen", "rejected"} per line')
    eval_data: Path | None = option(None, "held-out pairs JSONL (default: eval_fraction of data)")
    beta: float = option(0.1, "how far the policy may move from the reference (higher: stays closer)")

    method_defaults: ClassVar[dict[str, MethodDefaults]] = DPO_DEFAULTS

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0:
            raise LLMasOSError(f"beta must be positive, got {self.beta}")

    @property
    def result_name(self) -> str:
        return self.name or f"{Path(self.model).name}-dpo"


@dataclass
class Pair:
    chosen: Example
    rejected: Example


def tokenize_response(tokenizer: Tokenizer, prompt: str | list[dict], response: str, where: str) -> Example:
    """Prompt + response with labels on the response only, as the model will see it when served.

    A text prompt is one user message for a chat model, plain text for a model without a template.
    """
    if isinstance(prompt, str) and not tokenizer.has_chat_template:
        prompt_ids = tokenizer.encode(prompt)
        response_ids = tokenizer.encode(response, add_special_tokens=False) + tokenizer.eos_token_ids[:1]
        return Example(prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + response_ids)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    messages = check_messages(messages + [{"role": "assistant", "content": response}], where)
    return tokenize_chat(tokenizer, messages, where, last_turn_only=True)


def load_pairs(
    path: Path | str, tokenizer: Tokenizer, max_seq_len: int, truncate: bool = False
) -> list[Pair]:
    """Every preference pair of a JSONL file, tokenized and checked before any compute."""
    pairs = []
    for number, record in read_jsonl(path):
        where = f"{path}, line {number}"
        prompt = record.get("prompt")
        if not isinstance(prompt, str | list) or not all(
            isinstance(record.get(key), str) and record[key] for key in ("chosen", "rejected")
        ):
            raise LLMasOSError(
                f'{where}: expected {{"prompt": text or [messages], "chosen": text, "rejected": text}} '
                "with non-empty chosen and rejected answers"
            )
        chosen, rejected = (
            fit_length(tokenize_response(tokenizer, prompt, record[key], where), max_seq_len, truncate, where)
            for key in ("chosen", "rejected")
        )
        if chosen is not None and rejected is not None:
            pairs.append(Pair(chosen, rejected))
    if not pairs:
        raise LLMasOSError(f"{path}: no pair has response tokens within {max_seq_len} tokens")
    return pairs


class PairData:
    """A `BatchSource` of preference pairs: a micro-batch of B pairs is 2B sequences, chosen first."""

    def __init__(self, pairs: list[Pair], pad_id: int, seed: int = 0):
        self.pairs = pairs
        self.pad_id = pad_id
        self.stream = ShuffledStream(len(pairs), seed)

    @property
    def num_examples(self) -> int:
        return len(self.pairs)

    def batch(self, index: int, batch_size: int) -> dict[str, torch.Tensor]:
        return collate_pairs([self.pairs[i] for i in self.stream.indices(index, batch_size)], self.pad_id)


def collate_pairs(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """One padded batch of the chosen responses, then the rejected ones: one forward pass for both."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


def sequence_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B] summed log-probabilities of each sequence's counted tokens (labels come shifted)."""
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    token_nll = F.cross_entropy(
        logits.float().transpose(1, 2), batch["labels"], ignore_index=IGNORE, reduction="none"
    )
    return -token_nll.sum(-1)


class DPOLoss:
    """The DPO loss as the Trainer's `loss_fn`; `reference=None` means the policy is a peft model whose
    adapters, switched off, are the reference."""

    def __init__(self, beta: float, reference: nn.Module | None = None):
        self.beta = beta
        self.reference = reference

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(mean loss over the batch's pairs, number of pairs): the loss is per pair, not per token, so
        the Trainer weighs micro-batches by their pairs (its "tokens" of a DPO run are pairs)."""
        import torch.nn.functional as F

        logits = self.preference_logits(model, batch)
        return -F.logsigmoid(logits).mean(), len(logits)

    def preference_logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B] beta * ((pi_c - ref_c) - (pi_r - ref_r)): the implicit reward margin of each pair."""
        import torch

        policy = sequence_logprobs(model, batch)
        with torch.no_grad():
            reference = sequence_logprobs_of_reference(self.reference, model, batch)
        rewards = self.beta * (policy - reference)
        chosen, rejected = rewards.chunk(2)
        return chosen - rejected


def sequence_logprobs_of_reference(
    reference: nn.Module | None, model: nn.Module, batch: dict[str, torch.Tensor]
) -> torch.Tensor:
    if reference is not None:
        device = batch["input_ids"].device
        if next(reference.parameters()).device != device:  # the Trainer placed the policy, not this copy
            reference.to(device)
        return sequence_logprobs(reference, batch)
    peft_model = getattr(model, "module", model)  # under DDP
    with peft_model.disable_adapter():
        return sequence_logprobs(peft_model, batch)


def preference_metrics(
    loss: DPOLoss, model: nn.Module, pairs: list[Pair], pad_id: int, batch_size: int
) -> dict:
    """Loss, reward accuracy (share of pairs where chosen beats rejected) and mean reward margin."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    margins = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            batch = collate_pairs(pairs[start : start + batch_size], pad_id)
            batch = {key: value.to(device) for key, value in batch.items()}
            margins.append(loss.preference_logits(model, batch).float().cpu())
    model.train(was_training)
    margin = torch.cat(margins)
    return {
        "loss": float(-F.logsigmoid(margin).mean()),
        "reward_accuracy": float((margin > 0).float().mean()),
        "reward_margin": float(margin.mean()),
        "pairs": len(pairs),
    }


def run_dpo(config: DPOConfig) -> Path:
    """Train `config.model` on preference pairs and put the result in the store; returns its folder.

    The model card records the preference metrics before and after training on the held-out pairs
    (the training pairs when none are held out).
    """
    from llmasos.train.trainer import Trainer

    base = resolve_base(config)
    tokenizer = Tokenizer.from_dir(base.folder)
    train, held_out = load_examples(config, base, tokenizer, load_pairs)
    pad = pad_id(tokenizer)

    model = load_base_model(base)
    reference = None if config.method == "lora" else copy.deepcopy(model).requires_grad_(False).eval()
    model = prepare(model, config)
    loss = DPOLoss(config.beta, reference)
    measured = (held_out or train)[: config.eval_batches * config.batch_size or None]
    before = preference_metrics(loss, model, measured, pad, config.batch_size)
    trainer = Trainer(
        model,
        PairData(train, pad, config.seed),
        PairData(held_out, pad, config.seed) if held_out else None,
        config,
        loss_fn=loss,
    )
    result = trainer.fit()
    after = preference_metrics(loss, model, measured, pad, config.batch_size)
    trained = unsharded(trainer, model, base, config)
    card = model_card(config, base, result, model, pairs=len(train))
    card["preference"] = {"beta": config.beta, "before": before, "after": after}
    return register(trained, config, base, card)
