"""The engine for the families the native kernel does not run: encoder-decoders and encoders, on transformers.

T5 / FLAN-T5 and BART (summarization, translation) read the whole prompt once with an encoder and
generate with a decoder that attends to it; BERT and RoBERTa never generate, they label text or
turn it into vectors. The paged kernel is built around one growing causal sequence per request,
so instead of a second kernel these run on transformers' own implementations, which are the
reference for them anyway. What that costs is stated (`TransformersEngine.lacks`) and logged on
load; requests are still batched: one `model.generate` per group of requests with equal decoding
settings, padded under an attention mask.

`generate` speaks the engine's language: `SamplingParams` in, vLLM-shaped `RequestOutput` out, with
the engine's conventions for EOS (in the token ids, not in the text), stop strings (text cut at the
stop, token ids up to the one that completed it), raw-distribution logprobs and per-request seeds.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch

from llmasos.errors import InvalidRequestError, LLMasOSError, UnsupportedModelError
from llmasos.outputs import CompletionOutput, RequestOutput
from llmasos.runtime.backend import require_engine
from llmasos.runtime.embedder import Pooling
from llmasos.sampling_params import SamplingParams

log = logging.getLogger("llmasos")

_USE_INSTEAD = {
    "seq2seq": "it generates text from text: use generate() or loglikelihood()",
    "classifier": "it labels text: use classify()",
    "encoder": "it turns text into vectors: use embed()",
}
# What a seq2seq model keeps of its generation_config.json (see _load_model)
_GENERATION_TOKEN_IDS = (
    "decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id", "forced_bos_token_id",
)  # fmt: skip
# SamplingParams fields whose meaning transformers' generate cannot reproduce: (name, neutral value, why)
_UNSUPPORTED = (
    ("repetition_penalty", 1.0, "transformers penalizes only the decoder's tokens, not the prompt's"),
    ("presence_penalty", 0.0, "transformers has no OpenAI-style penalties"),
    ("frequency_penalty", 0.0, "transformers has no OpenAI-style penalties"),
    ("structured_output", None, "grammars run in the native kernel's sampler only"),
)


@dataclass
class TransformersEngine:
    """A seq2seq, classifier or encoder model folder (local or `ModelStore().resolve(name)`) on transformers:
    a `Backend` (llmasos.runtime.backend), opened by `open_model` for these kinds.

    float32 by default: these models are small, and the outputs are compared with transformers'.
    `batch_size` is how many requests (texts, pairs) go into one forward or `model.generate` call.
    """

    model_dir: Path | str
    device: str | torch.device | None = None
    dtype: torch.dtype = torch.float32
    batch_size: int = 16
    name: str | None = None  # as the model was asked for; None: the folder's name
    lacks: ClassVar[tuple[str, ...]] = ("paged KV cache", "continuous batching", "prefix caching")
    kind: str = field(init=False)
    model: torch.nn.Module = field(init=False, repr=False)
    tokenizer: object = field(init=False, repr=False)
    pooling: Pooling | None = field(init=False, repr=False)
    max_model_len: int | None = field(init=False)
    labels: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.model_dir = Path(self.model_dir)
        self.name = self.name or self.model_dir.name
        if self.batch_size < 1:
            raise LLMasOSError(f"batch_size={self.batch_size}: it must be an integer >= 1")
        self.kind = require_engine(self.model_dir, "transformers")
        self.pooling = Pooling.from_dir(self.model_dir) if self.kind == "encoder" else None  # fails fast
        self.device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = _load_tokenizer(self.model_dir)
        self.model = _load_model(self.model_dir, self.kind, self.device, self.dtype)
        # learned absolute positions (BART's) are a hard limit; T5's relative ones have none
        self.max_model_len = getattr(self.model.config, "max_position_embeddings", None)
        # a classifier's head labels, in the head's order
        config = self.model.config
        self.labels = (
            tuple(config.id2label[i] for i in range(config.num_labels)) if self.kind == "classifier" else ()
        )
        self._request_ids = itertools.count()
        log.info(
            "%s (%s) runs on the transformers engine, without %s; requests are batched per call",
            self.model_dir.name,
            self.kind,
            ", ".join(self.lacks),
        )

    @property
    def module(self) -> torch.nn.Module:
        return self.model

    # -- seq2seq ----------------------------------------------------------------------------------
    def generate(
        self,
        prompts: list[str],
        params: SamplingParams | list[SamplingParams] | None = None,
        progress: bool = False,
    ) -> list[RequestOutput]:
        """One finished `RequestOutput` per prompt, in order; every request is validated before any runs.
        (`progress` is accepted for the Backend's sake; a call runs in a few batches.)"""
        self._require("seq2seq", "generate")
        prompts = _as_list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise InvalidRequestError(f"this {self.kind} model takes text prompts, not token ids")
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise InvalidRequestError(
                f"{len(prompts)} prompts but {len(params_list)} SamplingParams: give one, or one per prompt"
            )
        prompt_ids = [self._prompt_ids(p, sp) for p, sp in zip(prompts, params_list)]
        groups: dict[tuple, list[int]] = {}
        for i, sp in enumerate(params_list):
            groups.setdefault(_decoding_key(sp, i), []).append(i)
        completions: list[list[CompletionOutput]] = [[] for _ in prompts]
        for members in groups.values():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                outputs = self._generate_batch(
                    [prompt_ids[i] for i in chunk], [params_list[i] for i in chunk]
                )
                for i, request_outputs in zip(chunk, outputs):
                    completions[i] = request_outputs
        return [
            RequestOutput(
                request_id=f"req-{next(self._request_ids)}",
                prompt=prompt,
                prompt_token_ids=ids,
                outputs=outputs,
                finished=True,
                usage=_usage(len(ids), sum(len(c.token_ids) for c in outputs)),
            )
            for prompt, ids, outputs in zip(prompts, prompt_ids, completions)
        ]

    @torch.inference_mode()
    def loglikelihood(self, pairs: list[tuple[str, str]], progress: bool = False) -> list[tuple[float, bool]]:
        """(sum of the target's token log-probs given the source, whether greedy decoding yields the target).

        Teacher forcing with `labels=`, the way the model was trained: the target is tokenized as the
        model's labels (`text_target`, so T5's </s> and BART's <s> ... </s> are part of it), and the
        model shifts it right into its decoder inputs.
        """
        self._require("seq2seq", "loglikelihood")
        results = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            sources = [self._tokenize(source, "a source") for source, _ in chunk]
            targets = self.tokenizer(text_target=[target for _, target in chunk])["input_ids"]
            for target in targets:
                self._check_fits(len(target), "a target has", "shorten it")
            input_ids, mask = self._pad(sources)
            labels, label_mask = self._pad(targets)
            labels = labels.masked_fill(~label_mask, -100)  # transformers' "ignore" label, shifted as padding
            logits = self.model(input_ids=input_ids, attention_mask=mask, labels=labels).logits.float()
            token_logprobs = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            sums = (token_logprobs * label_mask).sum(-1)
            greedy = ((logits.argmax(-1) == labels) | ~label_mask).all(-1)
            results += list(zip(sums.tolist(), greedy.tolist()))
        return results

    # -- encoders ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def classify(self, texts: list[str]) -> list[dict[str, float]]:
        """Label -> probability per text: a softmax over the labels, or independent sigmoids for a
        multi-label (or one-label) head, as transformers' text-classification pipeline does."""
        self._require("classifier", "classify")
        config = self.model.config
        independent = config.problem_type == "multi_label_classification" or config.num_labels == 1
        labels = self.labels
        results = []
        for input_ids, mask in self._text_batches(_as_list(texts)):
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits.float()
            probs = logits.sigmoid() if independent else logits.softmax(-1)
            results += [dict(zip(labels, row)) for row in probs.tolist()]
        return results

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> list[list[float]]:
        """One vector per text: the folder's sentence-transformers pooling, or by default the mean over
        the real tokens, L2-normalized (the pooling of llmasos.runtime.embedder, shared)."""
        self._require("encoder", "embed")
        vectors = []
        for input_ids, mask in self._text_batches(_as_list(texts)):
            hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()
            vectors += self.pooling(hidden, mask).cpu().tolist()
        return vectors

    # -- internals --------------------------------------------------------------------------------
    def _require(self, kind: str, call: str) -> None:
        if self.kind != kind:
            architecture = ", ".join(self.model.config.architectures or [self.model.config.model_type])
            raise InvalidRequestError(
                f"{call}() needs a {kind} model, but {self.model_dir.name} ({architecture}) is a "
                f"{self.kind} model: {_USE_INSTEAD[self.kind]}"
            )

    def _prompt_ids(self, prompt: str, params: SamplingParams) -> list[int]:
        """A generate request, validated: its prompt's token ids."""
        for name, neutral, why in _UNSUPPORTED:
            if getattr(params, name) != neutral:
                raise InvalidRequestError(
                    f"{name}={getattr(params, name)!r} is not supported for encoder-decoder models ({why}); "
                    "leave it unset"
                )
        self._check_fits(params.max_tokens, "max_tokens asks for", "lower it")
        return self._tokenize(prompt, "the prompt", params.truncate_prompt_tokens)

    def _tokenize(self, text: str, what: str, truncate: int | None = None) -> list[int]:
        """Encoder input ids, cut to the last `truncate` if asked (as the engine does), checked to fit."""
        ids = self.tokenizer(text)["input_ids"]
        if truncate is not None and len(ids) > truncate:
            log.warning("%s truncated from %d to its last %d tokens", what, len(ids), truncate)
            ids = ids[-truncate:]
        self._check_fits(len(ids), f"{what} has", "shorten it or set truncate_prompt_tokens")
        return ids

    def _check_fits(self, count: int, what: str, fix: str) -> None:
        """Only learned absolute positions (BART's max_position_embeddings) are a hard limit; T5's
        relative positions have none."""
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if positions and count > positions:
            raise InvalidRequestError(
                f"{what} {count} tokens, more than the {positions} positions of {self.model_dir.name}; {fix}"
            )

    def _text_batches(self, texts: list[str]):
        """(input_ids, mask) per batch of texts, each cut to what the model reads."""
        positions = getattr(self.model.config, "max_position_embeddings", None)
        limit = min(self.tokenizer.model_max_length, positions or self.tokenizer.model_max_length)
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            yield self._pad(self.tokenizer(chunk, truncation=True, max_length=limit)["input_ids"])

    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad with the model's pad id (RoBERTa derives positions from it); the mask is True on text."""
        pad_id = self.model.config.pad_token_id
        pad_id = self.tokenizer.pad_token_id if pad_id is None else pad_id
        input_ids = torch.full((len(rows), max(map(len, rows))), pad_id or 0, dtype=torch.long)
        mask = torch.zeros(input_ids.shape, dtype=torch.bool)
        for i, ids in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[i, : len(ids)] = True
        return input_ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def _generate_batch(
        self, prompts: list[list[int]], params: list[SamplingParams]
    ) -> list[list[CompletionOutput]]:
        """One `model.generate` for requests with equal decoding settings (see `_decoding_key`): n rows
        per request; what only shapes the outputs (n, logprobs, include_stop_str_in_output) may differ."""
        first = params[0]
        rows = [(request, i) for request, sp in enumerate(params) for i in range(sp.n)]
        input_ids, mask = self._pad([prompts[request] for request, _ in rows])
        eos_ids = [] if first.ignore_eos else _id_list(self.model.generation_config.eos_token_id)
        decode = partial(self.tokenizer.decode, skip_special_tokens=first.skip_special_tokens)
        stops = _StopStrings(decode, first.stop)
        want_logprobs = any(sp.logprobs is not None for sp in params)
        sampling = {} if first.greedy else {
            "temperature": first.temperature, "top_k": first.top_k, "top_p": first.top_p,
            "min_p": first.min_p or None,
        }  # fmt: skip
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if first.seed is not None:
                torch.manual_seed(first.seed)
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=first.max_tokens,
                do_sample=not first.greedy,
                eos_token_id=(eos_ids + first.stop_token_ids) or None,
                stopping_criteria=[stops] if first.stop else None,
                return_dict_in_generate=True,
                output_logits=want_logprobs,
                **sampling,
            )
        logprobs = torch.stack(out.logits, 1).float().log_softmax(-1) if want_logprobs else None
        outputs: list[list[CompletionOutput]] = [[] for _ in prompts]
        for row, ((request, index), ids) in enumerate(zip(rows, out.sequences[:, 1:].tolist())):
            sp = params[request]  # the decoder start token is not part of the output
            completion = _completion(ids, index, sp, eos_ids, stops.ends.get(row), decode)
            if sp.logprobs is not None:
                ids = completion.token_ids
                completion.logprobs = _top_logprobs(logprobs[row, : len(ids)], ids, sp.logprobs)
                completion.cumulative_logprob = sum(lp[t] for lp, t in zip(completion.logprobs, ids))
            outputs[request].append(completion)
        return outputs


