"""The diagnostics: `llmasos eval MODEL --task FILE|perplexity|bias` (the report as a table, saved as
JSON and Markdown) and `llmasos explain MODEL PROMPT` (surprisal, alternatives, attributions)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmasos.cli.app import MODEL_HELP, app


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    task: Annotated[
        str,
        typer.Option(
            help="JSONL task (multiple choice, generation, classification), 'perplexity', 'bias' "
            "or 'data:DATASET[:COLUMN]' (a store dataset: its task, or perplexity of a column)"
        ),
    ],  # fmt: skip
    data: Annotated[Path | None, typer.Option(help="perplexity: text file; bias: probe YAML")] = None,
    kind: Annotated[str | None, typer.Option(help="multiple_choice | generation | classification")] = None,
    template: Annotated[str | None, typer.Option(help="prompt template, e.g. 'Q: {prompt}\\nA:'")] = None,
    shots: Annotated[int, typer.Option(help="few-shot examples before each prompt")] = 0,
    seed: Annotated[int, typer.Option(help="which few-shot examples")] = 0,
    chat: Annotated[bool, typer.Option(help="wrap prompts in the model's chat template")] = False,
    max_tokens: Annotated[int, typer.Option(help="generation: most tokens per answer")] = 64,
    context: Annotated[int | None, typer.Option(help="perplexity: window size in tokens")] = None,
    stride: Annotated[int | None, typer.Option(help="perplexity: tokens each window moves")] = None,
    limit: Annotated[int | None, typer.Option(help="score only the first N examples")] = None,
    output: Annotated[Path, typer.Option(help="folder for the JSON and Markdown reports")] = Path("eval"),
    max_model_len: Annotated[int | None, typer.Option(help="context length to run with")] = None,
    samples: Annotated[int, typer.Option(help="bias: completions per probe (1: greedy)")] = 1,
    sentiment_model: Annotated[
        str | None, typer.Option(help="bias: a store model that scores sentiment (default: VADER lexicon)")
    ] = None,
) -> None:
    """Evaluate MODEL: perplexity, multiple choice, generation (BLEU/ROUGE/EM/F1), classification or bias."""
    from rich.console import Console
    from rich.markdown import Markdown

    from llmasos.api import LLM
    from llmasos.eval.run import EvalConfig, check_config, evaluate
    from llmasos.store import ModelStore
    from llmasos.store.card import record_eval

    config = EvalConfig(
        task, data, kind, template, shots, seed, chat, max_tokens, context, stride, limit, progress=True,
        samples=samples, sentiment_model=sentiment_model,
    )  # fmt: skip
    check_config(config)  # a bad task file fails before any model loads
    report = evaluate(LLM(model, max_model_len=max_model_len, seed=seed), model, config)
    json_path, md_path = report.save(output)
    Console().print(Markdown(report.to_markdown()))
    recorded = record_eval(ModelStore(), model, report)  # into the model card, for a store model
    typer.echo(
        f"saved {json_path} and {md_path}" + (f"; recorded in {model}'s card" if recorded else ""), err=True
    )


@app.command()
def explain(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
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
