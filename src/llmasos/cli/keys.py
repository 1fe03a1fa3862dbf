"""`llmasos keys add|list|revoke`: manage the server's API keys from the shell.

A running server re-reads the keys file on change, so these take effect without a restart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from llmasos.cli.app import app

keys_app = typer.Typer(help="API keys of the server: add, list, revoke.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

KeysFile = Annotated[Optional[Path], typer.Option(help="keys file (default: $LLMASOS_HOME/keys.json)")]  # noqa: UP045


@keys_app.command()
def add(
    name: Annotated[str, typer.Argument(help="a unique name: who or what uses the key")],
    models: Annotated[str, typer.Option(help="comma-separated model names or patterns; * for all")] = "*",
    tools: Annotated[
        str, typer.Option(help="comma-separated function names or patterns a request may offer; * for all")
    ] = "*",
    rpm: Annotated[Optional[int], typer.Option(min=1, help="requests per minute")] = None,  # noqa: UP045
    tpm: Annotated[Optional[int], typer.Option(min=1, help="tokens per minute")] = None,  # noqa: UP045
    budget: Annotated[Optional[int], typer.Option(min=1, help="tokens over the key's life")] = None,  # noqa: UP045
    admin: Annotated[
        bool, typer.Option(help="may pull, remove, load and unload models and manage keys")
    ] = False,
    keys_file: KeysFile = None,
) -> None:
    """Create a key and print its secret (on stdout, alone, so that scripts can capture it)."""
    from llmasos.serve.keys import KeyStore

    key, secret = KeyStore(keys_file).add(
        name,
        models.split(","),
        requests_per_minute=rpm,
        tokens_per_minute=tpm,
        token_budget=budget,
        admin=admin,
        tools=tools.split(","),
    )
    typer.echo(secret)
    typer.echo(f"Key '{key.name}' added. Save the secret above now: it will not be shown again.", err=True)


@keys_app.command("list")
def list_(keys_file: KeysFile = None) -> None:
    """Keys with their models, tools, limits and usage (secrets are never stored, so never shown)."""
    from rich.console import Console
    from rich.table import Table

    from llmasos.serve.keys import KeyStore

    table = Table(
        "NAME", "MODELS", "TOOLS", "ADMIN", "RPM", "TPM", "USED/BUDGET", "CREATED (UTC)", "REVOKED", box=None
    )
    for k in KeyStore(keys_file).list():
        table.add_row(
            k.name,
            ",".join(k.models),
            ",".join(k.tools) or "-",
            "yes" if k.admin else "",
            _limit(k.requests_per_minute),
            _limit(k.tokens_per_minute),
            f"{k.tokens_used}/{_limit(k.token_budget)}",
            k.created[:16].replace("T", " "),
            "yes" if k.revoked else "",
        )
    console = Console()
    if not console.is_terminal:  # piped: one key a line, however many columns, for scripts to read
        console.width = 200
    console.print(table)


@keys_app.command()
def revoke(name: str, keys_file: KeysFile = None) -> None:
    """Revoke a key: requests with it fail from the next one on."""
    from llmasos.serve.keys import KeyStore

    KeyStore(keys_file).revoke(name)
    typer.echo(f"revoked {name}")


def _limit(value: int | None) -> str:
    return "-" if value is None else str(value)
