"""The system calls: `LLM` for scripts and notebooks, `AsyncLLM` for servers.

Both open the model through the one runtime switch (`llmasos.runtime.open_model`): decoders on the
kernel's engine; encoder-decoders, classifiers and encoders on the other engines of llmasos.runtime.
`LLM` steps the engine in the caller's thread. `AsyncLLM` runs the engine loop in a background thread so
that many asyncio callers share one running batch: new requests and aborts are handed to that
thread through a queue, and outputs come back to each caller's event loop.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from llmasos.config import EngineConfig
from llmasos.errors import InvalidRequestError, LLMasOSError
from llmasos.kernel.engine import EngineStats, LLMEngine, RequestState
from llmasos.outputs import RequestOutput, RequestOutputKind
from llmasos.runtime import Backend, open_model, scoring
from llmasos.runtime.backend import require_engine
from llmasos.sampling_params import SamplingParams, with_output_kind
from llmasos.store import ModelStore
from llmasos.tools import ToolRequest, render_chat, tool_format

if TYPE_CHECKING:  # the guards' detectors load only for an LLM that has guards; the apps when one is made
    import torch

    from llmasos.safety import PolicySet
    from llmasos.safety.requests import RequestGuard
    from llmasos.tasks import Tasks

Messages = list[dict]


class LLM:
    """Offline inference: `LLM("smollm2").generate(["Once upon a time"], SamplingParams(max_tokens=32))`.

    `kind` says what the model is: "decoder" runs on the kernel (`engine`); "seq2seq" (T5, BART),
    "classifier" and "encoder" (RoBERTa) run on the transformers engine, which lacks paging and
    continuous batching but batches each call; a BERT encoder embeds with the sentence-embedding
    engine. `backend` is the opened model (llmasos.runtime.Backend). An LLM offers the Backend's calls
    itself (generate and loglikelihood under its guards, embed, tokenizer, kind, max_model_len), so
    the apps (explain, eval) take one, except `classify`, which here is the task. The everyday tasks
    (`summarize`, `translate`, `classify`, `answer`, `extract`, `complete_code`) work on whichever
    fits; `templates` overrides their prompts (a YAML file or dict shaped like llmasos/tasks/templates.yaml).

    `guards` (a `safety.PolicySet` or a policy file) guards generate, chat and stream as the server
    does: a prompt the policy blocks raises `ContentFilterError`; outputs are redacted, or cut
    before a blocked span with finish_reason "content_filter"; verdicts go to the
    "llmasos.guards" logger.
    """

    def __init__(
        self,
        model: str = "smollm2",
        templates: dict | str | None = None,
        guards: PolicySet | Path | str | None = None,
        **config: object,
    ):
        from llmasos.tasks import Tasks

        self.model = model
        self.backend: Backend = open_model(model, EngineConfig(**config))
        self.model_dir, self.kind = self.backend.model_dir, self.backend.kind
        self.tokenizer = self.backend.tokenizer
        # the kernel's engine for a decoder (stream, chat and explain need it), else None
        self.engine: LLMEngine | None = self.backend.engine if self.kind == "decoder" else None
        self.tasks: Tasks = Tasks(_TaskModel(self), templates)
        self.guards = None
        if guards is not None:  # the detectors take half a second to import
            from llmasos.safety.requests import Guards

            self.guards = Guards.load(guards)

    def shutdown(self) -> None:
        """Stop what outlives this object: the worker processes or Ray actors of a model split over
        ranks (`tensor_parallel_size`). Idempotent; also done when the LLM is garbage-collected, and on
        leaving `with LLM(...) as llm:`."""
        if self.engine is not None:
            self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @classmethod
    def from_pretrained(cls, model: str, progress: bool = True, **kwargs: object) -> LLM:
        """transformers' door to the same constructor, which also downloads: `model` is a store name, a
        catalog name, a local folder or .gguf, or a Hugging Face repo id ("org/name", "org/name@revision")
        pulled into the store first (a progress bar on stderr unless `progress=False`; HF_ENDPOINT and
        HF_TOKEN honoured). `kwargs` are the constructor's: templates, guards, engine settings."""
        return cls(ModelStore().obtain(model, progress), **kwargs)

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        progress: bool = False,
    ) -> list[RequestOutput]:
        """Run all prompts as one continuous batch; outputs in the order of the prompts (progress: a bar
        on stderr that advances as requests finish)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self._guarded(prompts, params, lambda checked: self._generate(checked, params, progress))

    def _generate(self, prompts: list, params, progress: bool = False) -> list[RequestOutput]:
        return self.backend.generate(prompts, params, progress)

    def embed(self, prompts: str | list[str] | list[list[int]]) -> list[list[float]]:
        """One vector per prompt: an encoder's pooled vector (its sentence-transformers recipe), or a
        decoder's last token's final hidden state, L2-normalized; batched as usual."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self.backend.embed(prompts)

    def loglikelihood(self, pairs: list[tuple[str, str]], progress: bool = False) -> list[tuple[float, bool]]:
        """Per (context, continuation): log p(continuation | context), and whether greedy decoding from the
        context gives exactly the continuation (see llmasos.runtime.scoring)."""
        if self.engine is None:
            return self.backend.loglikelihood(pairs, progress=progress)
        return scoring.loglikelihood(self, pairs, progress=progress)  # through generate: under the guards

    # -- the rest of the Backend, read from the opened model ---------------------------------------
    @property
    def name(self) -> str:
        return self.model

    @property
    def max_model_len(self) -> int | None:
        return self.backend.max_model_len

    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backend.dtype

    @property
    def batch_size(self) -> int:
        return self.backend.batch_size

    @property
    def labels(self) -> tuple[str, ...]:
        return self.backend.labels

    @property
    def module(self) -> torch.nn.Module:
        return self.backend.module

    def chat(
        self,
        messages: Messages | list[Messages],
        params: SamplingParams | None = None,
        tools: list[dict] | None = None,
        tool_choice: str | dict = "auto",
        parallel_tool_calls: bool = True,
        tool_call_parser: str | None = None,
    ) -> list[RequestOutput]:
        """Answer one conversation or several. `tools` (OpenAI's `{"type": "function", "function":
        {...}}` dicts) reach the chat template; a reply's calls come back parsed in each completion's
        `tool_calls` (its `text` is then the content), under a grammar when `tool_choice` is
        "required" or names a function, or a tool is `strict`. `tool_call_parser` names the format
        (llmasos.tools.FORMATS) where the template's own is not the one wanted."""
        self._need_kernel("chat")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        request = ToolRequest.from_openai(tools, tool_choice, parallel_tool_calls)
        fmt = tool_format(self.tokenizer, tool_call_parser)

        def run(checked: list[Messages]) -> list[RequestOutput]:
            rendered = [render_chat(self.tokenizer, m, request, fmt) for m in checked]
            plan = rendered[0][1]
            outputs = self._generate(
                [prompt for prompt, _ in rendered], plan.sampling_params(params) if plan else params
            )
            if plan is None:
                return outputs
            return [replace(out, outputs=[plan.read(c) for c in out.outputs]) for out in outputs]

        return self._guarded(conversations, params, run)

    def stream(self, prompt: str | Messages, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text deltas as they are generated; closing the iterator aborts the request."""
        self._need_kernel("stream")
        guard = self._guard(params)
        if guard is not None:
            prompt = guard.check_prompts([prompt])[0]
        if not isinstance(prompt, str):
            prompt = self.tokenizer.apply_chat_template(prompt)
        request_id = self.engine.add_request(prompt, with_output_kind(params, RequestOutputKind.DELTA))
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        if guard is not None:
                            out = guard.rewrite(0, out, delta=True)  # finished once blocked
                        text, finished = out.outputs[0].text, out.finished
                        if text:
                            yield text
        finally:
            self.engine.abort_request(request_id)  # nothing to abort once the engine finished it
            if guard is not None:
                guard.close()

    def _guarded(self, prompts: list, params, run) -> list[RequestOutput]:
        """run(prompts) under the guards: prompts (text, token ids or conversations) checked
        first, outputs rewritten after."""
        guard = self._guard(params)
        if guard is None:
            return run(prompts)
        return [guard.rewrite(i, out) for i, out in enumerate(run(guard.check_prompts(prompts)))]

    def _guard(self, params: SamplingParams | list[SamplingParams] | None) -> RequestGuard | None:
        """The guards of one call, whose verdicts share one request id; None without guards."""
        if self.guards is None:
            return None
        guard = self.guards.request(self.model, None, uuid.uuid4().hex, self.tokenizer)
        guard.check_params(params)
        return guard

    def _need_kernel(self, call: str) -> None:
        if self.engine is None:
            raise InvalidRequestError(
                f"{call} needs a decoder model on the kernel; this {self.kind} model runs on the "
                "transformers engine: use generate (seq2seq), classify (classifier) or embed (encoder)"
            )

    def explain(self, prompt: str | Messages, **options):
        """Per-token logprobs, surprisal, alternatives and input attributions (see llmasos.explain)."""
        from llmasos.explain import explain

        self._need_kernel("explain")
        return explain(self, prompt, **options)

    # -- everyday tasks (llmasos.tasks) --------------------------------------------------------
    def summarize(self, text: str | list[str], max_words: int = 60, max_tokens: int | None = None):
        return self.tasks.summarize(text, max_words, max_tokens)

    def translate(self, text: str | list[str], target: str, source: str = "English", max_tokens=None):
        return self.tasks.translate(text, target, source, max_tokens)

    def classify(self, text: str | list[str], labels: list[str] | None = None):
        return self.tasks.classify(text, labels)

    def answer(self, question: str | list[str], context: str | list[str], max_tokens: int = 64):
        return self.tasks.answer(question, context, max_tokens)

    def extract(self, text: str | list[str], schema: dict, max_tokens: int = 256):
        return self.tasks.extract(text, schema, max_tokens)

    def complete_code(self, code: str | list[str], language: str = "python", max_tokens: int = 128):
        return self.tasks.complete_code(code, language, max_tokens)


class _TaskModel:
    """The Backend the tasks run on: this LLM (so generation and scoring go through its guards), with the
    backend's own `classify`, since LLM.classify is the task itself."""

    def __init__(self, llm: LLM):
        self.llm = llm
        self.classify = llm.backend.classify

    def __getattr__(self, name: str):  # every other part of the Backend: the LLM's
        return getattr(self.llm, name)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue_, item in items:
        queue_.put_nowait(item)


class AsyncLLM:
    """Many concurrent asyncio callers, one running batch.

    ```
    llm = AsyncLLM("smollm2")
    async for out in llm.generate("Hi", SamplingParams(max_tokens=16)): ...
    ```
    """

    def __init__(self, model: str = "smollm2", engine: LLMEngine | None = None, **config: object):
        """engine: a decoder's engine opened already (`open_model(...).engine`, as the server's registry
        does); then `model` and `config` are not used. Otherwise the model opens through the runtime
        switch, and a model that is not a decoder is refused before it loads."""
        if engine is None:
            model_dir = ModelStore().resolve(model)
            require_engine(model_dir, "paged")
            engine = open_model(model, EngineConfig(**config), model_dir).engine
        self.engine = engine
        self.tokenizer = self.engine.tokenizer
        self._inbox: queue.SimpleQueue = (
            queue.SimpleQueue()
        )  # ("add", state, sink) | ("abort", id) | ("stop",)
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread = threading.Thread(target=self._run, name="llmasos-engine", daemon=True)
        self._thread.start()

    def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        strict: bool = False,
        agent: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Validate now (raising InvalidRequestError before anything is queued; `strict`: prompt +
        max_tokens must fit the context, the OpenAI API's rule), then return an iterator that queues the
        request when first iterated and yields a RequestOutput each time it progresses; the last is
        finished.

        Each output holds what `params.output_kind` says: all the output so far (CUMULATIVE, the
        default), only what is new since the previous one (DELTA), or everything once (FINAL_ONLY).
        `agent`: the agent this request is a turn of (its quota, priority class and kept context)."""
        if not self.alive:
            raise LLMasOSError("this AsyncLLM was shut down; create a new one")
        return self._outputs(
            self.engine.make_request(
                prompt, params, request_id, priority, cache_salt, strict=strict, agent=agent
            )
        )

    async def embed(
        self, prompt: str | list[int], request_id: str | None = None, cache_salt: str | None = None
    ) -> RequestOutput:
        """The prompt's embedding (RequestOutput.embedding), computed in the running batch."""
        state = self.engine.make_request(prompt, None, request_id, cache_salt=cache_salt, pooling=True)
        async for out in self._outputs(state):
            if out.finished:
                return out
        raise LLMasOSError(f"the embedding request {state.request_id} ended without a result")

    @property
    def stats(self) -> EngineStats:
        """Read from another thread between steps: plain counters and list lengths, so at worst a
        step behind, and nothing is added to the engine's step for it."""
        return self.engine.stats()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    async def _outputs(self, state: RequestState) -> AsyncIterator[RequestOutput]:
        sink: asyncio.Queue = asyncio.Queue()
        self._inbox.put(("add", state, (asyncio.get_running_loop(), sink)))
        finished = False
        try:
            while not finished:
                out = await sink.get()
                if isinstance(out, BaseException):  # the request is already over (refused or failed)
                    finished = True
                    raise out
                finished = out.finished
                yield out
        finally:
            if not finished:
                self._inbox.put(("abort", state.request_id))

    def chat(
        self, messages: Messages, params: SamplingParams | None = None, **kwargs
    ) -> AsyncIterator[RequestOutput]:
        return self.generate(self.tokenizer.apply_chat_template(messages), params, **kwargs)

    def shutdown(self) -> None:
        """Stop the engine thread (callers still waiting get an error), then the engine's workers."""
        self._inbox.put(("stop",))
        self._thread.join()
        self.engine.shutdown()

    def _deliver(self, request_id: str, item: RequestOutput | BaseException, last: bool) -> None:
        sink = self._sinks.pop(request_id) if last else self._sinks[request_id]
        if not self._put(sink, item):  # the caller's event loop is gone: nobody waits for this request
            self._sinks.pop(request_id, None)
            self.engine.abort_request(request_id)

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs with one wake-up per event loop: each call_soon_threadsafe writes to the
        loop's self-pipe, and one per request and step was 5% of the engine thread under 16 streams."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[str, asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            sink = self._sinks.pop(out.request_id, None) if out.finished else self._sinks.get(out.request_id)
            if sink is not None:
                batches.setdefault(sink[0], []).append((out.request_id, sink[1], out))
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, [(queue_, out) for _, queue_, out in items])
            except RuntimeError:  # the caller's event loop is gone: nobody waits for these requests
                for request_id, _, _ in items:
                    self._sinks.pop(request_id, None)
                    self.engine.abort_request(request_id)

    @staticmethod
    def _put(sink: tuple[asyncio.AbstractEventLoop, asyncio.Queue], item) -> bool:
        loop, queue_ = sink
        try:
            loop.call_soon_threadsafe(queue_.put_nowait, item)
            return True
        except RuntimeError:  # loop closed
            return False

    def _handle(self, message: tuple) -> bool:
        kind = message[0]
        if kind == "add":
            _, state, sink = message
            if state.request_id in self._sinks or state.request_id in self.engine.requests:
                self._put(sink, InvalidRequestError(f"request id {state.request_id!r} is already in use"))
                return True
            self._sinks[state.request_id] = sink
            try:
                self.engine.enqueue(state)
            except Exception as exc:  # handed to the caller, never kills the loop
                self._deliver(state.request_id, exc, last=True)
        elif kind == "abort":
            self.engine.abort_request(message[1])
            self._sinks.pop(message[1], None)
        return kind != "stop"

    def _run(self) -> None:
        while True:
            block = not self.engine.has_unfinished()
            try:
                message = self._inbox.get(block=block)
            except queue.Empty:
                message = None
            if message is not None:
                if not self._handle(message):
                    break
                continue  # drain the inbox before stepping
            try:
                self._deliver_step(self.engine.step())
            except Exception as exc:  # fail every waiting caller rather than leave them hanging
                for request_id in list(self._sinks):
                    self.engine.abort_request(request_id)
                    self._deliver(request_id, exc, last=True)
        for request_id in list(self._sinks):
            self.engine.abort_request(request_id)
            self._deliver(request_id, RuntimeError("the engine was shut down"), last=True)
