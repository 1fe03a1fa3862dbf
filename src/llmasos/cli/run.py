"""`llmasos run MODEL [PROMPT]`: one answer, streamed; without PROMPT, an interactive chat. A Hugging Face
repo id (org/name) not in the store is pulled first, as `ollama run` pulls."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from llmasos.cli.app import ACTIVATION_BITS_HELP, MODEL_HELP, app


@app.command()
def run(
    model: Annotated[str, typer.Argument(help=f"{MODEL_HELP}, or a hub repo id (org/name), pulled first")],
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
    llm = LLM.from_pretrained(model, guards=guard_policy, activation_bits=activation_bits)
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
