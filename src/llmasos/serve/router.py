"""`llmasos serve --replicas N`: the router on the public port, in front of N replicas (processes here,
or with `--replica-executor ray` servers that Ray actors run on the cluster's machines).

Every API call is proxied, bytes as they come (server-sent events chunk by chunk), to the replica the
routing policy picks (serve/routing.py: prefix affinity under a load bound, or round-robin). The
router holds no model and no keys: it passes Authorization through and the replicas, reading the same
keys file, check it. What spans the replicas is merged here: /metrics (each replica's series with a
`replica` label, plus the router's own), /api/ps and /v1/ps (rows with a `replica` field, and the
replicas' states), /api/stats (sums; latency percentiles are the slowest replica's), and
/api/load and /api/stop go to every replica.

Failures: a replica that cannot be reached, or breaks off, before the first byte of its answer has
been received leaves the routing at once and the request is retried on another (nothing reached the
client yet, so a retry is invisible); one that breaks off mid-stream ends the stream with an error
event naming it. While no replica is ready, calls get a 503 that says why, replica by replica. The
supervisor (serve/replicas.py) restarts replicas that exit. Rate limits are the replicas' to enforce,
over windows they share in one file (serve/shared_limits.py), so a key's limit holds for the server;
replicas that may be on other machines (Ray) reach that file through the router's internal routes
(serve/remote_limits.py), which only callers with the server's secret may use.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from llmasos.errors import LLMasOSError
from llmasos.serve.errors import APIError
from llmasos.serve.metrics import PREFIX
from llmasos.serve.remote_limits import SECRET_ENV, add_limits_routes
from llmasos.serve.replicas import Launcher, ProcessLauncher, Supervisor
from llmasos.serve.routing import POLICIES, NoReplica, RouteKey
from llmasos.serve.shared_limits import SharedRateLimiter
from llmasos.serve.sse import ClosingStream

log = logging.getLogger("llmasos.serve.router")

# hop-by-hop headers, and those the router's own server writes
DROPPED_HEADERS = {
    "host",
    "content-length",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "date",
    "server",
}
STATS_EVERY_S = 1.0


def create_router_app(
    supervisor: Supervisor, routing: str = "prefix", limits: tuple[SharedRateLimiter, str] | None = None
) -> FastAPI:
    """The router's app; `limits` (the shared windows and the secret asked of callers) adds the routes
    through which replicas on other machines admit requests."""
    policy = POLICIES[routing](supervisor.replicas)
    replicas = supervisor.replicas
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(None, connect=5.0), limits=httpx.Limits(max_connections=None)
    )
    retries = [0]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        supervisor.start()
        watch = asyncio.ensure_future(supervisor.watch())
        try:
            yield
        finally:
            watch.cancel()
            await client.aclose()
            supervisor.stop()

    app = FastAPI(title="LLMasOS router", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.supervisor = supervisor

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    def unavailable(tried: set[int] = frozenset()) -> APIError:
        failed = f"replica(s) {', '.join(map(str, sorted(tried)))} failed and " if tried else ""
        return APIError(
            503, f"{failed}no replica is ready: {supervisor.not_ready()}", code="no_replica", retry_after=1
        )

    if limits is not None:
        add_limits_routes(app, *limits)  # before the catch-all proxy

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        healthy = [r.index for r in replicas if r.healthy]
        if not healthy:
            raise unavailable()
        return {"status": "ready", "replicas": healthy}

    async def fan_out(request: Request, path: str, method: str = "GET", body: bytes = b"") -> list[tuple]:
        """(replica, response) from every healthy replica; the first refusal (401, 403, ...) is raised
        as it is, for the replicas share their keys and would all refuse."""
        chosen = [r for r in replicas if r.healthy]
        if not chosen:
            raise unavailable()
        headers = _passable(request.headers)
        results = await asyncio.gather(
            *(client.request(method, r.url + path, headers=headers, content=body) for r in chosen),
            return_exceptions=True,
        )
        answers = []
        for replica, result in zip(chosen, results):
            if isinstance(result, httpx.HTTPError):
                supervisor.mark_failed(replica.index, f"not answering ({type(result).__name__})")
                continue
            if isinstance(result, BaseException):
                raise result
            if result.status_code >= 400:
                raise _Upstream(result)
            answers.append((replica, result))
        if not answers:
            raise unavailable()
        return answers

    @app.exception_handler(_Upstream)
    async def upstream_refusal(request: Request, exc: _Upstream):
        return Response(exc.response.content, exc.response.status_code, _passable(exc.response.headers))

    @app.get("/metrics")
    async def metrics(request: Request):
        answers = await fan_out(request, "/metrics")
        own = _router_families(supervisor, retries[0])
        body = generate_latest(_Families(merge_metrics([(r.index, a.text) for r, a in answers]) + own))
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/ps")
    @app.get("/v1/ps")
    async def ps(request: Request):
        answers = await fan_out(request, "/api/ps")
        rows = [{**row, "replica": r.index} for r, a in answers for row in a.json()["models"]]
        memory = sum(a.json()["memory_bytes"] for _, a in answers)
        return {"models": rows, "memory_bytes": memory, "replicas": [r.row() for r in replicas]}

    async def stats_now(request: Request) -> dict:
        answers = await fan_out(request, "/api/stats")
        return {
            **merge_stats([(r.index, a.json()) for r, a in answers]),
            "replicas": [r.row() for r in replicas],
        }

    @app.get("/api/stats")
    async def stats(request: Request):
        return await stats_now(request)

    @app.get("/api/stats/stream")
    async def stats_stream(request: Request):
        first = await stats_now(request)  # a refusal is an error response, not an event

        async def events() -> AsyncIterator[str]:
            snapshot = first
            while True:  # a client that leaves cancels this generator
                yield f"data: {json.dumps(snapshot)}\n\n"
                await asyncio.sleep(STATS_EVERY_S)
                try:
                    snapshot = await stats_now(request)
                except APIError as error:
                    yield error.sse()
                    return

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @app.post("/api/load")
    @app.post("/api/stop")
    async def every_replica(request: Request):
        answers = await fan_out(request, request.url.path, "POST", await request.body())
        return {**answers[0][1].json(), "replicas": [r.index for r, _ in answers]}

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def proxy(request: Request, path: str):
        body = await request.body()
        key = route_key(request.headers, body)
        tried: set[int] = set()
        while True:
            try:
                index = policy.choose(key, frozenset(tried))
            except NoReplica:
                raise unavailable(tried) from None
            replica = replicas[index]
            replica.in_flight += 1
            replica.routed += 1
            upstream = None
            try:
                target = httpx.URL(replica.url + request.url.path, query=request.url.query.encode())
                upstream = await client.send(
                    client.build_request(
                        request.method, target, headers=_passable(request.headers), content=body
                    ),
                    stream=True,
                )
                chunks = upstream.aiter_raw()
                first = await anext(chunks, b"")
            except httpx.TransportError as exc:  # nothing reached the client: try another replica
                replica.in_flight -= 1
                if upstream is not None:
                    await upstream.aclose()
                supervisor.mark_failed(index, f"broke off a request ({type(exc).__name__})")
                log.warning("replica %d failed before answering (%r); retrying elsewhere", index, exc)
                tried.add(index)
                retries[0] += 1
                continue
            except BaseException:
                replica.in_flight -= 1
                if upstream is not None:
                    await upstream.aclose()
                raise
            return _relay(upstream, first, chunks, replica.index, supervisor)

    return app


class _Upstream(Exception):
    """A replica's refusal, returned to the client as the replica wrote it."""

    def __init__(self, response: httpx.Response):
        self.response = response


