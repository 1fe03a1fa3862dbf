"""`llmasos data prepare`: a recipe's steps over a stored dataset, streamed batch by batch into a
new dataset, whose lineage names the parent's digest and the recipe's, and whose report says what
each step did. Nothing is registered unless every batch went through every step."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from llmasos.data.pipeline.recipe import build_step, load_recipe
from llmasos.data.store import DatasetManifest, DatasetStore


def prepare(
    store: DatasetStore, dataset: str, recipe_path: str, name: str, progress: bool = True
) -> DatasetManifest:
    """Run the recipe over `dataset` into a new dataset `name`; the recipe is checked, the names
    are checked and the evaluation sources read before the first row is."""
    parent = store.get(dataset)
    store.check_new(name)
    recipe = load_recipe(recipe_path, store)
    built = [build_step(n, options, recipe.column, store) for n, options in recipe.steps]
    report: dict = {"steps": {}}
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rows in"),
        console=Console(stderr=True),
        disable=not progress,
    )

    def tables() -> Iterator[tuple[pa.Table, str]]:
        tasks = [bar.add_task(f"{i}. {step.name}", total=parent.rows) for i, step in enumerate(built, 1)]
        line, schema = 1, None
        for table in store.batches(dataset):
            schema = schema or output_schema(table.schema, built)
            rows = list(enumerate(table.to_pylist(), start=line))
            line += table.num_rows
            for step, task in zip(built, tasks):
                step.counts["in"] += len(rows)
                bar.advance(task, len(rows))
                rows = step(rows)
                if not rows:
                    break
            if rows:
                yield (
                    pa.Table.from_pylist([row for _, row in rows], schema=schema),
                    f"dataset {dataset}",
                )
        for i, step in enumerate(built, 1):  # filled in before create() writes the manifest
            report["steps"][f"{i}. {step.name}"] = step.report()

    with bar:
        try:
            return store.create(
                name,
                tables(),
                source=f"dataset:{dataset}@{parent.digest}",
                sources=[{"source": f"dataset:{dataset}", "digest": parent.digest}],
                recipe=recipe.lineage(),
                report=report,
            )
        finally:
            for step in built:
                step.close()


def output_schema(schema: pa.Schema, built: list) -> pa.Schema:
    """The parent's schema with the columns the steps add (language id's), replacing any of the
    same name."""
    for step in built:
        for column in step.columns():
            at = schema.get_field_index(column.name)
            schema = schema.set(at, column) if at >= 0 else schema.append(column)
    return schema
