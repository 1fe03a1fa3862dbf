"""What the model saw and why it answered: per-token log-probabilities, surprisal, the top
alternatives at each step, and input attributions for one chosen output token.

The numbers of the trace come from the kernel (`llm.generate` with `logprobs` and `prompt_logprobs`),
so they are exactly what generation computes. Attributions need gradients, which the inference
kernel never computes, so the same model folder is loaded once more with transformers (float32,
eval) for that one pass and freed afterwards: float32 weights next to the kernel's would double the
memory if they were kept. The tests check that both give the target token the same log-probability.

Attributions are over the input embeddings, of f = log p(target token | context) in nats: a
log-probability rather than a logit, because it is what the trace shows and it weighs the target
against its alternatives. Integrated gradients come from captum's `IntegratedGradients` with its
Gauss-Legendre rule: n nodes integrate polynomials of degree 2n-1 exactly, so the completeness gap
(sum of attributions minus f(input) - f(baseline)) shrinks far faster with steps than a Riemann sum.
Gradient x input is grad f(input) . (input - baseline): the classic form for the zero baseline, and a
one-step integral in general, so its completeness gap shows how far f is from linear.

The default baseline is the pad token at every position. The zero embedding is the textbook
baseline, but a model that RMS-normalizes its input embeddings (Llama, Mistral, Qwen) is blind to
their scale everywhere except at zero, so f jumps at the baseline end of the path and no number of
steps closes the gap; with GPT-2 (position embeddings are added first) zeros work as well.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from llmasos.errors import InvalidRequestError, UnsupportedModelError
from llmasos.sampling_params import SamplingParams

if TYPE_CHECKING:  # a decoder's Backend (llmasos.runtime), or an LLM, which offers the same calls
    from llmasos.runtime import Backend

METHODS = ("integrated_gradients", "gradient_x_input")
BASELINES = ("zeros", "pad")
MAX_TOP_K = 20  # the kernel's limit for logprobs and prompt_logprobs
_PATHS_PER_PASS = 8  # integrated-gradient paths in one forward: bounds activation memory, whatever the steps


@dataclass
class Alternative:
    token_id: int
    text: str
    prob: float  # probability, in [0, 1]


@dataclass
class TokenStat:
    """One token of the trace. `logprob` is a natural log (nats); surprisal is given in bits."""

    token_id: int
    text: str
    logprob: float | None  # log p(token | tokens before it); None for the first prompt token
    surprisal_bits: float | None  # -log2 p(token | tokens before it)
    alternatives: list[Alternative]  # the most likely tokens at this position, most likely first


@dataclass
class Attribution:
    """How much each context token moved f = log p(target token | context), in nats.

    `scores` follow the context: the prompt tokens, then the output tokens before the target.
    """

    method: str
    baseline: str
    steps: int  # integration nodes; 1 for gradient_x_input
    target: int  # index into the output tokens
    token_id: int
    scores: list[float]
    logprob: float  # f(input), from the gradient pass
    baseline_logprob: float  # f(baseline)
    completeness_gap: float  # sum(scores) - (logprob - baseline_logprob); 0 for exact integrated gradients


@dataclass
class Explanation:
    model: str
    prompt: str  # the text the model read (chat template applied)
    prompt_tokens: list[TokenStat]
    output_tokens: list[TokenStat]
    attribution: Attribution

    @property
    def context_tokens(self) -> list[TokenStat]:
        """The tokens `attribution.scores` refer to."""
        return self.prompt_tokens + self.output_tokens[: self.attribution.target]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)


def explain(
    llm: Backend,
    prompt: str | list[dict],
    max_tokens: int = 16,
    top_k: int = 5,
    target: int | None = None,
    method: str = "integrated_gradients",
    steps: int = 32,
    baseline: str = "pad",
) -> Explanation:
    """Generate greedily (so the explanation is reproducible) and trace the prompt and the output.

    `prompt` is text or chat messages; `target` is the index of the output token to attribute
    (default: the first); `steps` is the number of integration nodes of integrated gradients.
    """
    _check_options(max_tokens, top_k, target, method, steps, baseline)
    text = _prompt_text(llm, prompt)
    prompt_ids = llm.tokenizer.encode(text)
    if not prompt_ids:
        raise InvalidRequestError("the prompt has no tokens: give a non-empty prompt")
    params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=top_k, prompt_logprobs=top_k)
    out = llm.generate([prompt_ids], params)[0]
    completion = out.outputs[0]
    target = 0 if target is None else target
    if target >= len(completion.token_ids):
        raise InvalidRequestError(
            f"target={target} is past the output, which has {len(completion.token_ids)} tokens: "
            f"choose a target in [0, {len(completion.token_ids) - 1}]"
        )
    context = prompt_ids + completion.token_ids[:target]
    return Explanation(
        model=llm.name,
        prompt=text,
        prompt_tokens=_token_stats(llm, prompt_ids, out.prompt_logprobs, top_k),
        output_tokens=_token_stats(llm, completion.token_ids, completion.logprobs, top_k),
        attribution=_attribute(llm, context, completion.token_ids[target], target, method, steps, baseline),
    )


def _check_options(
    max_tokens: int, top_k: int, target: int | None, method: str, steps: int, baseline: str
) -> None:
    if method not in METHODS:
        raise InvalidRequestError(f"unknown attribution method {method!r}: use one of {', '.join(METHODS)}")
    if baseline not in BASELINES:
        raise InvalidRequestError(f"unknown baseline {baseline!r}: use one of {', '.join(BASELINES)}")
    if not 0 <= top_k <= MAX_TOP_K:
        raise InvalidRequestError(f"top_k={top_k} is out of range: give an integer in [0, {MAX_TOP_K}]")
    if steps < 1:
        raise InvalidRequestError(f"steps={steps}: integrated gradients need at least 1 step (32 is usual)")
    if target is not None and not 0 <= target < max_tokens:
        raise InvalidRequestError(
            f"target={target} is out of range: it indexes the output tokens, so give one in "
            f"[0, {max_tokens - 1}] (or raise max_tokens)"
        )


def _prompt_text(llm: Backend, prompt: str | list[dict]) -> str:
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("the prompt is empty: give some text or chat messages")
        return prompt
    if not prompt or not all(isinstance(m, dict) for m in prompt):
        raise InvalidRequestError(
            "the prompt must be text or a non-empty list of chat messages ({'role': ..., 'content': ...})"
        )
    return llm.tokenizer.apply_chat_template(prompt)


def _token_stats(
    llm: Backend, token_ids: list[int], logprobs: list[dict[int, float] | None], top_k: int
) -> list[TokenStat]:
    """Each token with its kernel log-probability and the top_k most likely tokens at its position."""

    def text(token_id: int) -> str:
        return llm.tokenizer.decode([token_id], skip_special_tokens=False)

    stats = []
    for token_id, entry in zip(token_ids, logprobs, strict=True):
        ranked = sorted((entry or {}).items(), key=lambda item: -item[1])[:top_k]
        logprob = None if entry is None else entry[token_id]
        stats.append(
            TokenStat(
                token_id=token_id,
                text=text(token_id),
                logprob=logprob,
                surprisal_bits=None if logprob is None else -logprob / math.log(2),
                alternatives=[Alternative(t, text(t), math.exp(lp)) for t, lp in ranked],
            )
        )
    return stats


def _attribute(
    llm: Backend, context: list[int], token_id: int, target: int, method: str, steps: int, baseline: str
) -> Attribution:
    """Attributions of log p(token_id | context) to each context token, from a float32 gradient pass."""
    model = _gradient_model(llm)
    ids = torch.tensor([context], device=model.device)
    embeddings = model.get_input_embeddings()
    inputs = embeddings(ids).detach()
    reference = (
        torch.zeros_like(inputs)
        if baseline == "zeros"
        else embeddings(torch.full_like(ids, _pad_token_id(llm))).detach()
    )

    def f(embeds: torch.Tensor) -> torch.Tensor:
        """Per path in the batch: log p(token_id | context) with these input embeddings."""
        logits = model(inputs_embeds=embeds).logits[:, -1].float()
        return logits.log_softmax(-1)[:, token_id]

    if method == "integrated_gradients":
        from captum.attr import IntegratedGradients

        per_dim = IntegratedGradients(f).attribute(
            inputs, reference, n_steps=steps, internal_batch_size=_PATHS_PER_PASS
        )
    else:
        point = inputs.clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(f(point).sum(), point)
        per_dim, steps = gradient * (inputs - reference), 1
    with torch.no_grad():
        value, baseline_value = f(torch.cat([inputs, reference])).tolist()
    scores = per_dim.sum(-1)[0]
    return Attribution(
        method=method,
        baseline=baseline,
        steps=steps,
        target=target,
        token_id=token_id,
        scores=scores.tolist(),
        logprob=value,
        baseline_logprob=baseline_value,
        completeness_gap=scores.sum().item() - (value - baseline_value),
    )


def _gradient_model(llm: Backend):
    """The kernel's model folder in transformers, float32 and eval, on the kernel's device."""
    from llmasos.models.loader import transformers_causal_lm

    folder = llm.model_dir
    try:
        model, info = transformers_causal_lm(folder, torch.float32, output_loading_info=True)
    except (OSError, ValueError, KeyError) as error:
        raise UnsupportedModelError(
            f"attributions need the model in transformers as a causal LM, which cannot load {folder}: "
            f"{error}. Explain a decoder-only model imported from a Hugging Face folder or a GGUF file"
        ) from error
    if info["missing_keys"]:  # transformers would fill them with random values: another model
        missing = sorted(info["missing_keys"])
        raise UnsupportedModelError(
            f"{folder} lacks {len(missing)} weights that {type(model).__name__} needs, e.g. {missing[:3]}; "
            "it is not a complete checkpoint, so attributions would describe another model"
        )
    return model.to(llm.device).eval().requires_grad_(False)


def _pad_token_id(llm: Backend) -> int:
    """The tokenizer's pad token, else its end-of-sequence token (as transformers pads by default)."""
    pad = llm.tokenizer.special_tokens.get("pad_token")
    ids = llm.tokenizer.encode(pad, add_special_tokens=False) if pad else []
    if len(ids) == 1:
        return ids[0]
    if llm.tokenizer.eos_token_ids:
        return llm.tokenizer.eos_token_ids[0]
    raise InvalidRequestError("this model has neither a pad nor an end token: use baseline='zeros'")
