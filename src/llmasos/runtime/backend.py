"""What every engine offers (`Backend`), and how a model folder runs (`route`): the first half of the
runtime switch, which `llmasos.runtime.open_model` completes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from llmasos.errors import UnsupportedModelError
from llmasos.outputs import RequestOutput
from llmasos.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

    from llmasos.tokenizer import Tokenizer

KINDS = ("decoder", "seq2seq", "classifier", "encoder")
# Decoder-only heads: a checkpoint with one of these and no native driver is not ours to run.
_CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


@runtime_checkable
class Backend(Protocol):
    """A loaded model, whichever engine runs it: what `LLM`, the server and the apps (tasks, explain,
    eval, the safety judge) use. A call the model's kind cannot serve raises `InvalidRequestError`
    naming the call that fits (a decoder does not `classify` with a head, an encoder does not
    `generate`).

    `max_model_len` is the most tokens a request (prompt and output) may have, or None where the model
    has no hard limit (T5's relative positions).
    """

    name: str  # as it was asked for: a store name or a folder
    model_dir: Path
    kind: str  # one of KINDS
    tokenizer: Tokenizer | object  # llmasos's Tokenizer, or transformers' for the transformers engine
    max_model_len: int | None
    device: torch.device
    dtype: torch.dtype
    batch_size: int  # the most requests one step (the kernel) or one forward (the other engines) takes
    labels: tuple[str, ...]  # a classifier's head labels, in the head's order; () for the other kinds

    @property
    def module(self) -> torch.nn.Module:
        """The network that runs (explain puts its gradient copy on its device; eval reads its weight
        formats)."""
        ...

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        progress: bool = False,
    ) -> list[RequestOutput]:
        """One finished RequestOutput per prompt, in order (seq2seq and decoders)."""
        ...

    def embed(self, inputs: list[str] | list[list[int]]) -> list[list[float]]:
        """One vector per input (encoders; a decoder's last token's final hidden state)."""
        ...

    def classify(self, texts: list[str]) -> list[dict[str, float]]:
        """Label -> probability per text, from the model's own head (classifiers)."""
        ...

    def loglikelihood(self, pairs: list[tuple[str, str]], progress: bool = False) -> list[tuple[float, bool]]:
        """Per (context, continuation): log p(continuation | context) and whether greedy decoding gives
        it (decoders and seq2seq)."""
        ...


@dataclass(frozen=True)
class Route:
    """How a model folder runs: its kind (one of KINDS) and the engine that runs it ("paged": the
    kernel; "embedder": SentenceEmbedder; "transformers": TransformersEngine)."""

    kind: str
    engine: str


def route(model_dir: Path | str) -> Route:
    """The one decision of how a model runs, from config.json alone (reading the JSON, not transformers'
    config, keeps routing a decoder free of the seconds transformers takes to import).

    A decoder with a native driver runs on the kernel; an encoder with a native driver (BERT) embeds
    with SentenceEmbedder; seq2seq, classifiers and the other encoders run on transformers. The
    architectures name the head; BART's config carries a default id2label, so id2label counts only
    when no architecture is named.
    """
    from llmasos.models import DRIVERS, ENCODERS
    from llmasos.models.loader import read_hf_config

    config = read_hf_config(Path(model_dir))
    architectures = config.get("architectures") or []
    if any(arch in DRIVERS for arch in architectures):
        return Route("decoder", "paged")
    if any(arch.endswith("ForSequenceClassification") for arch in architectures):
        return Route("classifier", "transformers")
    if config.get("is_encoder_decoder"):
        return Route("seq2seq", "transformers")
    if causal := [arch for arch in architectures if arch.endswith(_CAUSAL_HEADS)]:
        raise UnsupportedModelError(
            f"{causal[0]} generates text but has no native driver (those are {', '.join(DRIVERS)}); "
            "the transformers engine runs encoder-decoder (T5, BART) and encoder (BERT, RoBERTa) models"
        )
    if not architectures and config.get("id2label"):
        return Route("classifier", "transformers")
    if any(arch in ENCODERS for arch in architectures):
        return Route("encoder", "embedder")
    return Route("encoder", "transformers")


def model_kind(model_dir: Path | str) -> str:
    """What a folder holds: "decoder", "seq2seq", "classifier" or "encoder" (see `route`)."""
    return route(model_dir).kind


def require_engine(model_dir: Path, engine: str) -> str:
    """The folder's kind, once `route` agrees that `engine` runs it; else UnsupportedModelError naming the
    engine that does (for code that builds an engine directly instead of through open_model)."""
    found = route(model_dir)
    if found.engine != engine:
        raise UnsupportedModelError(
            f"{model_dir.name} is a {found.kind} model that runs on the {found.engine} engine, not on "
            f"the {engine} one; open it with llmasos.LLM or llmasos.runtime.open_model"
        )
    return found.kind
