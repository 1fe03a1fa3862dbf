"""The shell: `llmasos VERB`. Each verb is a plain typed function whose signature is its flags.

Imports stay inside the verbs so that `llmasos list` does not pay for torch, and `llmasos run`
pays for it once. Every LLMasOS error becomes one clean line on stderr and exit code 1.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

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


@app.command()
def run(
    model: Annotated[str, typer.Argument(help="store name, catalog name (smollm2), HF folder or .gguf path")],
    prompt: Annotated[Optional[str], typer.Argument(help="one question; omit it to chat")] = None,  # noqa: UP045
    max_tokens: Annotated[int, typer.Option(help="most tokens per answer")] = 512,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    top_p: float = 1.0,
    seed: Optional[int] = None,  # noqa: UP045
    system: Annotated[Optional[str], typer.Option(help="system prompt")] = None,  # noqa: UP045
    raw: Annotated[bool, typer.Option(help="plain completion, no chat template")] = False,
) -> None:
    """Answer PROMPT with MODEL, streaming; without PROMPT, an interactive chat (/bye or Ctrl-D to leave)."""
    from llmasos.api import LLM
    from llmasos.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    llm = LLM(model)
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
        answer = _answer(llm, history if use_chat else line, params)
        history.append({"role": "assistant", "content": answer})


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
    name: Annotated[Optional[str], typer.Option(help="store name (default: folder or file name)")] = None,  # noqa: UP045
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
def show(name: str) -> None:
    """Architecture, parameters, dtype/quantization, context length, chat template, size and digest."""
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
def rm(names: list[str]) -> None:
    """Remove models from the store (blobs other models share are kept)."""
    store = _store()
    for name in names:
        store.remove(name)
        typer.echo(f"removed {name}")


@app.command()
def verify(names: Annotated[Optional[list[str]], typer.Argument()] = None) -> None:  # noqa: UP045
    """Re-hash every blob of the models (all of them by default)."""
    store = _store()
    bad = 0
    for name in names or [m.name for m in store.list()]:
        problems = store.verify(name)
        bad += bool(problems)
        typer.echo(f"{name}: " + ("ok" if not problems else "\n  ".join(["CORRUPTED", *problems])))
    if bad:
        raise typer.Exit(1)


@app.command()
def bench(
    workloads: Annotated[str, typer.Option(help="comma-separated, of C1,C2,C3,C4")] = "C1,C2,C3,C4",
    peers: Annotated[str, typer.Option(help="comma-separated, of the peers")] = "transformers,llama.cpp",
    model: Annotated[str, typer.Option(help="the model every system runs")] = "smollm2",
    output: Annotated[Optional[Path], typer.Option(help="also write the table as Markdown")] = None,  # noqa: UP045
) -> None:
    """Time the CPU workloads C1-C4 (decode, prompt, concurrency, cold start) against peers; one table."""
    from llmasos.bench import run_bench

    run_bench(model, workloads.split(","), peers.split(","), output)


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return str(size)


def main() -> None:
    try:
        app()
    except LLMasOSError as exc:
        typer.secho(f"Error: {exc}", fg="red", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
