"""The door every API call passes: who is calling, may they, is there room, and what runs.

`Gateway.start` does everything that can refuse a call (key, model permission, input guards,
rate limits, queue room, prompt length, sampling values) before any output exists, so refusals
are plain error responses. `outputs` then merges the engine's per-step outputs of the call's
requests under the request timeout, feeding the metrics and passing each through the output
guards; cancelling it aborts the requests in the engine. The engine's outputs are DELTA ones (each
holds only what is new), so a stream of n tokens costs O(n); `collect` adds them up.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastapi import Request

from llmasos.errors import ContextLengthError, LLMasOSError
from llmasos.kernel.speculative import SpeculativeStats
from llmasos.outputs import RequestOutput, RequestOutputKind, accumulate
from llmasos.safety import PolicySet
from llmasos.safety.requests import ContentFilterError, Guards, RequestGuard, is_conversation
from llmasos.serve.audit import AuditLog
from llmasos.serve.errors import APIError, user_error
from llmasos.serve.keys import ApiKey, KeyStore
from llmasos.serve.limits import RateLimiter
from llmasos.serve.lora import split_model
from llmasos.serve.metrics import OutputProgress, ServerMetrics
from llmasos.serve.monitor import Monitor
from llmasos.serve.protocol import ChatCompletionRequest, EmbeddingRequest, _SamplingBody
from llmasos.serve.registry import LoadedModel, ModelRegistry, RegistryConfig
from llmasos.serve.remote_limits import RemoteRateLimiter
from llmasos.serve.responses_format import ResponsesRequest
from llmasos.serve.shared_limits import SharedRateLimiter
from llmasos.tools import ToolPlan, ToolRequest, format_named, render_chat, tool_format


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
    guard_policy: PolicySet | Path | None = None  # a PolicySet or its file; None: no guards
    tool_call_parser: str | None = None  # a llmasos.tools format name; None: each model's from its template
    shared_limits: Path | None = None  # the rate-limit windows all replicas share; None: this process's own
    shared_limits_url: str | None = None  # the router that keeps them, for replicas on other machines
    limits_secret: str | None = None  # what shared_limits_url asks of its callers


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
    guard: RequestGuard | None = None
    tool_plan: ToolPlan | None = None  # how a chat reply's tool calls are read; None: no tools

    def usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


def _limiter(config: ServerConfig) -> RateLimiter | SharedRateLimiter | RemoteRateLimiter:
    """This process's own windows, the file the replicas of this machine share, or the router's over
    the network (replicas on other machines: serve/remote_limits.py)."""
    if config.shared_limits_url is not None:
        if not config.limits_secret:
            raise LLMasOSError(
                "--shared-limits-url needs the router's secret in LLMASOS_LIMITS_SECRET; "
                "replicas get both from `llmasos serve --replicas`, which is how to run them"
            )
        return RemoteRateLimiter(config.shared_limits_url, config.limits_secret)
    return SharedRateLimiter(config.shared_limits) if config.shared_limits is not None else RateLimiter()


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Gateway:
    def __init__(self, config: ServerConfig, is_shutting_down=lambda: False):
        self.config = config
        self.registry = ModelRegistry(config.registry)
        self.keys = KeyStore(config.keys_file)
        self.limiter = _limiter(config)
        self.audit = AuditLog(config.audit_file, include_prompts=config.audit_prompts)
        self.metrics = ServerMetrics()
        self.monitor = Monitor()  # the live numbers of GET /api/stats
        self.guards = Guards.load(config.guard_policy)
        if config.tool_call_parser is not None:
            format_named(config.tool_call_parser)  # an unknown name fails at start-up, not per request
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

    def authenticate_admin(self, request: Request) -> ApiKey | None:
        """`authenticate`, for the operations that change what the server holds (pull, import, remove,
        load, unload, keys): a key without the admin flag gets a 403."""
        key = self.authenticate(request)
        if key is not None and not key.admin:
            raise APIError(
                403,
                f"the key {key.name!r} is not an admin key; this operation needs one "
                "(`llmasos keys add NAME --admin`)",
                code="admin_required",
            )
        return key

    def loaded_models(self) -> dict:
        """What `llmasos ps` shows: each loaded model's memory, requests and keep-alive countdown, and
        for an engine that drafts, its speculative decoding's totals and rates."""
        now = time.monotonic()
        keep_alive = self.config.registry.keep_alive_s
        rows = []
        for name, m in self.registry.loaded.items():
            stats = None if m.is_embedder else m.served.stats
            rows.append(
                {
                    "model": name,
                    "kind": "embedding" if m.is_embedder else "generation",
                    "memory_bytes": m.memory_bytes,
                    "in_flight": m.in_flight,
                    "running": stats.num_running if stats else 0,
                    "waiting": stats.num_waiting if stats else 0,
                    "kv_cache_usage": stats.kv_cache_usage if stats else None,
                    # the disk cache (kv_disk_cache_gb): None without one
                    "kv_disk_cache_bytes": stats.kv_disk_cache_bytes if stats else None,
                    "prefix_disk_hit_tokens": stats.prefix_disk_hit_tokens if stats else 0,
                    "agents": {a: asdict(row) for a, row in stats.agents.items()} if stats else {},
                    "speculative": _speculation(stats.speculative) if stats else None,
                    "loaded_at": m.loaded_at,
                    "expires_in_s": None
                    if keep_alive < 0 or m.in_flight
                    else max(keep_alive - (now - m.last_used), 0),
                }
            )
        return {"models": rows, "memory_bytes": self.registry.memory_in_use()}

    def check_model_allowed(self, key: ApiKey | None, model: str) -> None:
        if key is not None and not key.allows_model(model):
            raise APIError(
                403,
                f"the key {key.name!r} may not use the model {model!r}",
                param="model",
                code="model_not_allowed",
            )

    def check_tools_allowed(self, key: ApiKey | None, tools: ToolRequest | None) -> None:
        """Refuse a request that offers the model a function its key may not use."""
        for tool in tools.tools if tools is not None and key is not None else ():
            if not key.allows_tool(tool.name):
                raise APIError(
                    403,
                    f"the key {key.name!r} may not use the tool {tool.name!r}",
                    param="tools",
                    code="tool_not_allowed",
                )

    async def _admit(self, key: ApiKey | None, model: LoadedModel, estimated_tokens: int) -> None:
        engine_config = self.config.registry.engine
        if model.in_flight > engine_config.max_num_seqs + self.config.max_queue:
            self.monitor.refused(key, 503)
            raise APIError(
                503,
                f"the model {model.name!r} has a full queue; retry later",
                code="queue_full",
                retry_after=1,
            )
        if key is not None:
            try:
                decision = self.limiter.admit(key, estimated_tokens)
                if isinstance(self.limiter, RemoteRateLimiter):  # the others decide at once, on this thread
                    decision = await decision
            except APIError as error:  # the router that keeps the limits is out of reach: a 503
                self.monitor.refused(key, error.status)
                raise
            if not decision.allowed:
                self.monitor.refused(key, 429)
                raise APIError(
                    429, decision.message, code="rate_limit_exceeded", retry_after=decision.retry_after
                )
        self.monitor.admitted(key)

    def _charge(
        self, request: Request, key: ApiKey | None, prompt_tokens: int, completion_tokens: int
    ) -> None:
        """Count a finished call against its key's limits and budget, and note it for the audit log."""
        request.state.prompt_tokens = prompt_tokens
        request.state.completion_tokens = completion_tokens
        self.monitor.charged(key, prompt_tokens + completion_tokens)
        if key is not None:
            self.limiter.record(key, prompt_tokens + completion_tokens)
            self.keys.record_usage(key.name, prompt_tokens + completion_tokens)

    async def close_limiter(self) -> None:
        """Let the router's limiter send the token counts still on their way (the others keep nothing)."""
        if isinstance(self.limiter, RemoteRateLimiter):
            await self.limiter.aclose()

    # -- generation ----------------------------------------------------------------------------
    async def start(
        self,
        request: Request,
        key: ApiKey | None,
        body: _SamplingBody,
        inputs: list[str | list[int]] | list[list[dict]],
    ) -> Job:
        """Everything that can refuse the request, before any output is produced.

        inputs are the prompts (text or token ids), or the conversation of a chat call, which the
        input guards check message by message and the model's chat template then renders.
        """
        request.state.model = body.model
        self.check_model_allowed(key, body.model)
        takes_tools = isinstance(body, ChatCompletionRequest | ResponsesRequest)
        tools = body.tool_request() if takes_tools else None
        self.check_tools_allowed(key, tools)
        name = split_model(body.model, self.config.registry.engine.enable_lora)
        model = await self.registry.acquire(name.base)
        try:
            if model.is_embedder:
                raise APIError(
                    400, f"{body.model!r} is an embedding model: use POST /v1/embeddings", param="model"
                )
            llm = model.served
            request_id = uuid.uuid4().hex
            request.state.request_id = request_id
            guard = None
            if self.guards is not None:
                key_name = key.name if key is not None else None
                guard = self.guards.request(
                    body.model, key_name, request_id, llm.tokenizer, self._audit_guard
                )
                inputs = await self._check_inputs(guard, inputs, body)
            fmt = tool_format(llm.tokenizer, self.config.tool_call_parser)
            rendered = [
                render_chat(llm.tokenizer, i, tools, fmt) if is_conversation(i) else (i, None) for i in inputs
            ]
            prompts, plan = [prompt for prompt, _ in rendered], rendered[0][1]
            ids = [llm.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
            engine = llm.engine
            context = min(engine.max_model_len, engine.kv_capacity_tokens)
            params = body.sampling_params(default_max_tokens=max(context - max(len(i) for i in ids), 1))
            if plan is not None:
                params = plan.sampling_params(
                    params
                )  # the calls' grammar when the choice is forced or strict
            if guard is not None:
                guard.check_params(params)
            params.output_kind = RequestOutputKind.DELTA  # the server's own params: only what is new
            params.lora = name.lora  # (an unknown adapter: a 404 from the engine's check, below)
            salt = key.name if key is not None else None
            agent = body.agent(request.headers.get("x-agent"))  # one key's agents apart from another's
            agent = f"{salt}/{agent}" if agent and salt else agent
            try:  # validated (the kernel's one check) before admission, so a refused request is never charged
                streams = [
                    llm.generate(
                        p, params, request_id=f"{request_id}-{i}", cache_salt=salt, strict=True, agent=agent
                    )
                    for i, p in enumerate(ids)
                ]
            except ContextLengthError as error:
                raise user_error(error, self._prompt_param(body)) from None
            estimate = sum(len(i) for i in ids) + params.max_tokens * params.n * len(ids)
            await self._admit(key, model, estimate)  # streams queue their requests only once iterated
            if self.config.audit_prompts:
                request.state.prompt = prompts[0] if len(prompts) == 1 else prompts
        except BaseException:
            self.registry.release(model)
            raise
        return Job(model, streams, params.n, request_id, key, prompts, guard=guard, tool_plan=plan)

    def _audit_guard(self, record: dict) -> None:
        self.monitor.guard_verdict(record)
        self.audit.log_guard(record)

    async def _check_inputs(self, guard: RequestGuard, inputs: list, body: _SamplingBody) -> list:
        """The input guards, in a thread: pure Python over a prompt of up to max_body_bytes would
        hold up every stream on the event loop. A blocked prompt is a 400 naming the categories."""
        try:
            return await asyncio.to_thread(guard.check_prompts, inputs)
        except ContentFilterError as e:
            raise APIError(400, str(e), param=self._prompt_param(body), code="content_filter") from None

    @staticmethod
    def _prompt_param(body: _SamplingBody) -> str:
        if isinstance(body, ResponsesRequest):
            return "input"
        return "messages" if isinstance(body, ChatCompletionRequest) else "prompt"

    async def outputs(self, job: Job) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, DELTA output) as the engine produces them, within the request timeout."""
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
        progress: dict[int, OutputProgress] = {}
        filtered: set[int] = set()  # prompts whose every choice the guards ended: stopped early
        deadline = time.monotonic() + self.config.request_timeout_s
        try:
            remaining = len(tasks)
            while remaining:
                left = deadline - time.monotonic()
                try:
                    if left <= 0:
                        raise asyncio.TimeoutError
                    if queue.empty():
                        index, item = await asyncio.wait_for(queue.get(), left)
                    else:  # most steps leave an output waiting: no timer needed
                        index, item = queue.get_nowait()
                except asyncio.TimeoutError:
                    raise APIError(
                        503,
                        f"the request ran longer than {self.config.request_timeout_s:g} s and was stopped "
                        "(llmasos serve --request-timeout)",
                        code="timeout",
                    ) from None
                if index in filtered:
                    continue
                if item is done:
                    remaining -= 1
                    continue
                if isinstance(item, Exception):
                    raise item
                before = progress.get(index)
                progress[index] = self.metrics.observe_delta(job.model.name, item, before)
                self.monitor.observe_delta(item, before, progress[index])
                if job.guard is not None:
                    shown = job.guard.rewrite(index, item, delta=True)
                    if shown.finished and not item.finished:  # nothing more of it may be shown
                        tasks[index].cancel()  # aborts it in the engine
                        filtered.add(index)
                        remaining -= 1
                    item = shown
                if item.finished:
                    job.prompt_tokens += item.usage["prompt_tokens"]
                    job.completion_tokens += item.usage["completion_tokens"]
                    job.cached_tokens += item.num_cached_tokens
                yield index, item
        finally:
            for task in tasks:
                task.cancel()  # aborts what is still running: frees its KV blocks

    async def collect(self, request: Request, job: Job) -> dict[int, RequestOutput] | None:
        """The final (cumulative) outputs; None if the client leaves first (its requests are aborted,
        and the request is logged as 499). The job is finished either way."""

        async def gather() -> dict[int, RequestOutput]:
            deltas: dict[int, list[RequestOutput]] = {}
            finals = {}
            async for index, out in self.outputs(job):
                deltas.setdefault(index, []).append(out)
                if out.finished:
                    finals[index] = accumulate(deltas.pop(index))
            return finals

        work = asyncio.ensure_future(gather())
        watch = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            try:
                done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            except BaseException:  # the server is stopping this handler
                work.cancel()
                raise
            finally:
                watch.cancel()
            if work not in done:
                work.cancel()  # aborts the requests in the engine
                request.state.status = 499  # nobody is left to read it
                return None
            return work.result()
        finally:
            self.finish(request, job)

    async def embed(self, request: Request, key: ApiKey | None, body: EmbeddingRequest) -> tuple[list, int]:
        """The vectors of the inputs and their token count, from a sentence-embedding model or, for a
        generative one, from its engine (pooling requests in the running batch)."""
        request.state.model = body.model
        self.check_model_allowed(key, body.model)
        inputs = body.inputs()
        model = await self.registry.acquire(body.model)
        try:
            await self._admit(key, model, 0)
            if model.is_embedder:

                def run():
                    with model.lock:
                        return model.served.embed_with_usage(inputs)

                result = await asyncio.to_thread(run)
                vectors, tokens = result.vectors, result.prompt_tokens
            else:
                salt = key.name if key is not None else None
                outs = await asyncio.gather(*(model.served.embed(p, cache_salt=salt) for p in inputs))
                vectors, tokens = [o.embedding for o in outs], sum(o.usage["prompt_tokens"] for o in outs)
        finally:
            self.registry.release(model)
        self._charge(request, key, tokens, 0)
        return vectors, tokens

    def finish(self, request: Request, job: Job) -> None:
        """Account for the job and release its model; safe to call more than once."""
        if job.closed:
            return
        job.closed = True
        if job.guard is not None:
            job.guard.close()
        self._charge(request, job.key, job.prompt_tokens, job.completion_tokens)
        self.registry.release(job.model)


def _speculation(stats: SpeculativeStats | None) -> dict | None:
    """A speculating engine's totals since it loaded, and the two figures users watch: the share of
    drafted tokens the model kept, and the tokens a sequence gained per verify forward."""
    if stats is None:
        return None
    rates = {"acceptance_rate": stats.acceptance_rate, "tokens_per_forward": stats.tokens_per_forward}
    return {**asdict(stats), **rates}
