"""What every engine offers (`Backend`), and what kind of model a folder holds (`model_kind`): the
first half of the runtime switch, which `llmasos.runtime.open_model` completes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from llmasos.errors import UnsupportedModelError
from llmasos.outputs import RequestOutput
from llmasos.sampling_params import SamplingParams

if TYPE_CHECKING:
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


def model_kind(model_dir: Path | str) -> str:
    """What a folder holds, from config.json alone: "decoder" (the native kernel's), "seq2seq",
    "classifier" or "encoder".

    The architectures name the head; BART's config carries a default id2label, so id2label counts
    only when no architecture is named. Reading the JSON, not transformers' config, keeps routing a
    decoder free of the seconds transformers takes to import.
    """
    from llmasos.models import DRIVERS
    from llmasos.models.loader import read_hf_config

    config = read_hf_config(Path(model_dir))
    architectures = config.get("architectures") or []
    if any(arch in DRIVERS for arch in architectures):
        return "decoder"
    if any(arch.endswith("ForSequenceClassification") for arch in architectures):
        return "classifier"
    if config.get("is_encoder_decoder"):
        return "seq2seq"
    if causal := [arch for arch in architectures if arch.endswith(_CAUSAL_HEADS)]:
        raise UnsupportedModelError(
            f"{causal[0]} generates text but has no native driver (those are {', '.join(DRIVERS)}); "
            "the transformers engine runs encoder-decoder (T5, BART) and encoder (BERT, RoBERTa) models"
        )
    return "classifier" if not architectures and config.get("id2label") else "encoder"
