"""`llmasos data prepare`: a recipe's steps over a stored dataset, streamed batch by batch into a
new dataset, whose lineage names the parent's digest and the recipe's, and whose report says what
each step did. Nothing is registered unless every batch went through every step. With `tasks` > 1
the per-record steps run in worker processes (parallel.py); the output is the same."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator

import pyarrow as pa
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from llmasos.data.pipeline.parallel import Batch, Stages
from llmasos.data.pipeline.recipe import build_step, load_recipe
from llmasos.data.store import DatasetManifest, DatasetStore
from llmasos.errors import LLMasOSError

_EXAMPLES = 20  # per step, in the report


def prepare(
    store: DatasetStore, dataset: str, recipe_path: str, name: str, progress: bool = True, tasks: int = 1
) -> DatasetManifest:
    """Run the recipe over `dataset` into a new dataset `name`, the per-record steps in `tasks`
    processes; the recipe is checked, the names are checked and the evaluation sources read before
    the first row is."""
    if tasks < 1:
        raise LLMasOSError(f"--tasks must be at least 1, got {tasks}")
    parent = store.get(dataset)
    store.check_new(name)
    recipe = load_recipe(recipe_path, store)
    # with workers, the per-record steps run there: the parent's copies only name and count them
    built = [build_step(n, options, recipe.column, store, index=tasks == 1) for n, options in recipe.steps]
    totals = [Counter() for _ in built]
    examples: list[list[str]] = [[] for _ in built]
    report: dict = {"steps": {}}
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rows in"),
        console=Console(stderr=True),
        disable=not progress,
    )
    bars = [bar.add_task(f"{i}. {step.name}", total=parent.rows) for i, step in enumerate(built, 1)]

    def merge(i: int, counted: tuple[int, dict, list[str]]) -> None:
        rows_in, counts, found = counted
        if rows_in:  # a step no row reached reports nothing, as when the rows ran out before it
            totals[i]["in"] += rows_in
            totals[i].update(counts)
            examples[i] += found[: _EXAMPLES - len(examples[i])]
            bar.advance(bars[i], rows_in)

    stages = Stages(built, recipe.steps, recipe.column, store.store.home, tasks, merge)

    def tables() -> Iterator[tuple[pa.Table, str]]:
        source = store.batches(dataset)
        first = next(source, None)
        if first is None:
            return

        def read() -> Iterator[Batch]:
            line = 1
            for table in itertools.chain([first], source):
                yield Batch(line, source=table)
                line += table.num_rows

        for table in stages.run(read(), output_schema(first.schema, built)):
            yield table, f"dataset {dataset}"
        for i, step in enumerate(built):  # filled in before create() writes the manifest
            found = {"examples": examples[i]} if examples[i] else {}
            report["steps"][f"{i + 1}. {step.name}"] = {**totals[i], **found}

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
            stages.close()
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
