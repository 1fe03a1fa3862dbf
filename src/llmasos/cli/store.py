"""The store's verbs: `llmasos pull`, `import`, `list`, `show`, `quantize`, `rm` and `verify`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmasos.cli.app import VERBOSE, app, human_size, say


def _store():
    from llmasos.store import ModelStore

    return ModelStore()


def _daemon(verbose: bool):
    """The running server, if one answers (see cli/daemon.py), saying which with --verbose."""
    from llmasos.cli.daemon import Daemon, host_url

    daemon = Daemon.find()
    say(
        verbose,
        f"asking the server at {daemon.url}" if daemon else f"no server at {host_url()}: the store here",
    )
    return daemon


@app.command()
def pull(
    name: Annotated[str, typer.Argument(help="catalog name (smollm2) or HF repo org/name")],
    verbose: Annotated[bool, VERBOSE] = False,
) -> None:
    """Fetch a model into the store (checksum-verified; an interrupted pull leaves nothing behind)."""
    daemon = _daemon(verbose)
    if daemon is None:
        manifest = _store().pull(name)
        typer.echo(f"pulled {manifest.name} ({manifest.digest[:19]})")
        return
    from llmasos.store.sources import progress_bar

    tasks: dict[tuple, int] = {}
    with progress_bar(True) as bar:  # the server's progress events, drawn as the store draws its own
        for event in daemon.pull(name):
            if event["status"] == "success":
                done = event
                continue
            key = (event["status"], event.get("file"))
            if key not in tasks:
                tasks[key] = bar.add_task(" ".join(filter(None, key)), total=event.get("total"))
            bar.update(tasks[key], completed=event["completed"], total=event.get("total"))
    typer.echo(f"pulled {done['name']} ({done['digest'][:19]})")


@app.command("import")
def import_(
    path: Annotated[Path, typer.Argument(help="a Hugging Face model folder or a .gguf file")],
    name: Annotated[str | None, typer.Option(help="store name (default: folder or file name)")] = None,
) -> None:
    """Copy a local model into the store."""
    manifest = _store().import_path(path, name)
    typer.echo(f"imported {manifest.name} ({manifest.digest[:19]})")


@app.command("list")
def list_(verbose: Annotated[bool, VERBOSE] = False) -> None:
    """Models in the store."""
    from rich.console import Console
    from rich.table import Table

    daemon = _daemon(verbose)
    if daemon is not None:
        models = daemon.get("/api/tags")["models"]
    else:
        models = [
            {"name": m.name, "format": m.format, "architecture": m.facts.get("architecture"), "size": m.size,
             "digest": m.digest}
            for m in _store().list()
        ]  # fmt: skip
    table = Table("NAME", "FORMAT", "ARCHITECTURE", "SIZE", "DIGEST", box=None)
    for m in models:
        table.add_row(
            m["name"], m["format"], m["architecture"] or "", human_size(m["size"]), m["digest"][7:19]
        )
    Console().print(table)


@app.command()
def show(
    name: str,
    card: Annotated[bool, typer.Option(help="the model card: licence, provenance, scores, limits")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="the model card as JSON")] = False,
    verbose: Annotated[bool, VERBOSE] = False,
) -> None:
    """Architecture, parameters, weight types, context length, chat template, size and digest."""
    daemon = _daemon(verbose)
    if card or as_json:
        from rich.console import Console
        from rich.markdown import Markdown

        from llmasos.store.card import ModelCard, build_card, render_card

        model_card = (
            ModelCard.from_dict(daemon.post("/api/show", {"model": name})["card"]) if daemon else None
        )
        model_card = model_card or build_card(_store(), name)
        if as_json:
            typer.echo(model_card.to_json())
        else:
            Console().print(Markdown(render_card(model_card)))
        return
    info = daemon.post("/api/show", {"model": name})["details"] if daemon else _store().show(name)
    for key, value in info.items():
        if key == "files":
            value = ", ".join(value)
        elif key == "size":
            value = human_size(value)
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
def rm(names: list[str], verbose: Annotated[bool, VERBOSE] = False) -> None:
    """Remove models from the store (blobs other models share are kept); a running server unloads them."""
    daemon = _daemon(verbose)
    for name in names:
        if daemon is not None:
            daemon.delete("/api/delete", {"model": name})
        else:
            _store().remove(name)
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
