"""The root of the shell: the `llmasos` Typer app every verb module adds its commands to, `main()`
that runs it, and what several verb groups share.

A verb is a plain typed function whose signature is its flags, registered with `@app.command()`
in the module of its group (run.py, store.py, serve.py, ...); a group of verbs (`llmasos bench`,
`llmasos keys`) is a Typer sub-app that its own module adds with `app.add_typer`. Imports stay
inside the verbs, so that `llmasos list` does not pay for torch and `llmasos run` pays for it once.
"""

from __future__ import annotations

import sys

import typer

from llmasos.errors import LLMasOSError

app = typer.Typer(
    name="llmasos",
    help="LLMasOS: run, serve and manage open LLMs on your own hardware.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

MODEL_HELP = "store name, catalog name (smollm2), HF folder or .gguf path"
SPECULATIVE_HELP = (
    "speculative decoding: ngram (prompt lookup drafts) or draft (--draft-model's), verified k + 1 tokens "
    "a forward"
)
SPECULATIVE_TOKENS_HELP = "most drafted tokens per step (default: 16 for ngram, 4 for draft)"
DRAFT_MODEL_HELP = "--speculative draft: the smaller model with the same tokenizer (store name or folder)"
ACTIVATION_BITS_HELP = "CPU block kernels: activations as 16-bit integers (near float) or 8-bit (llama.cpp's)"
TENSOR_PARALLEL_HELP = "split each model over this many ranks (tensor parallelism)"
DISTRIBUTED_EXECUTOR_HELP = (
    "what runs the other ranks: mp (processes here) or ray (Ray actors, other machines)"
)
RAY_ADDRESS_HELP = (
    "the Ray cluster to place ranks (or Ray replicas) on, HOST:PORT (default: RAY_ADDRESS, else a local one)"
)
RAY_PLACEMENT_HELP = (
    "how Ray places the ranks (or Ray replicas): PACK (fill a machine first), SPREAD, or STRICT_SPREAD "
    "(one per machine)"
)
KV_DISK_CACHE_HELP = (
    "keep full KV blocks of prompts on disk ($LLMASOS_HOME/cache/kv), at most this many GB, so a prefix "
    "computed before a restart is read back instead of recomputed"
)
VERBOSE = typer.Option(
    "--verbose", "-v", help="say on stderr whether a running server or this process does it"
)


def say(verbose: bool, message: str) -> None:
    """A --verbose note on stderr (stdout carries only the verb's own output)."""
    if verbose:
        typer.secho(message, fg="cyan", err=True)


def human_size(size: float) -> str:
    """Bytes as people read them: 512 B, 1.5 KB, 135.0 MB, 2.1 GB (powers of 1000, as Ollama)."""
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return str(size)


_end_without_teardown = False  # set by end_without_teardown(), for main()


def end_without_teardown() -> None:
    """Let `main()` end this process without the interpreter's teardown once the verb returns: a verb
    that loaded a model calls it. Finalizing torch's modules and freeing a model object by object took
    1.5 s after the answer was out on 2 busy cores (0.6 s for torch alone, less busy): most of
    `llmasos run`'s exit. Threads are joined, atexit handlers and weakref finalizers run (a split
    model's workers stop) and stdout and stderr are flushed, as in a normal exit; only the freeing of
    memory that the OS takes back anyway is skipped."""
    global _end_without_teardown
    _end_without_teardown = True


def _exit_now(code: int) -> None:
    import atexit
    import os
    import threading

    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away, a closed stream: nothing left to say
            pass
    os._exit(code)


def main() -> None:
    """Run the CLI: every LLMasOS error becomes one line on stderr and exit code 1."""
    code: int | str | None = 0
    try:
        app()
    except SystemExit as exc:
        code = exc.code
    except LLMasOSError as exc:
        typer.secho(f"Error: {exc}", fg="red", err=True)
        code = 1
    except KeyboardInterrupt:
        code = 130
    if _end_without_teardown and (code is None or isinstance(code, int)):
        _exit_now(code or 0)
    sys.exit(code)
