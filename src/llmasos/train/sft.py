"""Chat data for supervised fine-tuning: conversations rendered with the model's own chat template.

The loss counts only what the assistant says. To find those tokens we render the conversation
prefix by prefix (the prompt before each assistant turn with the generation prompt, then the prompt
plus the turn) instead of relying on `{% generation %}` markers, which few templates have. Each
piece is tokenized on its own, so the prompt tokens are exactly what the engine feeds the tuned
model when it serves the same chat. Every assistant span runs up to and including its stop token
(`<|im_end|>`, `<|eot_id|>`, `</s>`; EOS is appended where the template has none), so the tuned
model learns to stop; what the template puts after the stop token is context, not target.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from random import Random
from typing import TYPE_CHECKING

from llmasos.errors import LLMasOSError
from llmasos.files import read_jsonl
from llmasos.tokenizer import Tokenizer

if TYPE_CHECKING:  # torch is imported where tensors are made, so the CLI starts without it
    import torch

log = logging.getLogger(__name__)

IGNORE = -100  # label of a token the loss does not count
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Example:
    """One tokenized sequence: `labels[i]` is `input_ids[i]` where the loss counts it, else IGNORE."""

    input_ids: list[int]
    labels: list[int]


def check_messages(messages: object, where: str) -> list[dict]:
    """The messages of one conversation, checked: a list of {role, content} with known roles."""
    if not isinstance(messages, list) or not messages:
        raise LLMasOSError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise LLMasOSError(
                f'{where}: every message needs a "role" and a string "content"; got {message!r}'
            )
        if message.get("role") not in ROLES:
            raise LLMasOSError(f"{where}: unknown role {message.get('role')!r}; roles are {', '.join(ROLES)}")
    return messages


def tokenize_chat(
    tokenizer: Tokenizer, messages: list[dict], where: str, last_turn_only: bool = False
) -> Example:
    """The conversation as the model's template renders it, labels on the assistant turns only
    (with `last_turn_only`, on the final message only: a DPO response after its prompt)."""
    render = tokenizer.apply_chat_template
    full = render(messages, add_generation_prompt=False)
    pieces: list[tuple[str, bool]] = []  # (text, is it an assistant turn)
    done = ""  # the rendering of the turns handled so far: a prefix of `full`
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or (last_turn_only and i < len(messages) - 1):
            continue
        prompt = render(messages[:i], add_generation_prompt=True)
        turn = render(messages[: i + 1], add_generation_prompt=False)
        if not (prompt.startswith(done) and turn.startswith(prompt) and full.startswith(turn)):
            raise LLMasOSError(
                f"{where}: the model's chat template renders this conversation differently turn by turn "
                "(it rewrites earlier turns), so the assistant tokens cannot be located; "
                "split the conversation into one example per assistant turn"
            )
        pieces += [(prompt[len(done) :], False), (turn[len(prompt) :], True)]
        done = turn
    if not any(is_assistant for _, is_assistant in pieces):
        raise LLMasOSError(f"{where}: the conversation has no assistant turn, so there is nothing to learn")
    pieces.append((full[len(done) :], False))

    stops = set(tokenizer.eos_token_ids)
    input_ids: list[int] = []
    labels: list[int] = []
    for text, is_assistant in pieces:
        ids = tokenizer.encode(text, add_special_tokens=not input_ids) if text else []
        if not is_assistant:
            input_ids += ids
            labels += [IGNORE] * len(ids)
            continue
        ends = [k for k, token in enumerate(ids) if token in stops]
        if ends:  # counted up to its last stop token; the template's text after it is only context
            counted = ends[-1] + 1
        else:  # a template without an end-of-turn token: EOS teaches the model to stop
            if not tokenizer.eos_token_ids:
                raise LLMasOSError("the model's tokenizer has no EOS token, so it cannot learn to stop")
            ids = ids + tokenizer.eos_token_ids[:1]
            counted = len(ids)
        input_ids += ids
        labels += ids[:counted] + [IGNORE] * (len(ids) - counted)
    return Example(input_ids, labels)


def fit_length(example: Example, max_seq_len: int, truncate: bool, where: str) -> Example | None:
    """The example if it fits; with `truncate` its first max_seq_len tokens (None if no target is left)."""
    if len(example.input_ids) <= max_seq_len:
        return example
    if not truncate:
        raise LLMasOSError(
            f"{where}: the conversation is {len(example.input_ids)} tokens, longer than the "
            f"{max_seq_len} tokens of context; raise --max-seq-len (up to the model's context length), "
            "shorten it, or pass --truncate to cut long conversations"
        )
    cut = Example(example.input_ids[:max_seq_len], example.labels[:max_seq_len])
    return cut if any(label != IGNORE for label in cut.labels) else None


def load_chat(
    path: Path | str, tokenizer: Tokenizer, max_seq_len: int, truncate: bool = False
) -> list[Example]:
    """Every conversation of a chat JSONL file ({"messages": [...]}, one per line), tokenized.

    All of it is checked before any compute: a bad line fails the run here, naming the line.
    """
    if not tokenizer.has_chat_template:
        raise LLMasOSError(
            "the model has no chat template, so chat data cannot be rendered for it; "
            "fine-tune a chat model, or pretrain on plain text instead"
        )
    examples, dropped = [], 0
    for number, record in read_jsonl(path):
        where = f"{path}, line {number}"
        if "messages" not in record:
            raise LLMasOSError(f'{where}: expected {{"messages": [{{"role", "content"}}, ...]}}')
        example = tokenize_chat(tokenizer, check_messages(record["messages"], where), where)
        example = fit_length(example, max_seq_len, truncate, where)
        if example is None:
            dropped += 1
        else:
            examples.append(example)
    if dropped:
        log.warning(
            "%d conversations of %s had no assistant token left after truncation: dropped", dropped, path
        )
    if not examples:
        raise LLMasOSError(f"{path}: no conversation has an assistant token within {max_seq_len} tokens")
    return examples


def split_eval(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval): a seeded random `fraction` held out for evaluation, none if that rounds to zero."""
    if not 0 <= fraction < 1:
        raise LLMasOSError(f"eval_fraction must be in [0, 1), got {fraction}")
    held = int(len(examples) * fraction)
    if held == 0:
        return examples, []
    order = list(range(len(examples)))
    Random(seed).shuffle(order)
    return [examples[i] for i in order[held:]], [examples[i] for i in order[:held]]


