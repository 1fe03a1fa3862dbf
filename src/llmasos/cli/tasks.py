"""`llmasos task NAME MODEL [TEXT]`: one everyday task from the shell."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from llmasos.cli.app import MODEL_HELP, app
from llmasos.errors import InvalidRequestError
from llmasos.tasks.tasks import TASKS


@app.command()
def task(
    name: Annotated[str, typer.Argument(help=" | ".join(TASKS))],
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    text: Annotated[str | None, typer.Argument(help="the input (answer: the question)")] = None,
    file: Annotated[Path | None, typer.Option(help="read the input from this file")] = None,
    labels: Annotated[str | None, typer.Option(help="classify: comma-separated labels")] = None,
    target: Annotated[str | None, typer.Option(help="translate: the language to translate into")] = None,
    source: Annotated[str, typer.Option(help="translate: the language of the text")] = "English",
    context: Annotated[Path | None, typer.Option(help="answer: the file to answer from")] = None,
    schema: Annotated[Path | None, typer.Option(help="extract: a JSON Schema file")] = None,
    language: Annotated[str, typer.Option(help="complete_code: the language")] = "python",
    max_words: Annotated[int, typer.Option(help="summarize: most words")] = 60,
    max_tokens: Annotated[int | None, typer.Option(help="most tokens to generate")] = None,
    templates: Annotated[Path | None, typer.Option(help="a YAML file of prompt templates to use")] = None,
) -> None:
    """Summarize, translate, classify, answer, extract or complete code: the task's prompt and decoding."""
    from llmasos.api import LLM

    if name not in TASKS:
        raise InvalidRequestError(f"unknown task {name!r}; the tasks are {', '.join(TASKS)}")
    value = _read(file) if file else text
    if value is None:
        raise InvalidRequestError(f"give the {name} input as an argument or with --file")
    needs = {"translate": (target, "--target, the language to translate into"),
             "answer": (context, "--context FILE, the text to answer from"),
             "extract": (schema, "--schema FILE, a JSON Schema")}  # fmt: skip
    if name in needs and not needs[name][0]:  # before the model loads
        raise InvalidRequestError(f"{name} needs {needs[name][1]}")
    loaded_schema = _schema(schema) if name == "extract" else None
    tasks = LLM(model, templates=str(templates) if templates else None).tasks
    budget = {"max_tokens": max_tokens} if max_tokens else {}
    if name == "summarize":
        result = tasks.summarize(value, max_words, **budget)
    elif name == "translate":
        result = tasks.translate(value, target, source, **budget)
    elif name == "classify":
        options = [label.strip() for label in labels.split(",")] if labels else None
        result = json.dumps(vars(tasks.classify(value, options)), indent=2)
    elif name == "answer":
        result = tasks.answer(value, _read(context), **budget)
    elif name == "extract":
        result = json.dumps(tasks.extract(value, loaded_schema, **budget), indent=2)
    else:
        result = value + tasks.complete_code(value, language, **budget)
    typer.echo(result)


def _schema(path: Path) -> dict:
    try:
        return json.loads(_read(path))
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"{path} is not valid JSON: {exc}") from exc


def _read(path: Path) -> str:
    if not path.is_file():
        raise InvalidRequestError(f"{path} is not a file")
    return path.read_text(encoding="utf-8")
