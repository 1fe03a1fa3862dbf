"""The OpenAI-compatible HTTP service: routes, and the path of one request through them.

A request is authenticated (API key), checked against its key's models and limits, admitted if
the model's queue has room, tokenized, turned into SamplingParams and handed to the model's
`AsyncLLM`, whose one engine thread batches it with everyone else's. Outputs come back per step
and leave as one JSON body or as server-sent events. A client that disconnects aborts its request
at once, which frees its KV blocks. Every error leaves as an OpenAI error object.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from llmasos.errors import LLMasOSError
from llmasos.serve import admin, console, responses_api, stats
from llmasos.serve.errors import APIError, as_api_error, user_error, validation_error
from llmasos.serve.gateway import Gateway, Job, ServerConfig
from llmasos.serve.keys import ApiKey
from llmasos.serve.lora import adapter_parent, adapters_of, split_model
from llmasos.serve.middleware import AuditTrail, BodyLimit
from llmasos.serve.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, _SamplingBody
from llmasos.serve.responses import ResponseBuilder, embedding_data
from llmasos.serve.sse import ClosingStream


def create_app(config: ServerConfig, is_shutting_down=lambda: False) -> FastAPI:
    server = Gateway(config, is_shutting_down)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if config.preload:
            for name in config.registry.models:
                model = await server.registry.acquire(name)
                server.registry.release(model)
        keep_alive = config.registry.keep_alive_s
        chores = asyncio.ensure_future(
            _housekeeping(server, 5.0 if keep_alive < 0 else min(5.0, max(keep_alive / 4, 0.05)))
        )
        try:
            yield
        finally:
            chores.cancel()
            await server.close_limiter()
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
    async def mistake(request: Request, exc: LLMasOSError):
        return await api_error(request, user_error(exc))

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
        return await api_error(request, as_api_error(exc))

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
                server.metrics.update_engine(name, model.served.stats)
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)

    def model_card(name: str, parent: str | None = None) -> dict:
        """An OpenAI model object; `parent`: the base model of a LoRA adapter (vLLM's field)."""
        card = {"id": name, "object": "model", "created": server.started, "owned_by": "llmasos"}
        return card | {"parent": parent or adapter_parent(name)}

    @app.get("/v1/models")
    async def list_models(key: ApiKey | None = auth):
        names = server.registry.servable()
        adapters = adapters_of(names) if server.config.registry.engine.enable_lora else {}
        cards = [model_card(n, adapters.get(n)) for n in dict.fromkeys([*names, *adapters])]
        return {"object": "list", "data": [c for c in cards if key is None or key.allows_model(c["id"])]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, key: ApiKey | None = auth):
        name = split_model(model_id, server.config.registry.engine.enable_lora)
        server.registry.check_servable(name.base)
        server.check_model_allowed(key, model_id)
        return model_card(model_id, name.base if name.lora else None)

    @app.get("/v1/ps", dependencies=[auth])
    async def ps():
        return server.loaded_models()

    app.include_router(admin.router(server))
    app.include_router(stats.router(server))
    app.include_router(console.router(server))
    app.include_router(responses_api.router(server))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request, key: ApiKey | None = auth):
        job = await server.start(request, key, body, [body.conversation()])
        return await respond(request, job, body, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, key: ApiKey | None = auth):
        job = await server.start(request, key, body, body.prompts())
        return await respond(request, job, body, chat=False)

    async def respond(request: Request, job: Job, body: _SamplingBody, chat: bool):
        tokenizer = job.model.served.tokenizer
        echo = not chat and body.echo
        builder = ResponseBuilder(
            chat=chat,
            tokenizer=tokenizer,
            response_id=f"{'chatcmpl' if chat else 'cmpl'}-{job.request_id}",
            created=job.created,
            model=body.model,
            n=job.n,
            num_logprobs=(body.top_logprobs or 0) if chat else (body.logprobs or 0),
            tool_plan=job.tool_plan,
            echo_prompts=[p if isinstance(p, str) else tokenizer.decode(p) for p in job.prompts]
            if echo
            else None,
        )
        if not body.stream:
            finals = await server.collect(request, job)
            if finals is None:
                return Response(status_code=499)
            return builder.response(finals, job.usage())

        async def events() -> AsyncIterator[str]:
            try:
                async for index, out in server.outputs(job):
                    chunk = builder.chunk(index, out, body.include_usage)
                    if chunk is not None:
                        yield f"data: {json.dumps(chunk)}\n\n"
                if body.include_usage:
                    yield f"data: {json.dumps(builder.usage_chunk(job.usage()))}\n\n"
            except Exception as exc:
                error = as_api_error(exc)
                request.state.status = error.status
                yield error.sse()
            finally:
                server.finish(request, job)
            yield "data: [DONE]\n\n"

        return ClosingStream(events(), on_close=lambda: server.finish(request, job))

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request, key: ApiKey | None = auth):
        vectors, prompt_tokens = await server.embed(request, key, body)
        data = embedding_data(vectors, body.dimensions, body.encoding_format)
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
        return {"object": "list", "data": data, "model": body.model, "usage": usage}

    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(AuditTrail, audit_log=server.audit)  # added last: outermost, so 413s are audited too
    return app


async def _housekeeping(server: Gateway, every_s: float) -> None:
    """Unload models idle past their keep-alive, and persist the keys' token usage (so a crash
    loses at most a few seconds of it)."""
    while True:
        await asyncio.sleep(every_s)
        for name in server.registry.expire_idle():
            server.metrics.forget_model(name)
        await asyncio.to_thread(server.keys.flush)
