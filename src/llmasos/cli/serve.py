"""The server's verbs: `llmasos serve MODELS` (the resident daemon, OpenAI-compatible), and `ps` and `stop`,
which ask it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmasos.cli.app import (
    ACTIVATION_BITS_HELP,
    DISTRIBUTED_EXECUTOR_HELP,
    DRAFT_MODEL_HELP,
    KV_DISK_CACHE_HELP,
    RAY_ADDRESS_HELP,
    RAY_PLACEMENT_HELP,
    SPECULATIVE_HELP,
    SPECULATIVE_TOKENS_HELP,
    TENSOR_PARALLEL_HELP,
    VERBOSE,
    app,
    human_size,
    say,
)
from llmasos.errors import LLMasOSError


@app.command()
def serve(
    ctx: typer.Context,
    models: Annotated[
        list[str] | None, typer.Argument(help="models to serve (default: the whole store)")
    ] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    lazy: Annotated[bool, typer.Option(help="load models on first use instead of at start-up")] = False,
    keep_alive: Annotated[
        float, typer.Option(help="seconds an idle model stays loaded (-1: forever)")
    ] = 300.0,
    memory_budget_gib: Annotated[float | None, typer.Option(help="unload LRU models past this")] = None,
    kv_cache_gib: Annotated[float | None, typer.Option(help="KV cache per model")] = None,
    kv_disk_cache_gb: Annotated[float | None, typer.Option(help=KV_DISK_CACHE_HELP)] = None,
    max_num_seqs: Annotated[int, typer.Option(help="most sequences in one batch")] = 64,
    max_model_len: Annotated[int | None, typer.Option(help="cap on the context length")] = None,
    max_queue: Annotated[
        int, typer.Option(help="requests waiting per model beyond the batch; past it, 503")
    ] = 256,
    request_timeout: Annotated[float, typer.Option(help="seconds before a request is stopped")] = 600.0,
    idle_timeout: Annotated[float, typer.Option(help="seconds an idle connection stays open")] = 5.0,
    shutdown_timeout: Annotated[
        float, typer.Option(help="seconds SIGTERM waits for running requests")
    ] = 30.0,
    max_body_mb: Annotated[float, typer.Option(help="largest request body")] = 8.0,
    keys_file: Annotated[Path | None, typer.Option(help="API keys (default $LLMASOS_HOME/keys.json)")] = None,
    audit_file: Annotated[
        Path | None, typer.Option(help="audit log (default $LLMASOS_HOME/audit.jsonl)")
    ] = None,
    audit_prompts: Annotated[bool, typer.Option(help="write prompt text into the audit log")] = False,
    guard_policy: Annotated[
        Path | None, typer.Option(help="guards on input and output, per model and key (YAML or JSON)")
    ] = None,
    activation_bits: Annotated[int, typer.Option(help=ACTIVATION_BITS_HELP)] = 16,
    speculative: Annotated[str | None, typer.Option(help=SPECULATIVE_HELP)] = None,
    num_speculative_tokens: Annotated[int | None, typer.Option(help=SPECULATIVE_TOKENS_HELP)] = None,
    draft_model: Annotated[str | None, typer.Option(help=DRAFT_MODEL_HELP)] = None,
    tool_call_parser: Annotated[
        str | None,
        typer.Option(
            help="tool call format: hermes, llama3_json or mistral (default: from the chat template)"
        ),
    ] = None,
    replicas: Annotated[
        int | None,
        typer.Option(min=1, help="run N replica processes behind a cache-aware router on --port"),
    ] = None,
    routing: Annotated[
        str, typer.Option(help="how the router picks a replica: prefix (cache affinity) or round-robin")
    ] = "prefix",
    replica_executor: Annotated[
        str,
        typer.Option(
            help="what runs the replicas: local (processes here) or ray (Ray actors on the cluster's "
            "machines, placed by --ray-address and --ray-placement)"
        ),
    ] = "local",
    tensor_parallel_size: Annotated[int, typer.Option(help=TENSOR_PARALLEL_HELP)] = 1,
    distributed_executor: Annotated[str, typer.Option(help=DISTRIBUTED_EXECUTOR_HELP)] = "mp",
    ray_address: Annotated[str | None, typer.Option(help=RAY_ADDRESS_HELP)] = None,
    ray_placement: Annotated[str, typer.Option(help=RAY_PLACEMENT_HELP)] = "PACK",
    enable_lora: Annotated[
        bool, typer.Option(help="serve the store's LoRA adapters over their base model, many in one batch")
    ] = False,
    max_loras: Annotated[int, typer.Option(help="LoRA adapters loaded at once per model (LRU)")] = 8,
    max_lora_rank: Annotated[int, typer.Option(help="largest LoRA rank served")] = 16,
    shared_limits: Annotated[
        Path | None, typer.Option(hidden=True, help="rate-limit windows shared with other replicas (router)")
    ] = None,
    shared_limits_url: Annotated[
        str | None, typer.Option(hidden=True, help="the router that keeps the replicas' rate-limit windows")
    ] = None,
    limits_secret: Annotated[
        str | None,
        typer.Option(hidden=True, envvar="LLMASOS_LIMITS_SECRET", help="what --shared-limits-url asks"),
    ] = None,
) -> None:
    """Serve models over an OpenAI-compatible HTTP API (keys, limits, metrics, audit log)."""
    if replicas is not None:
        from llmasos.serve.router import run_router

        launcher = _replica_launcher(replica_executor, replicas, ray_address, ray_placement)
        args = _replica_args(ctx.params)
        run_router(replicas, args, routing, host, port, idle_timeout, shutdown_timeout, launcher)
        return
    from llmasos.config import EngineConfig
    from llmasos.serve.gateway import ServerConfig
    from llmasos.serve.registry import RegistryConfig
    from llmasos.serve.server import run_server

    engine = EngineConfig(
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        kv_cache_gib=kv_cache_gib,
        kv_disk_cache_gb=kv_disk_cache_gb,
        activation_bits=activation_bits,
        speculative=speculative,
        num_speculative_tokens=num_speculative_tokens,
        speculative_model=draft_model,
        tensor_parallel_size=tensor_parallel_size,
        distributed_executor=distributed_executor,
        ray_address=ray_address,
        ray_placement=ray_placement,
        enable_lora=enable_lora,
        max_loras=max_loras,
        max_lora_rank=max_lora_rank,
    )
    budget = int(memory_budget_gib * 2**30) if memory_budget_gib is not None else None
    config = ServerConfig(
        registry=RegistryConfig(list(models or []), engine, budget, keep_alive),
        keys_file=keys_file,
        audit_file=audit_file,
        audit_prompts=audit_prompts,
        max_queue=max_queue,
        request_timeout_s=request_timeout,
        max_body_bytes=int(max_body_mb * 2**20),
        preload=not lazy,
        guard_policy=guard_policy,
        tool_call_parser=tool_call_parser,
        shared_limits=shared_limits,
        shared_limits_url=shared_limits_url,
        limits_secret=limits_secret,
    )
    run_server(config, host, port, idle_timeout, shutdown_timeout)


# the router's own, and what it gives each replica itself (the secret: in the environment, never argv)
ROUTER_ONLY = {
    "host",
    "port",
    "replicas",
    "routing",
    "replica_executor",
    "shared_limits",
    "shared_limits_url",
    "limits_secret",
}
REPLICA_EXECUTORS = ("local", "ray")


def _replica_launcher(executor: str, count: int, ray_address: str | None, ray_placement: str):
    """None for local replica processes (the router's default), else the Ray actors' launcher."""
    if executor not in REPLICA_EXECUTORS:
        raise LLMasOSError(
            f"unknown --replica-executor {executor!r}: use one of {', '.join(REPLICA_EXECUTORS)}"
        )
    if executor == "local":
        return None
    try:
        from llmasos.serve.ray_replicas import RayLauncher
    except ImportError:
        raise LLMasOSError("--replica-executor ray needs Ray: pip install 'llmasos[ray]'") from None
    return RayLauncher(count, ray_address, ray_placement)


def _replica_args(params: dict) -> list[str]:
    """This command's own flags, as each replica runs it (less the router's)."""
    args = [str(m) for m in params.get("models") or []]
    for name, value in params.items():
        flag = "--" + name.replace("_", "-")
        if name in ROUTER_ONLY or name == "models" or value is None:
            continue
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, str(value)]
    return args


@app.command()
def ps(verbose: Annotated[bool, VERBOSE] = False) -> None:
    """Models loaded in the running server (LLMASOS_HOST): memory, running and waiting requests, time
    left loaded."""
    from rich.console import Console
    from rich.table import Table

    from llmasos.cli.daemon import Daemon, host_url

    daemon = Daemon.find()
    if daemon is None:  # this process has loaded nothing: nothing runs anywhere we can see
        typer.echo(f"no LLMasOS server answers at {host_url()}, so no model is loaded", err=True)
        return
    say(verbose, f"asking the server at {daemon.url}")
    rows = daemon.get("/api/ps")["models"]
    on_disk = any(row.get("kv_disk_cache_bytes") is not None for row in rows)  # the column only when used
    drafting = any(row.get("speculative") for row in rows)  # likewise: only when an engine drafts
    columns = ["MODEL", "KIND", "MEMORY", "RUNNING", "WAITING", "KV CACHE", *(["KV ON DISK"] * on_disk)]
    columns += ["SPECULATION"] * drafting
    table = Table(*columns, "UNLOADS IN", box=None)
    for row in rows:
        kv = row["kv_cache_usage"]
        expires = row["expires_in_s"]
        table.add_row(
            row["model"],
            row["kind"],
            human_size(row["memory_bytes"]),
            str(row["running"]),
            str(row["waiting"]),
            "" if kv is None else f"{kv:.0%}",
            *([_disk_cache_cell(row)] * on_disk),
            *([_speculation_cell(row.get("speculative"))] * drafting),
            "busy" if row["in_flight"] else ("never" if expires is None else f"{expires:.0f} s"),
        )
    Console().print(table)


def _disk_cache_cell(row: dict) -> str:
    """The disk cache's size and the prompt tokens it served ("" without one, or from an older server)."""
    size = row.get("kv_disk_cache_bytes")
    if size is None:
        return ""
    return f"{human_size(size)}, {row.get('prefix_disk_hit_tokens', 0):,} tok hit"


def _speculation_cell(spec: dict | None) -> str:
    """Speculative decoding's share of drafts kept and tokens per verify forward ("" when not drafting)."""
    if not spec:
        return ""
    if not spec["num_drafts"]:
        return "no drafts yet"
    return f"{spec['acceptance_rate']:.0%} accepted, {spec['tokens_per_forward']:.2f} tok/forward"


@app.command()
def stop(model: Annotated[str, typer.Argument(help="a model loaded in the running server")]) -> None:
    """Unload MODEL from the running server now, rather than when its keep-alive runs out."""
    from llmasos.cli.daemon import Daemon

    unloaded = Daemon.required().post("/api/stop", {"model": model})["unloaded"]
    typer.echo(f"unloaded {model}" if unloaded else f"{model} was not loaded")