class _StopStrings:
    """transformers stopping criterion: a row is done once its text contains a stop string.

    It decodes, as the engine does, rather than matching token strings (transformers'
    StopStringCriteria), so the row ends at exactly the token where its text shows the stop;
    `ends` records that: row -> (number of output tokens, the stop string).
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str]):
        self.decode = decode
        self.stops = stops
        self.ends: dict[int, tuple[int, str]] = {}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        for row, ids in enumerate(input_ids[:, 1:].tolist()):
            if row not in self.ends:
                text = self.decode(ids)
                if stop := next((s for s in self.stops if s in text), None):
                    self.ends[row] = (len(ids), stop)
        return torch.tensor([row in self.ends for row in range(len(input_ids))], device=input_ids.device)


def _completion(
    ids: list[int],
    index: int,
    params: SamplingParams,
    eos_ids: list[int],
    stop_string_end: tuple[int, str] | None,
    decode: Callable[[list[int]], str],
) -> CompletionOutput:
    """Where a generated row really ends (transformers pads rows that finished early) and why.

    The engine's rules: EOS is in the token ids but not the text; a stop token's text only with
    include_stop_str_in_output; a stop string that shows before the stopping token wins, and cuts the
    text there.
    """
    at = next((i for i, t in enumerate(ids) if t in eos_ids or t in params.stop_token_ids), None)
    if stop_string_end is not None and stop_string_end[0] < (len(ids) + 1 if at is None else at + 1):
        end, stop = stop_string_end
        text = decode(ids[:end])
        text = text[: text.find(stop) + len(stop) * params.include_stop_str_in_output]
        return CompletionOutput(index, text, ids[:end], "stop", stop)
    if at is None:
        return CompletionOutput(index, decode(ids), ids, "length")
    stop_token = ids[at] if ids[at] in params.stop_token_ids else None
    keep = stop_token is not None and params.include_stop_str_in_output
    return CompletionOutput(index, decode(ids[: at + keep]), ids[: at + 1], "stop", stop_token)


def _decoding_key(params: SamplingParams, index: int) -> tuple:
    """What one `model.generate` call must share. A seeded sampled request runs alone, so its output
    does not depend on what else is in the batch (one random stream per call)."""
    sampling = None if params.greedy else (params.temperature, params.top_k, params.top_p, params.min_p)
    seeded = index if params.seed is not None and not params.greedy else None
    return (
        params.max_tokens, sampling, seeded, tuple(params.stop), tuple(params.stop_token_ids),
        params.ignore_eos, params.skip_special_tokens,
    )  # fmt: skip


def _top_logprobs(logprobs: torch.Tensor, ids: list[int], k: int) -> list[dict[int, float]]:
    """Per token: the chosen token's logprob and the top-k alternatives', under the raw distribution."""
    values, indices = logprobs.topk(k, dim=-1)
    return [
        {token: logprobs[i, token].item(), **dict(zip(indices[i].tolist(), values[i].tolist()))}
        for i, token in enumerate(ids)
    ]


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _id_list(value: int | list[int] | None) -> list[int]:
    return [value] if isinstance(value, int) else list(value or [])


def _as_list(texts: str | Sequence[str]) -> list[str]:
    """A lone string is one text, not a list of characters."""
    return [texts] if isinstance(texts, str) else list(texts)


def _load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UnsupportedModelError(
            f"{model_dir} has no tokenizer transformers can load ({e}); re-save the model with its "
            "tokenizer using save_pretrained"
        ) from e


def _load_model(model_dir: Path, kind: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The folder's model with every weight from the checkpoint: a missing one (a classification head
    asked of a plain encoder, say) is an error, never a silently random weight.

    A seq2seq model keeps only the token ids of its generation_config.json: its sampling defaults
    (beam search, min_length, forced EOS at max length) would override what SamplingParams asks.
    """
    import transformers
    from transformers import GenerationConfig

    auto = {
        "seq2seq": transformers.AutoModelForSeq2SeqLM,
        "classifier": transformers.AutoModelForSequenceClassification,
        "encoder": transformers.AutoModel,
    }[kind]
    try:
        model, info = auto.from_pretrained(
            model_dir, dtype=dtype, local_files_only=True, output_loading_info=True
        )
    except (OSError, ValueError, KeyError) as e:
        raise UnsupportedModelError(f"transformers cannot load {model_dir} as a {kind} model: {e}") from e
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise UnsupportedModelError(
            f"{model_dir} lacks {len(missing)} weights that {type(model).__name__} needs, "
            f"e.g. {missing[:3]}; it is not a complete checkpoint of this kind"
        )
    if kind == "seq2seq":
        kept = {name: getattr(model.generation_config, name) for name in _GENERATION_TOKEN_IDS}
        model.generation_config = GenerationConfig(**kept)
    return model.to(device).eval()