def pad(sequences: list[list[int]], value: int) -> torch.Tensor:
    """Right-padded to the longest, as one [B, T] tensor."""
    import torch

    width = max(len(s) for s in sequences)
    return torch.tensor([s + [value] * (width - len(s)) for s in sequences], dtype=torch.long)


class ShuffledStream:
    """An endless stream over `num_examples` items: epoch after epoch, each in its own seeded order.

    Position p is a pure function of (seed, p), so a resumed run sees exactly the batches it would
    have seen without the interruption.
    """

    def __init__(self, num_examples: int, seed: int):
        if num_examples == 0:
            raise LLMasOSError("the data set is empty")
        self.num_examples = num_examples
        self.seed = seed

    def indices(self, index: int, batch_size: int) -> list[int]:
        """The items of the index-th batch of `batch_size`."""
        n = self.num_examples
        positions = range(index * batch_size, (index + 1) * batch_size)
        return [_epoch_order(n, self.seed, p // n)[p % n] for p in positions]


@lru_cache(maxsize=8)  # a batch spans at most a few epochs; each order is computed once
def _epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    order = list(range(num_examples))
    Random(f"{seed}/{epoch}").shuffle(order)
    return order


class ChatData:
    """A `BatchSource` of tokenized conversations: shuffled, padded per batch, loss masks as labels."""

    def __init__(self, examples: list[Example], pad_id: int, seed: int = 0):
        self.examples = examples
        self.pad_id = pad_id
        self.stream = ShuffledStream(len(examples), seed)

    @property
    def num_examples(self) -> int:
        return len(self.examples)

    def batch(self, index: int, batch_size: int) -> dict[str, torch.Tensor]:
        chosen = [self.examples[i] for i in self.stream.indices(index, batch_size)]
        return collate(chosen, self.pad_id)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, labels and attention_mask (0 on padding), all [B, T].

    Labels are shifted, as the Trainer's `causal_lm_loss` expects: labels[t] is the target of
    position t, the next token, or IGNORE where that token is not counted or is padding.
    """
    return {
        "input_ids": pad([e.input_ids for e in examples], pad_id),
        "labels": pad([e.labels[1:] + [IGNORE] for e in examples], IGNORE),
        "attention_mask": pad([[1] * len(e.input_ids) for e in examples], 0),
    }


def pad_id(tokenizer: Tokenizer) -> int:
    """The id padding uses: the tokenizer's pad token, else EOS (masked out either way)."""
    pad_token = tokenizer.special_tokens.get("pad_token")
    ids = tokenizer.encode(pad_token, add_special_tokens=False) if pad_token else []
    return (ids if len(ids) == 1 else tokenizer.eos_token_ids or [0])[0]
