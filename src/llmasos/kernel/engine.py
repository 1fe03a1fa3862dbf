"""LLMEngine: text in, text out, around the token-level `EngineCore`.

It resolves the model through the store, tokenizes (chat templates included), validates
requests before they reach the kernel, detokenizes incrementally, applies stop strings, and
assembles `RequestOutput`s. Text is released append-only: while a stop string could still be
completing, its possible prefix is held back, so streamed deltas never need to be taken back.

Each request's `SamplingParams.output_kind` picks its outputs: CUMULATIVE (all so far, every step),
DELTA (only what is new) or FINAL_ONLY (one, at the end). A step's work for a DELTA or FINAL_ONLY
request is O(its new tokens): released text is kept as a list of chunks, stop strings are looked
for only in the short tail that can hold a new match, and nothing copies the whole output.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmasos.config import EngineConfig
from llmasos.errors import ContextLengthError, InvalidRequestError
from llmasos.kernel.core import EngineCore, EngineStats
from llmasos.kernel.sequence import Sequence
from llmasos.kernel.structured import GrammarCompiler
from llmasos.outputs import CompletionOutput, RequestMetrics, RequestOutput, RequestOutputKind
from llmasos.sampling_params import SamplingParams
from llmasos.tokenizer import ChatPrompt

log = logging.getLogger("llmasos")


@dataclass
class SeqText:
    """One sequence's text: released chunks (final, visible), and the tail held back from them while
    a stop string may still be completing; what the last DELTA output handed out."""

    detokenizer: object
    chunks: list[str] = field(default_factory=list)
    tail: str = ""
    sent_chunks: int = 0  # chunks, token ids and logprobs that earlier DELTA outputs carried
    sent_tokens: int = 0
    num_detokenized: int = 0  # output tokens given to the detokenizer so far
    _joined: str = ""  # the first `_num_joined` chunks as one string, for CUMULATIVE outputs
    _num_joined: int = 0

    @property
    def text(self) -> str:
        """All the released text (joined once per call, from where the last call left off)."""
        if self._num_joined < len(self.chunks):
            self._joined += "".join(self.chunks[self._num_joined :])
            self._num_joined = len(self.chunks)
        return self._joined

    def release(self, keep: int) -> None:
        """Move the tail, but for its last `keep` characters, to the released text."""
        cut = max(len(self.tail) - keep, 0)
        if cut:
            self.chunks.append(self.tail[:cut])
            self.tail = self.tail[cut:]


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    texts: list[SeqText] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)


class LLMEngine:
    def __init__(self, model: str, config: EngineConfig | None = None, model_dir: Path | None = None):
        """model_dir: the folder `ModelStore().resolve(model)` gives, when the caller resolved it already."""
        from llmasos.models.loader import read_hf_config
        from llmasos.store import ModelStore
        from llmasos.tokenizer import Tokenizer

        self.config = config or EngineConfig()
        self.model_dir = model_dir or ModelStore().resolve(model)
        self.model_name = model
        self.tokenizer = Tokenizer.from_dir(self.model_dir)
        hf_config = read_hf_config(self.model_dir)
        context = hf_config.get("max_position_embeddings") or hf_config.get("n_positions") or 2048
        self.max_model_len = min(self.config.max_model_len or context, context)
        self.core = EngineCore(self.model_dir, self.config, self.tokenizer.eos_token_ids, self.max_model_len)
        self.grammars = GrammarCompiler(self.tokenizer)
        self.requests: dict[str, RequestState] = {}
        self._ids = itertools.count()
        self._seeds = random.Random(self.config.seed)

    # -- requests -----------------------------------------------------------------------------
    def make_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        pooling: bool = False,
        strict: bool = False,
        agent: str | None = None,
    ) -> RequestState:
        """Tokenize and validate; raises InvalidRequestError (ContextLengthError) before anything is queued.
        `strict` is `check_context`'s (the OpenAI API's rule).

        `agent` names the agent (a kernel process) this request is a turn of: its KV-block quota, its
        priority class (`EngineConfig.agent_priority`, which overrides `priority`), its pinned context
        and its attained service under the "las" policy apply.

        Requests with different cache_salt never share prefix-cache blocks (the server salts per key).
        A pooling request computes its prompt like any other, in the same batches, and ends with the
        embedding of its last token (the final hidden state, L2-normalized) instead of new tokens.
        """
        params = SamplingParams(max_tokens=1) if pooling else params or SamplingParams()
        if isinstance(prompt, str):  # a rendered chat prompt holds its own special tokens
            prompt_text = prompt
            prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=not isinstance(prompt, ChatPrompt))
        else:
            prompt_text, prompt_ids = None, list(prompt)
            vocab_size = self.vocab_size
            if any(not 0 <= t < vocab_size for t in prompt_ids):
                raise InvalidRequestError("the prompt has token ids outside the model's vocabulary")
        limit = params.truncate_prompt_tokens
        if limit is not None and len(prompt_ids) > limit:
            log.warning("prompt truncated from %d to its last %d tokens", len(prompt_ids), limit)
            prompt_ids = prompt_ids[-limit:]
        self.check_context(len(prompt_ids), params.max_tokens, strict)
        if agent is not None:
            self._check_quota(len(prompt_ids), params.max_tokens)
            priority = self.config.agent_priority.get(agent, priority)
        structured = params.structured_output
        matchers = self.grammars.matchers(structured, params.n) if structured else [None] * params.n
        request_id = request_id or f"req-{next(self._ids)}"
        if params.lora is not None:  # an adapter changes every layer's K/V: its prefixes are its own
            self.check_lora(params.lora)
            cache_salt = f"{cache_salt or ''}\0lora:{params.lora}"
        salt = hashlib.sha256(cache_salt.encode()).digest() if cache_salt else b""
        seqs = [
            Sequence(
                request_id=request_id,
                prompt_token_ids=prompt_ids,
                params=params,
                index=i,
                priority=priority,
                cache_salt=salt,
                agent=agent,
                seed=None if params.seed is not None else self._seeds.getrandbits(31),
                matcher=matchers[i],
                pooling=pooling,
            )
            for i in range(params.n)
        ]
        texts = [SeqText(self.tokenizer.detokenizer(prompt_ids, params.skip_special_tokens)) for _ in seqs]
        return RequestState(request_id, prompt_text, prompt_ids, params, seqs, texts)

    def check_lora(self, name: str) -> None:
        """Refuse a request for a LoRA adapter the engine cannot run before it is queued: LoRA off, an
        unknown adapter (ModelNotFoundError), another base's adapter, or a rank above the slots'."""
        lora = self.core.runner.lora
        if lora is None:
            raise InvalidRequestError(
                f"the request names the LoRA adapter {name!r} but this engine runs without adapters: "
                "start it with enable_lora=True (llmasos serve --enable-lora)"
            )
        lora.check(name)

    def check_context(self, num_prompt_tokens: int, max_tokens: int, strict: bool = False) -> None:
        """The one check of a request's length, so what could never run is refused at once.

        The prompt must leave room for a token, and prompt + max_tokens (cut at the context) must fit
        in the KV cache. With `strict` (the OpenAI API's rule) prompt + max_tokens must fit in the
        context too; otherwise generation stops at its end with finish_reason "length".
        """
        if num_prompt_tokens == 0:
            raise InvalidRequestError("the prompt is empty: give at least one token of text")
        context, capacity, total = self.max_model_len, self.kv_capacity_tokens, num_prompt_tokens + max_tokens
        if num_prompt_tokens >= context or min(total, context) > capacity or (strict and total > context):
            raise ContextLengthError(num_prompt_tokens, max_tokens, context, capacity)

    def _check_quota(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """An agent's turn must fit its KV-block quota alone, or it could never run."""
        quota = self.config.agent_kv_quota_blocks
        needed = -(-min(num_prompt_tokens + max_tokens, self.max_model_len) // self.config.block_size)
        if quota is not None and needed > quota:
            raise InvalidRequestError(
                f"this turn needs {needed} KV blocks (prompt {num_prompt_tokens} + max_tokens {max_tokens} "
                f"tokens) but an agent may hold {quota}: lower max_tokens, shorten the prompt, or raise "
                "agent_kv_quota_blocks"
            )

    def enqueue(self, state: RequestState) -> None:
        if state.request_id in self.requests:
            raise InvalidRequestError(f"request id {state.request_id!r} is already in use")
        self.requests[state.request_id] = state
        for seq in state.seqs:
            self.core.add(seq)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None, **kwargs) -> str:
        state = self.make_request(prompt, params, **kwargs)
        self.enqueue(state)
        return state.request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        self.core.finish(state.seqs, "abort")
        return self._output(state)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def shutdown(self) -> None:
        """Release what outlives the engine object: the worker processes of a tensor-parallel model
        (they are also stopped when the engine is garbage-collected)."""
        self.core.shutdown()

    # -- what outsiders may read (the core, runner and block manager stay inside the kernel) ---------
    def stats(self) -> EngineStats:
        return self.core.stats()

    @property
    def kv_capacity_tokens(self) -> int:
        """How many tokens the KV cache holds, all sequences together."""
        return self.core.kv_capacity_tokens

    @property
    def memory_bytes(self) -> int:
        """The model's tensors plus the KV cache tensor (and a draft model's, speculative decoding)."""
        return self.core.memory_bytes

    @property
    def model(self) -> torch.nn.Module:
        """The loaded driver (for explain and benchmarks: read it, don't rebind its caches)."""
        return self.core.runner.model

    @property
    def vocab_size(self) -> int:
        return self.core.runner.model.config.vocab_size

    @property
    def device(self) -> torch.device:
        return self.core.runner.device

    @property
    def dtype(self) -> torch.dtype:
        return self.core.runner.dtype

    @property
    def num_steps(self) -> int:
        """Engine steps run so far (a step runs one batch)."""
        return self.core.num_steps

    # -- stepping -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        touched: dict[str, RequestState] = {}
        for event in self.core.step():
            state = self.requests.get(event.seq.request_id)
            if state is None:
                continue
            if event.token is not None:
                self._append_text(state, event.seq, event.token.token_id)
            touched[state.request_id] = state
        outputs = []
        for state in touched.values():
            if state.finished:
                del self.requests[state.request_id]
            if state.finished or state.params.output_kind is not RequestOutputKind.FINAL_ONLY:
                outputs.append(self._output(state))
        return outputs

    def _append_text(self, state: RequestState, seq: Sequence, token_id: int) -> None:
        seq_text = state.texts[seq.index]
        params = state.params
        # a step may give a sequence several tokens (speculative decoding) and end it at the last one:
        # only that one may stop it or flush its held-back bytes
        seq_text.num_detokenized += 1
        last = seq_text.num_detokenized == seq.num_output_tokens
        if isinstance(seq.stop_reason, str):  # a stop string ended it at an earlier token of this step
            return
        # EOS has no text of its own; a stop token id's text is kept only when asked for, as vLLM does.
        # A grammar that completes (structured output) stops on a token that is part of the output.
        stopped_by_token = (
            last
            and seq.finish_reason == "stop"
            and (token_id == seq.stop_reason or token_id in self.core.eos_token_ids)
        )
        keep = not stopped_by_token or (seq.stop_reason is not None and params.include_stop_str_in_output)
        delta = seq_text.detokenizer.step(token_id) if keep else ""
        if seq.is_finished and last:
            delta += seq_text.detokenizer.flush()  # bytes held back for an incomplete character
        if not params.stop:
            seq_text.tail = delta
            seq_text.release(0)
            return
        # the tail holds the longest stop string's length - 1 characters before the delta: a new match
        # starts at most that far back
        tail = seq_text.tail = seq_text.tail + delta
        for stop in params.stop:
            at = tail.find(stop, max(0, len(tail) - len(delta) - len(stop) + 1))
            if at >= 0:
                seq_text.tail = tail[: at + (len(stop) if params.include_stop_str_in_output else 0)]
                self.core.finish([seq], "stop")
                seq.stop_reason = stop
                break
        seq_text.release(0 if seq.is_finished else max(len(stop) for stop in params.stop) - 1)

    def _completion(self, state: RequestState, seq: Sequence) -> CompletionOutput:
        seq_text = state.texts[seq.index]
        if seq.is_finished:  # an aborted sequence shows what it held back for stop strings
            seq_text.release(0)
        logprobs = seq.logprobs if state.params.logprobs is not None else None
        if state.params.output_kind is RequestOutputKind.DELTA:
            chunks, tokens = seq_text.chunks, seq_text.sent_tokens
            text = "".join(chunks[seq_text.sent_chunks :])
            token_ids = seq.token_ids[seq.num_prompt_tokens + tokens :]
            logprobs = logprobs[tokens:] if logprobs is not None else None
            seq_text.sent_chunks, seq_text.sent_tokens = len(chunks), tokens + len(token_ids)
        else:  # copies, so that an output is not changed by later steps
            text, token_ids = seq_text.text, seq.output_token_ids
            logprobs = list(logprobs) if logprobs is not None else None
        return CompletionOutput(
            index=seq.index,
            text=text,
            token_ids=token_ids,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            logprobs=logprobs,
            cumulative_logprob=seq.cumulative_logprob if state.params.logprobs is not None else None,
        )

    def _output(self, state: RequestState) -> RequestOutput:
        completions = [self._completion(state, seq) for seq in state.seqs]
        first = state.seqs[0]
        metrics = RequestMetrics(
            arrival_time=first.events.queued,
            first_scheduled_time=first.events.scheduled,
            first_token_time=min(
                (s.events.first_token for s in state.seqs if s.events.first_token), default=None
            ),
            finished_time=max((s.events.finished or 0 for s in state.seqs), default=None)
            if state.finished
            else None,
            num_preemptions=sum(s.events.preemptions for s in state.seqs),
            last_token_time=max((s.events.last_token or 0 for s in state.seqs), default=None) or None,
        )
        completion_tokens = sum(seq.num_output_tokens for seq in state.seqs)
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=completions,
            finished=state.finished,
            num_cached_tokens=first.num_cached_tokens,
            metrics=metrics,
            usage={
                "prompt_tokens": len(state.prompt_token_ids),
                "completion_tokens": completion_tokens,
                "total_tokens": len(state.prompt_token_ids) + completion_tokens,
            },
            embedding=first.embedding,
            prompt_logprobs=first.prompt_logprobs if state.params.prompt_logprobs is not None else None,
        )