def _relay(
    upstream: httpx.Response, first: bytes, chunks: AsyncIterator[bytes], index: int, supervisor
) -> Response:
    """The replica's answer, from its first chunk on; the replica's in-flight count drops however the
    response ends (even if its body never starts: the client left first)."""
    replica = supervisor.replicas[index]
    done = [False]
    is_events = upstream.headers.get("content-type", "").startswith("text/event-stream")

    def close() -> None:
        if not done[0]:
            done[0] = True
            replica.in_flight -= 1
            if not upstream.is_closed:
                asyncio.ensure_future(upstream.aclose())  # the replica sees the client leave, and aborts

    async def body() -> AsyncIterator[bytes]:
        try:
            if first:
                yield first
            async for chunk in chunks:
                yield chunk
        except httpx.TransportError as exc:
            supervisor.mark_failed(index, f"broke off an answer ({type(exc).__name__})")
            if is_events:
                message = f"replica {index} stopped in the middle of this answer; retry the request"
                yield APIError(503, message, code="replica_failed").sse().encode()
                yield b"data: [DONE]\n\n"
        finally:
            await upstream.aclose()
            close()

    return ClosingStream(
        body(), status_code=upstream.status_code, headers=_passable(upstream.headers), on_close=close
    )


def _passable(headers) -> dict:
    """Headers passed on, either way, without the hop-by-hop ones."""
    return {k: v for k, v in headers.items() if k.lower() not in DROPPED_HEADERS}


