"""The toolchain's verbs: `llmasos pretrain`, `finetune` and `dpo` (under torchrun, one
`python -m llmasos VERB` per rank).

The flags are the config's fields: `config_flags` gives the verb one option per dataclass field,
named as in the YAML file, so a flag, a config key and a field can never drift apart. A flag
given on the command line overrides the file; one not given leaves the file's value (or the
field's default) in place.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from llmasos.cli.app import app
from llmasos.train.config import load_config
from llmasos.train.dpo import DPOConfig
from llmasos.train.finetune import FinetuneConfig
from llmasos.train.pretrain import PretrainConfig


def config_flags(cls: type) -> Callable[[Callable], Callable]:
    """Give a verb `fn(config, **flags)` the signature typer reads: --config plus one option per
    field of `cls`, each defaulting to None (= not given)."""

    def decorate(fn: Callable) -> Callable:
        hints = typing.get_type_hints(cls)
        params = [
            inspect.Parameter(
                "config",
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[Path | None, typer.Option(help="YAML file whose keys are these flags")],
            )
        ]
        for field in dataclasses.fields(cls):
            default = (
                field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
            )
            kind = hints[field.name]
            optional = kind if type(None) in typing.get_args(kind) else kind | None
            option = typer.Option(
                help=field.metadata.get("help", ""),
                show_default=field.metadata.get("shown")
                or (str(default) if default not in (None, []) else "none"),
            )
            params.append(
                inspect.Parameter(
                    field.name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=None,
                    annotation=Annotated[optional, option],
                )
            )
        fn.__signature__ = inspect.Signature(params)
        return fn

    return decorate


@app.command()
@config_flags(PretrainConfig)
def pretrain(config: Path | None = None, **flags: Any) -> None:
    """Pretrain a Llama-family model from scratch on your text and add it to the store."""
    from llmasos.train.pretrain import run_pretrain

    settings = load_config(PretrainConfig, config, flags)
    path = run_pretrain(settings)
    typer.echo(f"pretrained {settings.model_name} ({path})")


def _model_argument(cls: type) -> Callable[[Callable], Callable]:
    """The config's flags, with `model` as the verb's positional argument instead of --model."""

    def decorate(fn: Callable) -> Callable:
        config_flags(cls)(fn)
        flags = [p for p in fn.__signature__.parameters.values() if p.name != "model"]
        help = "the model to tune: a store name, catalog name (smollm2) or Hugging Face folder"
        model = inspect.Parameter(
            "model",
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            annotation=Annotated[str, typer.Argument(help=help)],
        )
        fn.__signature__ = inspect.Signature([model, *flags])
        return fn

    return decorate


@app.command()
@_model_argument(FinetuneConfig)
def finetune(model: str, config: Path | None = None, **flags: Any) -> Path:
    """Fine-tune MODEL on chat data (full, freeze or LoRA) and add the result to the store."""
    from llmasos.train.finetune import run_finetune

    settings = load_config(FinetuneConfig, config, {**flags, "model": model})
    path = run_finetune(settings)
    typer.echo(f"fine-tuned {settings.model} into {settings.result_name} ({path})")
    return path


@app.command()
@_model_argument(DPOConfig)
def dpo(model: str, config: Path | None = None, **flags: Any) -> Path:
    """Tune MODEL to prefer the chosen over the rejected answers (DPO) and add the result to the store."""
    from llmasos.train.dpo import run_dpo

    settings = load_config(DPOConfig, config, {**flags, "model": model})
    path = run_dpo(settings)
    typer.echo(f"preference-tuned {settings.model} into {settings.result_name} ({path})")
    return path
