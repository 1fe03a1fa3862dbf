"""Sentence embeddings: one vector per text, for `LLM(...).embed` and POST /v1/embeddings.

A sentence-transformers folder is a Hugging Face encoder plus a recipe in small JSON files:
modules.json lists the pipeline (Transformer -> Pooling -> Normalize), 1_Pooling/config.json says
how the token vectors become one (the mean over the real tokens, the [CLS] vector, ...), and
sentence_bert_config.json how many tokens the model was trained on. We follow that recipe on our
own encoder driver (models/bert.py), so serving imports neither sentence-transformers nor
transformers. A folder without the recipe gets mean pooling and L2 normalization, the usual choice.
This is the one embedding path of the encoders that have a native driver (see `open_model`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as Backend
from torch import nn

from llmasos.errors import InvalidRequestError, UnsupportedModelError
from llmasos.models.loader import load_model, read_hf_config
from llmasos.outputs import RequestOutput
from llmasos.runtime.backend import require_engine
from llmasos.sampling_params import SamplingParams
from llmasos.tokenizer import Tokenizer

# sentence-transformers' pooling modes and their keys in 1_Pooling/config.json, in the order it
# concatenates them when several are on
POOLING_MODES = {
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}


def _read_json(path: Path) -> dict | list | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


@dataclass
class Pooling:
    """How a text's token vectors become its one vector: sentence-transformers' Pooling and Normalize."""

    modes: tuple[str, ...] = ("mean",)
    normalize: bool = True

    @classmethod
    def from_dir(cls, model_dir: Path) -> Pooling:
        """The folder's recipe from modules.json; any module we do not run is an error, never skipped,
        since skipping it (a Dense projection, say) would give plausible but wrong vectors."""
        modules = _read_json(model_dir / "modules.json")
        if modules is None:
            return cls()
        modes, normalize = (), False
        for module in modules:
            kind = module.get("type", "").rsplit(".", 1)[-1]
            if kind == "Pooling":
                config = _read_json(model_dir / module.get("path", "") / "config.json") or {}
                modes = tuple(mode for mode, key in POOLING_MODES.items() if config.get(key))
            elif kind == "Normalize":
                normalize = True
            elif kind != "Transformer":
                raise UnsupportedModelError(
                    f"{model_dir} is a sentence-transformers model with a {module.get('type')!r} module; "
                    "LLMasOS runs only Transformer, Pooling and Normalize modules"
                )
        if not modes:
            raise UnsupportedModelError(
                f"{model_dir / 'modules.json'} has no Pooling module with a pooling mode turned on, so "
                "there is no way to make one vector per text; add its 1_Pooling/config.json"
            )
        return cls(modes, normalize)

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states [B, S, H] and mask [B, S] (True on real tokens) -> [B, H * len(modes)]."""
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        lengths = weights.sum(1)
        parts = []
        for mode in self.modes:
            if mode == "cls":
                parts.append(hidden[:, 0])
            elif mode == "max":
                parts.append(hidden.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1))
            elif mode == "mean":
                parts.append((hidden * weights).sum(1) / lengths)
            elif mode == "mean_sqrt_len":
                parts.append((hidden * weights).sum(1) / lengths.sqrt())
            elif mode == "weightedmean":  # token i weighs i + 1: later tokens have seen more context
                positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device)
                weighted = weights * positions[:, None]
                parts.append((hidden * weighted).sum(1) / weighted.sum(1))
            else:  # lasttoken: the only one that has seen the whole text in a causal model
                parts.append(hidden[torch.arange(hidden.shape[0]), mask.sum(1) - 1])
        vectors = torch.cat(parts, dim=-1)
        return F.normalize(vectors, dim=-1) if self.normalize else vectors


@dataclass
class EmbeddingResult:
    vectors: list[list[float]]  # one per input, in order
    prompt_tokens: int  # tokens the model read, special tokens included, after truncation


