"""The store's verbs: `llmasos pull`, `import`, `list`, `show`, `quantize`, `rm` and `verify`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmasos.cli.app import app, human_size


def _store():
    from llmasos.store import ModelStore

    return ModelStore()


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
        table.add_row(
            m.name, m.format, str(m.facts.get("architecture", "")), human_size(m.size), m.digest[7:19]
        )
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