def route_key(headers, body: bytes) -> RouteKey:
    """The request as the routing policy sees it: the model and prompt text, the caller's key (hashed:
    the router keeps no secrets) and the agent (metadata.agent, else X-Agent, else user, as the
    gateway names it)."""
    scheme, _, secret = headers.get("authorization", "").partition(" ")
    salt = hashlib.sha256(secret.strip().encode()).hexdigest() if secret.strip() else ""
    try:
        data = json.loads(body) if body else {}
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    metadata = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    agent = metadata.get("agent") or headers.get("x-agent") or data.get("user")
    text = f"{data.get('model', '')}\n{prompt_text(data)}"
    return RouteKey(text, salt, agent if isinstance(agent, str) else None)


def prompt_text(data: dict) -> str:
    """The leading text of a chat (messages, role by role), a completion or an embedding input."""
    messages = data.get("messages")
    if isinstance(messages, list):
        return "".join(
            f"{m.get('role', '')}\n{_content_text(m.get('content'))}\n"
            for m in messages
            if isinstance(m, dict)
        )
    prompt = data.get("prompt", data.get("input", ""))
    if isinstance(prompt, list) and prompt:
        prompt = prompt[0] if not isinstance(prompt[0], int) else prompt
    if isinstance(prompt, list):  # token ids
        return " ".join(str(t) for t in prompt)
    return prompt if isinstance(prompt, str) else ""


def _content_text(content) -> str:
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


# -- merging what the replicas report -----------------------------------------------------------------
class _Families:
    """Metric families to render (generate_latest reads anything with collect())."""

    def __init__(self, families: list):
        self.families = families

    def collect(self):
        return self.families


def merge_metrics(texts: list[tuple[int, str]]) -> list:
    """The replicas' Prometheus texts as one, each sample labelled with its replica: what Prometheus
    users expect of instances behind one endpoint (sum() by (...) drops the label when wanted)."""
    merged: dict = {}
    for index, text in texts:
        for family in text_string_to_metric_families(text):
            into = merged.setdefault(family.name, family)
            samples = [s._replace(labels={"replica": str(index), **s.labels}) for s in family.samples]
            if into is family:
                family.samples = samples
            else:
                into.samples.extend(samples)
    return list(merged.values())


def _router_families(supervisor: Supervisor, retries: int) -> list:
    up = GaugeMetricFamily(PREFIX + "replica_up", "1 when the replica answers /ready.", labels=["replica"])
    in_flight = GaugeMetricFamily(
        PREFIX + "replica_requests_in_flight", "Requests the router has sent the replica.", labels=["replica"]
    )
    restarts = CounterMetricFamily(
        PREFIX + "replica_restarts", "Times the replica was restarted.", labels=["replica"]
    )
    for r in supervisor.replicas:
        up.add_metric([str(r.index)], int(r.healthy))
        in_flight.add_metric([str(r.index)], r.in_flight)
        restarts.add_metric([str(r.index)], r.restarts)
    retried = CounterMetricFamily(PREFIX + "router_retries", "Requests retried on another replica.")
    retried.add_metric([], retries)
    return [up, in_flight, restarts, retried]


def merge_stats(snapshots: list[tuple[int, dict]]) -> dict:
    """One /api/stats snapshot from the replicas' (serve/stats.py): counts and token rates summed,
    models and keys side by side; latency percentiles are the slowest replica's (percentiles of
    different samples cannot be added), with the sample counts summed."""
    first = snapshots[0][1]
    all_ = [s for _, s in snapshots]
    tokens = first["tokens"]
    series = {
        name: [sum(p) for p in zip(*(s["tokens"][name] for s in all_))]
        for name in ("prefill", "cached", "decode")
    }
    computed, cached = sum(series["prefill"]), sum(series["cached"])
    return {
        "time": max(s["time"] for s in all_),
        "uptime_s": max(s["uptime_s"] for s in all_),
        "models": [{**row, "replica": i} for i, s in snapshots for row in s["models"]],
        "requests": {k: sum(s["requests"][k] for s in all_) for k in first["requests"]},
        "tokens": {
            **tokens,
            **series,
            "per_s": {k: sum(s["tokens"]["per_s"][k] for s in all_) for k in tokens["per_s"]},
            "totals": {k: sum(s["tokens"]["totals"][k] for s in all_) for k in tokens["totals"]},
        },
        "latency": {
            **first["latency"],
            **{name: _slowest([s["latency"][name] for s in all_]) for name in ("ttft_s", "itl_s")},
        },
        "prefix_cache_hit_rate": cached / (computed + cached) if computed + cached else None,
        "keys": _merge_keys([s["keys"] for s in all_]),
        "guards": {
            "enabled": first["guards"]["enabled"],
            **{part: _sum_nested([s["guards"][part] for s in all_]) for part in ("verdicts", "categories")},
        },
    }


