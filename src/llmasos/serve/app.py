"""The OpenAI-compatible HTTP service: routes, and the path of one request through them.

A request is authenticated (API key), checked against its key's models and limits, admitted if
the model's queue has room, tokenized, turned into SamplingParams and handed to the model's
`AsyncLLM`, whose one engine thread batches it with everyone else's. Outputs come back per step
and leave as one JSON body or as server-sent events. A client that disconnects aborts its request
at once, which frees its KV blocks. Every error leaves as an OpenAI error object.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException

from llmasos.errors import LLMasOSError
from llmasos.outputs import CompletionOutput, RequestOutput
from llmasos.serve.audit import AuditLog
from llmasos.serve.errors import APIError, validation_error
from llmasos.serve.keys import ApiKey, KeyStore
from llmasos.serve.limits import RateLimiter
from llmasos.serve.metrics import ServerMetrics
from llmasos.serve.middleware import AuditTrail, BodyLimit
from llmasos.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    _SamplingBody,
)
from llmasos.serve.registry import LoadedModel, ModelRegistry, RegistryConfig
from llmasos.tokenizer import Tokenizer

log = logging.getLogger("llmasos.serve")


@dataclass
class ServerConfig:
    registry: RegistryConfig
    keys_file: Path | None = None  # None: $LLMASOS_HOME/keys.json; keys are required once it has any
    audit_file: Path | None = None  # None: $LLMASOS_HOME/audit.jsonl
    audit_prompts: bool = False  # write prompt text into the audit log
    max_queue: int = 256  # requests per model waiting beyond the running batch; past it, 503
    request_timeout_s: float = 600.0
    max_body_bytes: int = 8 * 2**20
    preload: bool = True  # load the named models at start-up (then /ready means they are loaded)


@dataclass
class Job:
    """One API call in flight: its model, its engine requests (one per prompt) and its tally."""

    model: LoadedModel
    streams: list[AsyncIterator[RequestOutput]]
    n: int
    request_id: str
    key: ApiKey | None
    prompts: list[str | list[int]]
    created: int = field(default_factory=lambda: int(time.time()))
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    closed: bool = False

    def usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


class _Stream(StreamingResponse):
    """A streaming response that runs on_close however it ends, even if its body never started
    (a client gone before the first byte), so the model's in-flight count is never leaked."""

    def __init__(self, content, *, on_close: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Server:
    def __init__(self, config: ServerConfig, is_shutting_down=lambda: False):
        self.config = config
        self.registry = ModelRegistry(config.registry)
        self.keys = KeyStore(config.keys_file)
        self.limiter = RateLimiter()
        self.audit = AuditLog(config.audit_file, include_prompts=config.audit_prompts)
        self.metrics = ServerMetrics()
        self.is_shutting_down = is_shutting_down
        self.started = int(time.time())

    # -- users and permissions ---------------------------------------------------------------
    def authenticate(self, request: Request) -> ApiKey | None:
        """The caller's key, or None when no keys are configured; 401 otherwise."""
        if not self.keys.list():  # no keys configured (revoked ones count: revoking never opens a server)
            return None
        scheme, _, secret = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise APIError(
                401,
                "this server needs an API key: send 'Authorization: Bearer <key>' "
                "(an administrator makes one with `llmasos keys add NAME`)",
                code="invalid_api_key",
            )
        key = self.keys.authenticate(secret.strip())
        if key is None:
            raise APIError(401, "the API key is not valid or was revoked", code="invalid_api_key")
        request.state.key_name = key.name
        return key

    def _check_model_allowed(self, key: ApiKey | None, model: str) -> None:
        if key is not None and not key.allows_model(model):
            raise APIError(
                403,
                f"the key {key.name!r} may not use the model {model!r}",
                param="model",
                code="model_not_allowed",
            )

    def _admit(self, key: ApiKey | None, model: LoadedModel, estimated_tokens: int) -> None:
        engine_config = self.config.registry.engine
        if model.in_flight > engine_config.max_num_seqs + self.config.max_queue:
            raise APIError(
                503,
                f"the model {model.name!r} has a full queue; retry later",
                code="queue_full",
                retry_after=1,
            )
        if key is not None:
            decision = self.limiter.admit(key, estimated_tokens)
            if not decision.allowed:
                raise APIError(
                    429, decision.message, code="rate_limit_exceeded", retry_after=decision.retry_after
                )

    def _record_usage(self, request: Request, job: Job) -> None:
        request.state.prompt_tokens = job.prompt_tokens
        request.state.completion_tokens = job.completion_tokens
        if job.key is not None:
            tokens = job.prompt_tokens + job.completion_tokens
            self.limiter.record(job.key, tokens)
            self.keys.record_usage(job.key.name, tokens)

    # -- generation ----------------------------------------------------------------------------
    async def start(
        self,
        request: Request,
        key: ApiKey | None,
        body: _SamplingBody,
        make_prompts: Callable[[Tokenizer], list[str | list[int]]],
    ) -> Job:
        """Everything that can refuse the request, before any output is produced.

        make_prompts renders the request's prompts once the model (and so its tokenizer) is loaded.
        """
        request.state.model = body.model
        self._check_model_allowed(key, body.model)
        model = await self.registry.acquire(body.model)
        try:
            if model.is_embedder:
                raise APIError(
                    400, f"{body.model!r} is an embedding model: use POST /v1/embeddings", param="model"
                )
            llm = model.runner
            prompts = make_prompts(llm.tokenizer)
            ids = [llm.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
            engine = llm.engine
            longest = max(len(i) for i in ids)
            context = min(engine.max_model_len, engine.core.kv_capacity_tokens)
            if longest >= engine.max_model_len:
                raise APIError(
                    400,
                    f"the prompt has {longest} tokens but the model's context is {engine.max_model_len}; "
                    "shorten it",
                    param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                    code="context_length_exceeded",
                )
            params = body.sampling_params(default_max_tokens=max(context - longest, 1))
            if longest + params.max_tokens > engine.max_model_len:
                raise APIError(
                    400,
                    f"this model's maximum context length is {engine.max_model_len} tokens, but {longest} are "
                    f"in the prompt and max_tokens asks for {params.max_tokens} more; lower max_tokens",
                    param="max_tokens",
                    code="context_length_exceeded",
                )
            estimate = sum(len(i) for i in ids) + params.max_tokens * params.n * len(ids)
            self._admit(key, model, estimate)
            request_id = uuid.uuid4().hex
            request.state.request_id = request_id
            if self.config.audit_prompts:
                request.state.prompt = prompts[0] if len(prompts) == 1 else prompts
            salt = key.name if key is not None else None
            streams = [
                llm.generate(p, params, request_id=f"{request_id}-{i}", cache_salt=salt)
                for i, p in enumerate(ids)
            ]
        except BaseException:
            self.registry.release(model)
            raise
        return Job(model, streams, params.n, request_id, key, prompts)

    async def outputs(self, job: Job) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) as the engine produces them, within the request timeout."""
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
            try:
                async for out in stream:
                    queue.put_nowait((index, out))
            except Exception as exc:  # handed to the consumer
                queue.put_nowait((index, exc))
            queue.put_nowait((index, done))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(job.streams)]
        previous: dict[int, RequestOutput] = {}
        deadline = time.monotonic() + self.config.request_timeout_s
        try:
            remaining = len(tasks)
            while remaining:
                try:
                    index, item = await asyncio.wait_for(queue.get(), max(deadline - time.monotonic(), 0))
                except asyncio.TimeoutError:
                    raise APIError(
                        503,
                        f"the request ran longer than {self.config.request_timeout_s:g} s and was stopped "
                        "(llmasos serve --request-timeout)",
                        code="timeout",
                    ) from None
                if item is done:
                    remaining -= 1
                    continue
                if isinstance(item, Exception):
                    raise item
                self.metrics.observe_output(job.model.name, item, previous.get(index))
                previous[index] = item
                if item.finished:
                    job.prompt_tokens += item.usage["prompt_tokens"]
                    job.completion_tokens += item.usage["completion_tokens"]
                    job.cached_tokens += item.num_cached_tokens
                yield index, item
        finally:
            for task in tasks:
                task.cancel()  # aborts what is still running: frees its KV blocks

    async def collect(self, request: Request, job: Job) -> dict[int, RequestOutput]:
        """The final outputs, or ClientGone if the client leaves first (its requests are aborted)."""

        async def gather() -> dict[int, RequestOutput]:
            finals = {}
            async for index, out in self.outputs(job):
                if out.finished:
                    finals[index] = out
            return finals

        work = asyncio.ensure_future(gather())
        watch = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
        if work.cancelled():
            raise ClientGone
        return work.result()

    def finish(self, request: Request, job: Job) -> None:
        """Account for the job and release its model; safe to call more than once."""
        if job.closed:
            return
        job.closed = True
        self._record_usage(request, job)
        self.registry.release(job.model)


# -- response shapes ------------------------------------------------------------------------------
def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _chat_logprobs(tokenizer, completion: CompletionOutput, start: int, k: int) -> dict | None:
    if completion.logprobs is None:
        return None
    content = []
    for token_id, alternatives in zip(completion.token_ids[start:], completion.logprobs[start:]):
        text = _token_text(tokenizer, token_id)
        top = sorted(alternatives.items(), key=lambda item: -item[1])[:k]
        content.append(
            {
                "token": text,
                "logprob": alternatives[token_id],
                "bytes": list(text.encode()),
                "top_logprobs": [
                    {"token": (t := _token_text(tokenizer, i)), "logprob": lp, "bytes": list(t.encode())}
                    for i, lp in top
                ],
            }
        )
    return {"content": content}


def _completion_logprobs(
    tokenizer, completion: CompletionOutput, start: int, k: int, offset: int
) -> dict | None:
    if completion.logprobs is None:
        return None
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for token_id, alternatives in zip(completion.token_ids[start:], completion.logprobs[start:]):
        text = _token_text(tokenizer, token_id)
        tokens.append(text)
        token_logprobs.append(alternatives[token_id])
        top = sorted(alternatives.items(), key=lambda item: -item[1])[:k]
        top_logprobs.append({_token_text(tokenizer, i): lp for i, lp in top})
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }


@dataclass
class _ChoiceCursor:
    """How much of one choice a stream has sent."""

    text: int = 0
    tokens: int = 0
    finished: bool = False
    started: bool = False


def _choices_so_far(job: Job, index: int, out: RequestOutput):
    for completion in out.outputs:
        yield index * job.n + completion.index, completion


def create_app(config: ServerConfig, is_shutting_down=lambda: False) -> FastAPI:
    server = Server(config, is_shutting_down)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if config.preload:
            for name in config.registry.models:
                model = await server.registry.acquire(name)
                server.registry.release(model)
        expiry = asyncio.ensure_future(
            _expire_idle_models(server, min(5.0, max(config.registry.keep_alive_s / 4, 0.05)))
        )
        try:
            yield
        finally:
            expiry.cancel()
            server.registry.close()
            server.keys.flush()
            server.audit.close()

    app = FastAPI(title="LLMasOS", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        request.state.status = exc.status
        return exc.response()

    @app.exception_handler(LLMasOSError)
    async def user_error(request: Request, exc: LLMasOSError):
        return await api_error(request, APIError(400, str(exc)))

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if errors and errors[0].get("type") == "json_invalid":
            error = APIError(400, "the request body is not valid JSON", code="invalid_json")
        else:
            error = validation_error(errors)
        return await api_error(request, error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        message = {
            400: "the request body could not be read: send UTF-8 encoded JSON",
            404: f"there is no route {request.url.path}",
            405: f"{request.method} is not allowed on {request.url.path}",
        }.get(exc.status_code, str(exc.detail))
        return await api_error(request, APIError(exc.status_code, message))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return await api_error(
            request, APIError(500, f"internal error: {type(exc).__name__}; see the server log")
        )

    auth = Depends(server.authenticate)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", dependencies=[auth])
    async def ready():
        loaded = server.registry.loaded
        problems = [
            f"{name} is not loaded"
            for name in config.registry.models
            if config.preload and name not in loaded
        ]
        problems += [f"the engine of {name} has stopped" for name, m in loaded.items() if not m.healthy()]
        if server.is_shutting_down():
            problems.append("the server is shutting down")
        if problems:
            raise APIError(503, "; ".join(problems), retry_after=5)
        return {"status": "ready", "models": sorted(loaded)}

    @app.get("/metrics", dependencies=[auth])
    async def metrics():
        for name, model in server.registry.loaded.items():
            if not model.is_embedder:
                server.metrics.update_engine(name, model.runner.stats)
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": server.started, "owned_by": "llmasos"}

    @app.get("/v1/models")
    async def list_models(key: ApiKey | None = auth):
        names = [n for n in server.registry.servable() if key is None or key.allows_model(n)]
        return {"object": "list", "data": [model_card(n) for n in names]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, key: ApiKey | None = auth):
        server.registry.check_servable(model_id)
        server._check_model_allowed(key, model_id)
        return model_card(model_id)

    @app.get("/v1/ps", dependencies=[auth])
    async def ps():
        now = time.monotonic()
        keep_alive = config.registry.keep_alive_s
        rows = []
        for name, m in server.registry.loaded.items():
            stats = None if m.is_embedder else m.runner.stats
            rows.append(
                {
                    "model": name,
                    "kind": "embedding" if m.is_embedder else "generation",
                    "memory_bytes": m.memory_bytes,
                    "in_flight": m.in_flight,
                    "running": stats.num_running if stats else 0,
                    "waiting": stats.num_waiting if stats else 0,
                    "kv_cache_usage": stats.kv_cache_usage if stats else None,
                    "loaded_at": m.loaded_at,
                    "expires_in_s": None
                    if keep_alive < 0 or m.in_flight
                    else max(keep_alive - (now - m.last_used), 0),
                }
            )
        return {"models": rows, "memory_bytes": server.registry.memory_in_use()}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request, key: ApiKey | None = auth):
        conversation = body.conversation()
        job = await server.start(request, key, body, lambda tok: [tok.apply_chat_template(conversation)])
        return await respond(request, job, body, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, key: ApiKey | None = auth):
        prompts = body.prompts()
        job = await server.start(request, key, body, lambda _: prompts)
        return await respond(request, job, body, chat=False)

    async def respond(request: Request, job: Job, body: _SamplingBody, chat: bool):
        tokenizer = job.model.runner.tokenizer
        k = (body.top_logprobs or 0) if chat else (body.logprobs or 0)
        echo = not chat and body.echo
        prefixes = [(p if isinstance(p, str) else tokenizer.decode(p)) if echo else "" for p in job.prompts]
        kind = "chat.completion" if chat else "text_completion"
        response_id = f"{'chatcmpl' if chat else 'cmpl'}-{job.request_id}"
        header = {"id": response_id, "created": job.created, "model": body.model}

        def choice(index: int, completion: CompletionOutput, cursor: _ChoiceCursor, stream: bool) -> dict:
            text = completion.text[cursor.text :]
            prefix = prefixes[index // job.n] if not cursor.started else ""
            finish = completion.finish_reason if completion.finish_reason != "abort" else "stop"
            if chat:
                logprobs = _chat_logprobs(tokenizer, completion, cursor.tokens, k)
                message = {"content": text} if cursor.started else {"role": "assistant", "content": text}
                entry = {"index": index, ("delta" if stream else "message"): message, "logprobs": logprobs}
            else:
                offset = len(prefix) + cursor.text
                logprobs = _completion_logprobs(tokenizer, completion, cursor.tokens, k, offset)
                entry = {"index": index, "text": prefix + text, "logprobs": logprobs}
            entry["finish_reason"] = finish
            cursor.text, cursor.tokens, cursor.started = len(completion.text), len(completion.token_ids), True
            cursor.finished = finish is not None
            return entry

        if not body.stream:
            try:
                finals = await server.collect(request, job)
            except ClientGone:
                request.state.status = 499
                return Response(status_code=499)
            finally:
                server.finish(request, job)
            choices = [
                choice(i, c, _ChoiceCursor(), stream=False)
                for index in sorted(finals)
                for i, c in _choices_so_far(job, index, finals[index])
            ]
            choices.sort(key=lambda c: c["index"])
            return {"object": kind, **header, "choices": choices, "usage": job.usage()}

        chunk_kind = "chat.completion.chunk" if chat else "text_completion"
        usage_field = {"usage": None} if body.include_usage else {}

        async def events() -> AsyncIterator[str]:
            cursors: dict[int, _ChoiceCursor] = {}
            try:
                async for index, out in server.outputs(job):
                    choices = []
                    for i, completion in _choices_so_far(job, index, out):
                        cursor = cursors.setdefault(i, _ChoiceCursor())
                        news = len(completion.text) > cursor.text or completion.finish_reason is not None
                        if cursor.finished or not (news or not cursor.started):
                            continue
                        choices.append(choice(i, completion, cursor, stream=True))
                    if choices:
                        chunk = {"object": chunk_kind, **header, "choices": choices, **usage_field}
                        yield f"data: {json.dumps(chunk)}\n\n"
                if body.include_usage:
                    chunk = {"object": chunk_kind, **header, "choices": [], "usage": job.usage()}
                    yield f"data: {json.dumps(chunk)}\n\n"
            except APIError as exc:
                request.state.status = exc.status
                yield exc.sse()
            except LLMasOSError as exc:
                request.state.status = 400
                yield APIError(400, str(exc)).sse()
            except Exception as exc:
                log.exception("error in a stream")
                request.state.status = 500
                yield APIError(500, f"internal error: {type(exc).__name__}; see the server log").sse()
            finally:
                server.finish(request, job)
            yield "data: [DONE]\n\n"

        return _Stream(events(), media_type="text/event-stream", on_close=lambda: server.finish(request, job))

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request, key: ApiKey | None = auth):
        request.state.model = body.model
        server._check_model_allowed(key, body.model)
        inputs = body.inputs()
        model = await server.registry.acquire(body.model)
        try:
            if not model.is_embedder:
                raise APIError(
                    400,
                    f"{body.model!r} is a generative model; embeddings come from sentence-embedding models",
                    param="model",
                )
            server._admit(key, model, 0)

            def embed():
                with model.lock:
                    return model.runner.embed(inputs)

            result = await asyncio.to_thread(embed)
        finally:
            server.registry.release(model)
        request.state.prompt_tokens = result.prompt_tokens
        if key is not None:
            server.limiter.record(key, result.prompt_tokens)
            server.keys.record_usage(key.name, result.prompt_tokens)
        data = []
        for i, vector in enumerate(result.vectors):
            vector = np.asarray(vector, dtype=np.float32)
            if body.dimensions is not None:
                if not 1 <= body.dimensions <= len(vector):
                    raise APIError(
                        400,
                        f"dimensions must be between 1 and {len(vector)} for this model",
                        param="dimensions",
                    )
                vector = vector[: body.dimensions]
                vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
            encoded = (
                base64.b64encode(vector.tobytes()).decode()
                if body.encoding_format == "base64"
                else vector.tolist()
            )
            data.append({"object": "embedding", "index": i, "embedding": encoded})
        usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
        return {"object": "list", "data": data, "model": body.model, "usage": usage}

    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(AuditTrail, audit_log=server.audit)  # added last: outermost, so 413s are audited too
    return app


async def _expire_idle_models(server: Server, every_s: float = 5.0) -> None:
    while True:
        await asyncio.sleep(every_s)
        for name in server.registry.expire_idle():
            server.metrics.forget_model(name)
