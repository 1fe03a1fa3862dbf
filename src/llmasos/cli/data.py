"""`llmasos data import|list|show|rm|verify|export|prepare|stats|split`: datasets in the store
(llmasos.data)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmasos.cli.app import app, human_size

data_app = typer.Typer(help="Datasets in the store: import, prepare, inspect, export.", no_args_is_help=True)
app.add_typer(data_app, name="data")

DatasetName = Annotated[str, typer.Argument(help="a dataset name (see `llmasos data list`)")]


def _datasets():
    from llmasos.data.store import DatasetStore

    return DatasetStore()


@data_app.command("import")
def import_(
    path: Annotated[
        Path,
        typer.Argument(
            help="JSONL, Parquet, CSV, text files, a folder of them, or a "
            "Hugging Face `datasets` save_to_disk folder"
        ),
    ],  # fmt: skip
    name: Annotated[str, typer.Option(help="the dataset's name in the store")],
) -> None:
    """Copy data into the store as Parquet shards (streamed; an interrupted import registers nothing)."""
    m = _datasets().import_path(path, name, progress=True)
    typer.echo(f"imported {m.name}: {m.rows} rows, {human_size(m.size)} ({m.digest[:19]})")


@data_app.command("list")
def list_() -> None:
    """Datasets in the store."""
    from rich.console import Console
    from rich.table import Table

    table = Table("NAME", "ROWS", "SIZE", "DIGEST", "SOURCE", "CREATED (UTC)", box=None)
    for m in _datasets().list():
        table.add_row(m.name, str(m.rows), human_size(m.size), m.digest[7:19], m.source, m.created[:19])
    Console().print(table)


@data_app.command()
def show(name: DatasetName) -> None:
    """A dataset's columns, rows, digest and lineage (its sources, the recipe that made it, what each
    step removed)."""
    m = _datasets().get(name)
    lines = [
        f"name      {m.name}",
        f"digest    {m.digest}",
        f"rows      {m.rows}",
        f"size      {human_size(m.size)} in {len(m.files)} shard(s)",
        f"created   {m.created}",
        f"source    {m.source}",
        "columns   " + ", ".join(f"{col} ({kind})" for col, kind in m.schema.items()),
        "lineage",
        *(f"  from    {s['source']} ({s['digest']})" for s in m.lineage["sources"]),
    ]
    recipe = m.lineage.get("recipe")
    if recipe:
        lines.append(f"  recipe  {recipe.get('path', '')} ({recipe['digest']})")
        lines += [f"    step  {step}" for step in recipe.get("steps", [])]
    lines.append(f"  by      llmasos {m.lineage.get('llmasos')}")
    lines += _step_lines(m.report)
    typer.echo("\n".join(lines))


@data_app.command()
def rm(name: DatasetName) -> None:
    """Remove a dataset (and the shards no other dataset shares)."""
    _datasets().remove(name)
    typer.echo(f"removed {name}")


@data_app.command()
def verify(name: DatasetName) -> None:
    """Re-hash a dataset's shards and rows; exit code 1 if anything is wrong."""
    problems = _datasets().verify(name)
    for problem in problems:
        typer.echo(f"{name}: {problem}", err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"{name}: ok")


@data_app.command()
def export(
    name: DatasetName,
    out: Annotated[Path, typer.Argument(help="the .jsonl or .parquet file to write")],
) -> None:
    """Write a dataset as JSONL (canonical lines: the file's sha256 is the dataset's digest) or Parquet."""
    rows = _datasets().export(name, out)
    typer.echo(f"wrote {rows} rows to {out}")


@data_app.command()
def prepare(
    dataset: DatasetName,
    recipe: Annotated[Path, typer.Option(help="the recipe YAML (steps; see docs/data.md)")],
    name: Annotated[str, typer.Option(help="the new dataset's name")],
    tasks: Annotated[
        int, typer.Option(min=1, help="worker processes for the per-record steps (dedup stays in order)")
    ] = 1,
) -> None:
    """Run a recipe's steps (quality filters, language id, dedup, PII scrub, decontamination, chat
    checks) over a dataset into a new one; the recipe is checked before any work, progress is shown
    per step. The output is the same whatever --tasks."""
    from llmasos.data.pipeline.run import prepare as run_recipe

    m = run_recipe(_datasets(), dataset, str(recipe), name, tasks=tasks)
    typer.echo(f"prepared {m.name}: {m.rows} rows ({m.digest[:19]})")
    typer.echo("\n".join(_step_lines(m.report)))


@data_app.command()
def stats(
    name: DatasetName,
    tokenizer: Annotated[
        str | None, typer.Option(help="count tokens with this store model's tokenizer (default: words)")
    ] = None,
    column: Annotated[str | None, typer.Option(help="the text column (default: text)")] = None,
    out: Annotated[
        Path | None, typer.Option(help="write here (default: beside the dataset in the store)")
    ] = None,
) -> None:
    """Lengths, tokens, languages, duplicates, PII and what each step removed, as Markdown + PNG
    (streamed: memory does not grow with the dataset, but for 8 bytes a row to find duplicates)."""
    from llmasos.data.store import stats as dataset_stats
    from llmasos.data.store.stats_report import write
    from llmasos.errors import LLMasOSError

    datasets = _datasets()
    folder = datasets.store.resolve(tokenizer) if tokenizer else None
    if folder is not None and not (folder / "tokenizer.json").is_file():
        raise LLMasOSError(f"model '{tokenizer}' has no tokenizer.json; pick another --tokenizer")
    figures = dataset_stats.collect(datasets, name, column, (tokenizer, folder) if folder else None)
    typer.echo(str(write(figures, out or datasets.stats_folder(name))))


@data_app.command()
def split(
    name: DatasetName,
    eval_fraction: Annotated[
        float, typer.Option("--eval", help="the fraction of rows for evaluation")
    ] = 0.02,
    seed: Annotated[
        int, typer.Option(help="which rows: the same seed splits the same content the same way")
    ] = 0,
    names: Annotated[
        tuple[str, str] | None, typer.Option(help="the two new datasets (default: NAME-train NAME-eval)")
    ] = None,
) -> None:
    """Split a dataset into two new ones by a seeded hash of each row (stable across machines)."""
    from llmasos.data.store.split import SplitParams
    from llmasos.data.store.split import split as split_dataset

    made = split_dataset(_datasets(), name, SplitParams(eval_fraction, seed), names)
    for m in made:
        typer.echo(f"{m.name}: {m.rows} rows ({m.digest[:19]})")


def _step_lines(report: dict) -> list[str]:
    """What each step of the recipe did: its counts, then a few of its findings."""
    lines = []
    for step, counts in (report.get("steps") or {}).items():
        lines.append(f"  {step}: " + ", ".join(f"{k} {v}" for k, v in counts.items() if k != "examples"))
        lines += [f"      {example}" for example in counts.get("examples", [])[:5]]
    return lines