def _slowest(percentiles: list[dict | None]) -> dict | None:
    known = [p for p in percentiles if p and p.get("count")]
    if not known:
        return percentiles[0]
    return {
        **{q: max(p[q] for p in known if p[q] is not None) for q in ("p50", "p90", "p99")},
        "count": sum(p["count"] for p in known),
    }


def _merge_keys(rows_per_replica: list[list[dict]]) -> list[dict]:
    """Per key: the requests, tokens and refusals of every replica; the budget figures from the shared
    keys file, as the replica that read it last saw them."""
    merged: dict = {}
    for rows in rows_per_replica:
        for row in rows:
            into = merged.get(row["key"])
            if into is None:
                merged[row["key"]] = dict(row)
                continue
            for field_name in ("requests", "tokens", "rate_limited"):
                into[field_name] += row[field_name]
            into["tokens_used"] = max(into["tokens_used"], row["tokens_used"])
            if into["budget_left"] is not None:
                into["budget_left"] = min(into["budget_left"], row["budget_left"])
    return list(merged.values())


def _sum_nested(parts: list[dict]) -> dict:
    out: dict = {}
    for part in parts:
        for outer, inner in part.items():
            bucket = out.setdefault(outer, {})
            for k, v in inner.items():
                bucket[k] = bucket.get(k, 0) + v
    return out


def run_router(
    count: int,
    serve_args: list[str],
    routing: str = "prefix",
    host: str = "127.0.0.1",
    port: int = 8000,
    idle_timeout_s: float = 5.0,
    shutdown_timeout_s: float = 30.0,
    launcher: Launcher | None = None,
) -> None:
    """The router under uvicorn on host:port, `count` replicas of `llmasos serve SERVE_ARGS` behind it,
    started by `launcher` (processes here by default; serve/ray_replicas.py: Ray actors), sharing one
    file of rate-limit windows (serve/shared_limits.py): opened by each replica, or, for a launcher that
    may place replicas on other machines, kept here and reached over the network with a secret made now
    (serve/remote_limits.py). SIGTERM or SIGINT stops the router, which then stops its replicas
    (serve/replicas.py)."""
    import uvicorn

    if routing not in POLICIES:
        raise LLMasOSError(f"unknown routing {routing!r}: use one of {', '.join(POLICIES)} (--routing)")
    launcher = launcher or ProcessLauncher()
    limits = shared_limits_file(port)
    url = launcher.limits_url(host, port)
    served, env = None, {}
    if url is None:
        serve_args = [*serve_args, "--shared-limits", str(limits)]
    else:
        secret = secrets.token_urlsafe(32)
        served, env = (SharedRateLimiter(limits), secret), {SECRET_ENV: secret}
        serve_args = [*serve_args, "--shared-limits-url", url]
    supervisor = Supervisor(count, serve_args, shutdown_timeout_s, launcher, env)
    app = create_router_app(supervisor, routing, served)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        timeout_keep_alive=int(idle_timeout_s),
        timeout_graceful_shutdown=int(shutdown_timeout_s),
        log_level="info",
    )
    uvicorn.Server(config).run()


def shared_limits_file(port: int) -> Path:
    """$LLMASOS_HOME/run/serve-PORT/limits.sqlite, emptied: a new server starts with fresh windows (a
    replica that restarts keeps them, for the file outlives it)."""
    home = Path(os.environ.get("LLMASOS_HOME") or Path.home() / ".llmasos").expanduser()
    path = home / "run" / f"serve-{port}" / "limits.sqlite"
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        stale.unlink(missing_ok=True)
    return path
