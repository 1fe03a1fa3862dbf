"""`llmasos run MODEL [PROMPT]`: one answer, streamed; without PROMPT, an interactive chat. A running
`llmasos serve` answers when it serves MODEL (see cli/daemon.py); otherwise the model loads here, and a
Hugging Face repo id (org/name) not in the store is pulled first, as `ollama run` pulls."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from llmasos.cli.app import (
    ACTIVATION_BITS_HELP,
    DISTRIBUTED_EXECUTOR_HELP,
    DRAFT_MODEL_HELP,
    KV_DISK_CACHE_HELP,
    MODEL_HELP,
    RAY_ADDRESS_HELP,
    RAY_PLACEMENT_HELP,
    SPECULATIVE_HELP,
    SPECULATIVE_TOKENS_HELP,
    TENSOR_PARALLEL_HELP,
    VERBOSE,
    app,
    end_without_teardown,
    say,
)


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
    tensor_parallel_size: Annotated[int, typer.Option(help=TENSOR_PARALLEL_HELP)] = 1,
    distributed_executor: Annotated[str, typer.Option(help=DISTRIBUTED_EXECUTOR_HELP)] = "mp",
    ray_address: Annotated[str | None, typer.Option(help=RAY_ADDRESS_HELP)] = None,
    ray_placement: Annotated[str, typer.Option(help=RAY_PLACEMENT_HELP)] = "PACK",
    kv_disk_cache_gb: Annotated[float | None, typer.Option(help=KV_DISK_CACHE_HELP)] = None,
    speculative: Annotated[str | None, typer.Option(help=SPECULATIVE_HELP)] = None,
    num_speculative_tokens: Annotated[int | None, typer.Option(help=SPECULATIVE_TOKENS_HELP)] = None,
    draft_model: Annotated[str | None, typer.Option(help=DRAFT_MODEL_HELP)] = None,
    verbose: Annotated[bool, VERBOSE] = False,
) -> None:
    """Answer PROMPT with MODEL, streaming; without PROMPT, an interactive chat (/bye or Ctrl-D to leave).

    A running `llmasos serve` that serves MODEL answers (no model load here); otherwise this process
    loads it. --guard-policy, --activation-bits, --kv-disk-cache-gb and a split over ranks
    (--tensor-parallel-size) are this process's settings, so they run here."""
    from llmasos.cli.daemon import Daemon, DaemonError
    from llmasos.errors import InvalidRequestError

    local = (
        guard_policy is not None
        or activation_bits != 16
        or tensor_parallel_size > 1
        or kv_disk_cache_gb is not None
        or speculative is not None
        or Path(model).expanduser().exists()
    )
    daemon = None if local else Daemon.find()
    if daemon is not None and model in daemon.models():
        say(verbose, f"answering with {model} on the server at {daemon.url}")
        use_chat = not raw
        options = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}

        def stream(prompt_or_messages):
            return daemon.stream_text(model, prompt_or_messages, options)
    else:
        where = f"the server at {daemon.url} does not serve {model}" if daemon else "no server answers"
        say(verbose, f"{where}: loading {model} in this process")
        end_without_teardown()
        from llmasos.api import LLM
        from llmasos.sampling_params import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        llm = LLM.from_pretrained(
            model,
            guards=guard_policy,
            activation_bits=activation_bits,
            tensor_parallel_size=tensor_parallel_size,
            distributed_executor=distributed_executor,
            ray_address=ray_address,
            ray_placement=ray_placement,
            kv_disk_cache_gb=kv_disk_cache_gb,
            speculative=speculative,
            num_speculative_tokens=num_speculative_tokens,
            speculative_model=draft_model,
        )
        if guard_policy is not None:
            _report_guards()
        use_chat = not raw and llm.tokenizer.has_chat_template

        def stream(prompt_or_messages):
            return llm.stream(prompt_or_messages, params)

    history: list[dict] = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        _answer(stream(history + [{"role": "user", "content": prompt}] if use_chat else prompt))
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
            answer = _answer(stream(history if use_chat else line))
        except (InvalidRequestError, DaemonError) as exc:  # a prompt the guards block, too long: chat on
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


def _answer(stream: Iterator[str]) -> str:
    """Write one streamed answer to stdout; Ctrl-C ends the answer (the request is aborted and its KV
    blocks freed, here or on the server), not the program."""
    text = ""
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