class SentenceEmbedder:
    """An encoder, its tokenizer and its pooling: texts or token ids in, one vector each out. A `Backend`
    (llmasos.runtime.backend) of kind "encoder", opened by `open_model` for the native encoders."""

    kind = "encoder"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        pooling: Pooling,
        max_length: int,
        lowercase: bool = False,
        batch_size: int = 32,
        model_dir: Path | None = None,
        name: str | None = None,
    ):
        self.model_dir = model_dir
        self.name = name or (model_dir.name if model_dir else "encoder")
        self.max_model_len = max_length
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = max_length
        self.lowercase = lowercase
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.labels: tuple[str, ...] = ()
        self.dimension: int = model.config.hidden_size * len(pooling.modes)

    @property
    def module(self) -> nn.Module:
        return self.model

    @classmethod
    def from_dir(
        cls,
        model_dir: Path | str,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        name: str | None = None,
    ) -> SentenceEmbedder:
        """Load a model folder: a store path (`ModelStore().resolve(name)`) or a local folder.

        float32 by default, on GPU too: encoders are small, and embeddings are compared by cosine,
        where bfloat16's three significant digits would show.
        """
        model_dir = Path(model_dir)
        require_engine(model_dir, "embedder")
        hf_config = read_hf_config(model_dir)
        pooling = Pooling.from_dir(model_dir)  # before the weights: a bad recipe fails fast
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = load_model(model_dir, device, dtype, encoder=True)
        st_config = _read_json(model_dir / "sentence_bert_config.json") or {}
        max_length = model.config.max_position_embeddings
        if st_config.get("max_seq_length"):
            max_length = min(max_length, st_config["max_seq_length"])
        tokenizer = _load_tokenizer(model_dir, hf_config, max_length)
        lowercase = bool(st_config.get("do_lower_case"))
        return cls(model, tokenizer, pooling, max_length, lowercase, model_dir=model_dir, name=name)

    def embed(self, inputs: Sequence[str | list[int]]) -> list[list[float]]:
        """One vector per input, in order (see `embed_with_usage`)."""
        return self.embed_with_usage(inputs).vectors

    def embed_with_usage(self, inputs: Sequence[str | list[int]]) -> EmbeddingResult:
        """One vector per input, in order, and the tokens read (the usage the server reports).

        A text longer than the model's max length is cut, keeping [CLS]/[SEP], as sentence-transformers
        does. Token ids are the caller's own tokenization, special tokens included, and must fit.
        """
        ids = [self._token_ids(item) for item in inputs]
        vectors: list[list[float]] = [[] for _ in ids]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # like lengths share a batch: less padding
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            for i, vector in zip(batch, self._embed_batch([ids[i] for i in batch])):
                vectors[i] = vector
        return EmbeddingResult(vectors, sum(map(len, ids)))

    def generate(
        self, prompts, params: SamplingParams | None = None, progress: bool = False
    ) -> list[RequestOutput]:
        raise self._wrong_call("generate")

    def classify(self, texts: list[str]) -> list[dict[str, float]]:
        raise self._wrong_call("classify")

    def loglikelihood(self, pairs, progress: bool = False) -> list[tuple[float, bool]]:
        raise self._wrong_call("loglikelihood")

    def _wrong_call(self, call: str) -> InvalidRequestError:
        return InvalidRequestError(
            f"{call}() needs a model that generates or labels text, but {self.name} is an embedding "
            "model (encoder): it turns text into vectors, use embed()"
        )

    def _token_ids(self, item: str | list[int]) -> list[int]:
        if isinstance(item, str):
            return self.tokenizer.encode(item.lower() if self.lowercase else item)
        vocab_size = self.model.config.vocab_size
        if not item:
            raise InvalidRequestError("an input is an empty list of token ids; give at least one token")
        if len(item) > self.max_length:
            raise InvalidRequestError(
                f"an input has {len(item)} tokens, more than this model's {self.max_length}; send fewer "
                "tokens, or send text, which is truncated to fit"
            )
        if bad := [t for t in item if not 0 <= t < vocab_size]:
            raise InvalidRequestError(
                f"token id {bad[0]} is outside this model's vocabulary 0..{vocab_size - 1}"
            )
        return list(item)

    @torch.inference_mode()
    def _embed_batch(self, batch: list[list[int]]) -> list[list[float]]:
        """Right-pad to the longest; the mask keeps padding out of attention and pooling alike."""
        input_ids = torch.zeros(len(batch), max(map(len, batch)), dtype=torch.long)
        mask = torch.zeros(input_ids.shape, dtype=torch.bool)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = True
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids, mask).float()
        return self.pooling(hidden, mask).cpu().tolist()


def _load_tokenizer(model_dir: Path, hf_config: dict, max_length: int) -> Tokenizer:
    """Our Tokenizer over a backend set up the way sentence-transformers calls it.

    The `tokenizers` library truncates the text and then lets the post-processor add [CLS]/[SEP], so
    a long text keeps them. Padding is off: some tokenizer.json files (all-MiniLM-L6-v2's) pad every
    text to 128 tokens, which transformers ignores and which would count as text in mean pooling;
    batches here are padded under a mask instead.
    """
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise UnsupportedModelError(
            f"{model_dir} has no tokenizer.json; re-save the model with transformers' save_pretrained"
        )
    backend = Backend.from_file(str(path))
    backend.no_padding()
    backend.enable_truncation(max_length)
    return Tokenizer(backend, _read_json(model_dir / "tokenizer_config.json") or {}, {}, hf_config)
