"""The shell: `llmasos VERB`. Each verb is a plain typed function whose signature is its flags.

Imports stay inside the verbs so that `llmasos list` does not pay for torch, and `llmasos run`
pays for it once. Every LLMasOS error becomes one clean line on stderr and exit code 1.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from llmasos.errors import LLMasOSError

app = typer.Typer(
    name="llmasos",
    help="LLMasOS: run, serve and manage open LLMs on your own hardware.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _store():
    from llmasos.store import ModelStore

    return ModelStore()


ACTIVATION_BITS_HELP = "CPU block kernels: activations as 16-bit integers (near float) or 8-bit (llama.cpp's)"


@app.command()
def run(
    model: Annotated[str, typer.Argument(help="store name, catalog name (smollm2), HF folder or .gguf path")],
    prompt: Annotated[str | None, typer.Argument(help="one question; omit it to chat")] = None,
    max_tokens: Annotated[int, typer.Option(help="most tokens per answer")] = 512,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    system: Annotated[str | None, typer.Option(help="system prompt")] = None,
    raw: Annotated[bool, typer.Option(help="plain completion, no chat template")] = False,
    guard_policy: Annotated[
        Path | None, typer.Option(help="guard input and output under this policy file (YAML or JSON)")
    ] = None,
    activation_bits: Annotated[int, typer.Option(help=ACTIVATION_BITS_HELP)] = 16,
) -> None:
    """Answer PROMPT with MODEL, streaming; without PROMPT, an interactive chat (/bye or Ctrl-D to leave)."""
    from llmasos.api import LLM
    from llmasos.errors import InvalidRequestError
    from llmasos.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    llm = LLM(model, guards=guard_policy, activation_bits=activation_bits)
    if guard_policy is not None:
        _report_guards()
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    use_chat = not raw and llm.tokenizer.has_chat_template
    if prompt is not None:
        _answer(llm, history + [{"role": "user", "content": prompt}] if use_chat else prompt, params)
        return
    typer.echo("Chat with the model. /bye or Ctrl-D to leave, Ctrl-C stops an answer.", err=True)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            typer.echo()
            return
        except KeyboardInterrupt:
            typer.echo("\n(use /bye or Ctrl-D to leave)", err=True)
            continue
        if line.strip() in ("/bye", "/exit", "/quit"):
            return
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            answer = _answer(llm, history if use_chat else line, params)
        except InvalidRequestError as exc:  # a prompt the guards block (or too long): the chat goes on
            history.pop()
            typer.secho(f"Error: {exc}", fg="red", err=True)
            continue
        history.append({"role": "assistant", "content": answer})


def _report_guards() -> None:
    """What the guards did, on stderr: stage, action and categories (never the text), for each
    verdict that changed something; an answer cut short says why."""
    import logging

    class Notice(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            verdict = record.audit
            if verdict["action"] != "allow":
                found = ", ".join(f"{c}: {v['action']}" for c, v in verdict["categories"].items())
                typer.secho(f"\n[guards, {verdict['stage']}: {found}]", fg="yellow", err=True)

    logger = logging.getLogger("llmasos.guards")
    logger.handlers = [Notice()]  # the CLI owns this process's logging: one notice per verdict
    logger.setLevel(logging.INFO)


def _answer(llm, prompt, params) -> str:
    """Stream one answer to stdout; Ctrl-C ends the answer (and frees its KV blocks), not the program."""
    text = ""
    stream = llm.stream(prompt, params)
    try:
        for delta in stream:
            text += delta
            sys.stdout.write(delta)
            sys.stdout.flush()
    except KeyboardInterrupt:
        stream.close()
        sys.stdout.write(" [stopped]")
    sys.stdout.write("\n")
    return text


@app.command()
def pull(name: Annotated[str, typer.Argument(help="catalog name (smollm2) or HF repo org/name")]) -> None:
    """Fetch a model into the store (checksum-verified; an interrupted pull leaves nothing behind)."""
    manifest = _store().pull(name)
    typer.echo(f"pulled {manifest.name} ({manifest.digest[:19]})")


@app.command("import")
def import_(
    path: Annotated[Path, typer.Argument(help="a Hugging Face model folder or a .gguf file")],
    name: Annotated[str | None, typer.Option(help="store name (default: folder or file name)")] = None,
) -> None:
    """Copy a local model into the store."""
    manifest = _store().import_path(path, name)
    typer.echo(f"imported {manifest.name} ({manifest.digest[:19]})")


@app.command("list")
def list_() -> None:
    """Models in the store."""
    from rich.console import Console
    from rich.table import Table

    table = Table("NAME", "FORMAT", "ARCHITECTURE", "SIZE", "DIGEST", box=None)
    for m in _store().list():
        table.add_row(m.name, m.format, str(m.facts.get("architecture", "")), _human(m.size), m.digest[7:19])
    Console().print(table)


@app.command()
def show(
    name: str,
    card: Annotated[bool, typer.Option(help="the model card: licence, provenance, scores, limits")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="the model card as JSON")] = False,
) -> None:
    """Architecture, parameters, dtype/quantization, context length, chat template, size and digest."""
    if card or as_json:
        from rich.console import Console
        from rich.markdown import Markdown

        from llmasos.store.card import build_card, render_card

        model_card = build_card(_store(), name)
        if as_json:
            typer.echo(model_card.to_json())
        else:
            Console().print(Markdown(render_card(model_card)))
        return
    info = _store().show(name)
    for key, value in info.items():
        if key == "files":
            value = ", ".join(value)
        elif key == "size":
            value = _human(value)
        elif key == "parameters" and value:
            value = f"{value / 1e6:.1f}M"
        typer.echo(f"{key:>15}  {value}")


@app.command()
def quantize(
    model: Annotated[str, typer.Argument(help="a store name (Llama family)")],
    to: Annotated[str, typer.Option(help="int8 (GGUF Q8_0 blocks) or int4 (Q4_1)")] = "int8",
    name: Annotated[str | None, typer.Option(help="store name of the copy (default MODEL-int8/int4)")] = None,
) -> None:
    """Store a weight-quantized copy of MODEL that the CPU kernel runs in its blocks."""
    from llmasos.train.quantize import quantize_model

    manifest = quantize_model(_store(), model, to, name)
    typer.echo(f"quantized {model} to {to}: {manifest.name} ({manifest.digest[:19]})")


@app.command()
def rm(names: list[str]) -> None:
    """Remove models from the store (blobs other models share are kept)."""
    store = _store()
    for name in names:
        store.remove(name)
        typer.echo(f"removed {name}")


@app.command()
def verify(names: Annotated[list[str] | None, typer.Argument()] = None) -> None:
    """Re-hash every blob of the models (all of them by default)."""
    store = _store()
    bad = 0
    for name in names or [m.name for m in store.list()]:
        problems = store.verify(name)
        bad += bool(problems)
        typer.echo(f"{name}: " + ("ok" if not problems else "\n  ".join(["CORRUPTED", *problems])))
    if bad:
        raise typer.Exit(1)


bench_app = typer.Typer(
    help="Benchmarks: the CPU workloads, or a running server.", invoke_without_command=True
)
app.add_typer(bench_app, name="bench")


@bench_app.callback()
def bench(
    ctx: typer.Context,
    workloads: Annotated[str, typer.Option(help="comma-separated, of C1,C2,C3,C4")] = "C1,C2,C3,C4",
    peers: Annotated[str, typer.Option(help="comma-separated, of the peers")] = "transformers,llama.cpp",
    model: Annotated[str, typer.Option(help="the model every system runs")] = "smollm2",
    output: Annotated[Path | None, typer.Option(help="also write the table as Markdown")] = None,
    activation_bits: Annotated[int, typer.Option(help=ACTIVATION_BITS_HELP)] = 16,
) -> None:
    """Time the CPU workloads C1-C4 (decode, prompt, concurrency, cold start) against peers; one table."""
    if ctx.invoked_subcommand is not None:
        return
    from llmasos.bench.cpu import run_bench

    run_bench(model, workloads.split(","), peers.split(","), output, activation_bits)


@bench_app.command("serve")
def bench_serve(
    url: Annotated[
        str, typer.Option(help="a running server (llmasos serve MODEL)")
    ] = "http://127.0.0.1:8000",
    model: Annotated[str, typer.Option(help="the model the server serves")] = "smollm2",
    num_requests: int = 64,
    request_rate: Annotated[
        float, typer.Option(help="Poisson arrivals per second (inf: all at once)")
    ] = float("inf"),
    max_concurrency: int = 16,
    prompt_len: int = 128,
    output_len: int = 64,
    offline: Annotated[
        bool, typer.Option(help="also run the kernel offline: the server/kernel ratio")
    ] = True,
    api_key: Annotated[str | None, typer.Option(envvar="LLMASOS_API_KEY")] = None,
    output: Annotated[Path | None, typer.Option(help="also write the table as Markdown")] = None,
) -> None:
    """Workload G3: TTFT, TPOT, ITL and throughput of a running server, beside the kernel offline."""
    from llmasos.bench.serve import format_table, offline_throughput, run_serve_bench

    result = run_serve_bench(
        url, model, num_requests, request_rate, max_concurrency, prompt_len, output_len, api_key=api_key
    )
    peer = (
        offline_throughput(model, num_requests, prompt_len, output_len, max_concurrency) if offline else None
    )
    format_table(result, peer, output)


@app.command()
def serve(
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
) -> None:
    """Serve models over an OpenAI-compatible HTTP API (keys, limits, metrics, audit log)."""
    from llmasos.config import EngineConfig
    from llmasos.serve.gateway import ServerConfig
    from llmasos.serve.registry import RegistryConfig
    from llmasos.serve.server import run_server

    engine = EngineConfig(
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        kv_cache_gib=kv_cache_gib,
        activation_bits=activation_bits,
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
    )
    run_server(config, host, port, idle_timeout, shutdown_timeout)


@app.command()
def ps(
    url: Annotated[str, typer.Option(help="the server")] = "http://127.0.0.1:8000",
    api_key: Annotated[str | None, typer.Option(envvar="LLMASOS_API_KEY")] = None,
) -> None:
    """Models loaded in a running server: memory, running and waiting requests, time left loaded."""
    import httpx
    from rich.console import Console
    from rich.table import Table

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{url.rstrip('/')}/v1/ps", headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        raise LLMasOSError(
            f"no LLMasOS server answers at {url} ({exc}); start one with `llmasos serve`"
        ) from exc
    if response.status_code != 200:
        raise LLMasOSError(f"{url} answered {response.status_code}: {response.text[:300]}")
    table = Table("MODEL", "KIND", "MEMORY", "RUNNING", "WAITING", "KV CACHE", "UNLOADS IN", box=None)
    for row in response.json()["models"]:
        kv = row["kv_cache_usage"]
        expires = row["expires_in_s"]
        table.add_row(
            row["model"],
            row["kind"],
            _human(row["memory_bytes"]),
            str(row["running"]),
            str(row["waiting"]),
            "" if kv is None else f"{kv:.0%}",
            "busy" if row["in_flight"] else ("never" if expires is None else f"{expires:.0f} s"),
        )
    Console().print(table)


@app.command()
def explain(
    model: Annotated[str, typer.Argument(help="store name, catalog name, HF folder or .gguf path")],
    prompt: Annotated[str, typer.Argument(help="the prompt to explain")],
    max_tokens: Annotated[int, typer.Option(help="most output tokens")] = 16,
    top_k: Annotated[int, typer.Option(help="alternatives shown per token (0-20)")] = 5,
    target: Annotated[int | None, typer.Option(help="output token to attribute (default: the first)")] = None,
    method: Annotated[str, typer.Option(help="or gradient_x_input")] = "integrated_gradients",
    steps: Annotated[int, typer.Option(help="integration steps")] = 32,
    baseline: Annotated[str, typer.Option(help="pad or zeros")] = "pad",
    output: Annotated[Path, typer.Option(help="writes OUTPUT.html, .png and .json")] = Path("explain"),
    system: Annotated[str | None, typer.Option(help="system prompt")] = None,
    raw: Annotated[bool, typer.Option(help="plain completion, no chat template")] = False,
) -> None:
    """Why MODEL answers PROMPT as it does: token surprisal, alternatives, and input attributions."""
    from llmasos.api import LLM
    from llmasos.explain import save

    llm = LLM(model)
    if not raw and llm.tokenizer.has_chat_template:
        turns = [{"role": "system", "content": system}] * bool(system)
        prompt = [*turns, {"role": "user", "content": prompt}]
    result = llm.explain(prompt, max_tokens=max_tokens, top_k=top_k, target=target, method=method,
                         steps=steps, baseline=baseline)  # fmt: skip
    for path in save(result, output):
        typer.echo(path)


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return str(size)


def _register_subcommands() -> None:
    from llmasos.bench.guards import bench_guards_command
    from llmasos.bench.kernels import bench_kernels_command
    from llmasos.bench.quality import bench_quality_command
    from llmasos.bench.train import bench_train_command
    from llmasos.cli.eval import eval_command
    from llmasos.cli.keys import keys_app
    from llmasos.cli.tasks import task_command
    from llmasos.cli.train import dpo, finetune, pretrain

    bench_app.command("train")(bench_train_command)
    bench_app.command("quality")(bench_quality_command)
    bench_app.command("guards")(bench_guards_command)
    bench_app.command("kernels")(bench_kernels_command)
    app.command("eval")(eval_command)
    app.command("task")(task_command)
    app.add_typer(keys_app, name="keys", help="API keys of the server: add, list, revoke.")
    for verb in (pretrain, finetune, dpo):
        app.command()(verb)


_register_subcommands()


def main(typer_app: typer.Typer = app) -> None:
    """Run a CLI app: every LLMasOS error becomes one line on stderr and exit code 1."""
    try:
        typer_app()
    except LLMasOSError as exc:
        typer.secho(f"Error: {exc}", fg="red", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
