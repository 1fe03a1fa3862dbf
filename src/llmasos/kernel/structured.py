"""Structured output: a grammar per sequence decides, token by token, which tokens the sampler may pick.

A request's `StructuredOutputParams` compile with llguidance into one matcher per sequence, at
request time in the caller's thread, so a bad schema or regex is the caller's InvalidRequestError
and never reaches the engine loop. Each step the sampler sets every token the grammar does not
allow next to -inf (EOS only once the grammar accepts), and the engine advances the matcher with
the token picked; when the grammar is complete the sequence stops. Only newly sampled tokens pass
through a matcher, once each: recompute after preemption samples no old token again, so the state
stays valid.

llguidance is imported only when a request asks for structured output, and rows without a matcher
never reach a mask: unconstrained batches run as before.
"""

from __future__ import annotations

import copy
import logging
import threading
from typing import TYPE_CHECKING

import torch

from llmasos.errors import InvalidRequestError
from llmasos.sampling_params import StructuredOutputParams

if TYPE_CHECKING:
    from llguidance import LLMatcher, LLTokenizer

    from llmasos.kernel.sequence import Sequence
    from llmasos.tokenizer import Tokenizer

log = logging.getLogger("llmasos")

# JSON laid out as json.dumps writes it. Free whitespace would let a weak model loop on spaces and
# newlines until max_tokens; a schema's own "x-guidance" options still override this.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_source(so: StructuredOutputParams) -> str:
    """The llguidance grammar text for `so`; only building a matcher checks it."""
    from llguidance import LLMatcher, grammar_from

    if so.json is not None:
        return LLMatcher.grammar_from_json_schema(so.json, defaults=JSON_LAYOUT)
    if so.json_object:
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_LAYOUT)
    if so.regex is not None:
        return LLMatcher.grammar_from_regex(so.regex)
    if so.choice is not None:
        return grammar_from("choice", so.choice)
    return grammar_from("grammar", so.grammar)  # Lark, or llama.cpp's GBNF converted to Lark


class GrammarCompiler:
    """One per engine: the model's vocabulary as llguidance sees it, and matchers over it.

    The llguidance tokenizer walks every token's bytes, so it is built once, on the first request
    that asks for structured output (engines that never do pay nothing).
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._ll_tokenizer: LLTokenizer | None = None
        self._lock = threading.Lock()  # requests are made in the callers' threads

    @property
    def ll_tokenizer(self) -> LLTokenizer:
        with self._lock:
            if self._ll_tokenizer is None:
                from llguidance import LLTokenizer

                # our backend, with the special tokens Tokenizer registered, serialized as llguidance.hf does
                backend = copy.copy(self._tokenizer._backend)
                backend.no_padding()
                backend.no_truncation()
                eos = self._tokenizer.eos_token_ids or None
                self._ll_tokenizer = LLTokenizer(backend.to_str(), eos_token=eos)
            return self._ll_tokenizer

    def matchers(self, so: StructuredOutputParams, n: int) -> list[LLMatcher]:
        """n fresh matchers for `so`, one per sequence; InvalidRequestError if it does not compile."""
        from llguidance import LLMatcher

        try:
            matcher = LLMatcher(self.ll_tokenizer, grammar_source(so), log_level=0)
            error = matcher.get_error() if matcher.is_error() else ""
        except ValueError as e:  # a GBNF grammar that does not convert, a schema that is not JSON
            error = str(e)
        if error:
            raise InvalidRequestError(
                f"the structured output {so.kind} cannot be used, correct it: {error.strip()}"
            )
        return [matcher] + [matcher.deep_copy() for _ in range(n - 1)]


def mask_logits(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Logits with every token a row's grammar forbids next at -inf; rows without a grammar untouched.

    Ids past the tokenizer's vocabulary (models pad their embedding matrix) are never allowed.
    """
    rows = [i for i, seq in enumerate(seqs) if seq.matcher is not None]
    if not rows:
        return logits
    bitmasks = b"".join(seqs[i].matcher.compute_bitmask() for i in rows)  # bit t%32 of word t//32: token t
    words = torch.frombuffer(bytearray(bitmasks), dtype=torch.int32).view(len(rows), -1)
    bits = ((words.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).view(len(rows), -1)
    width = min(bits.shape[1], logits.shape[1])
    allowed = torch.zeros(len(rows), logits.shape[1], dtype=torch.bool)
    allowed[:, :width] = bits[:, :width].bool()
    index = torch.tensor(rows, device=logits.device)
    masked = logits[index].masked_fill(~allowed.to(logits.device), float("-inf"))
    return logits.index_copy(0, index, masked)


def accept_token(seq: Sequence, token_id: int) -> str | None:
    """Advance seq's grammar past its new token; "stop" once the grammar is complete."""
    if not seq.matcher.consume_token(token_id):
        # the mask allows only tokens the grammar takes, so this is a bug here, not the request's fault
        log.error("sequence %s left its grammar: %s", seq.request_id, seq.matcher.get_error())
        return "abort"
    return "stop" if seq.matcher.is_stopped() else None
