"""`llmasos eval`: one model on one task, scored batched through the engine, into an `EvalReport`.

A task is a JSONL file (multiple choice, generation or classification; see taskfile.py) or
"perplexity" of a plain text file. Prompts come from a template with the example's fields, as
`str.format` placeholders, so a user can change the wording without code. Multiple choice and
classification compare log-likelihoods of the choices (never parse free text); generation is greedy.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from llmasos.errors import InvalidRequestError, LLMasOSError
from llmasos.eval import datatask, metrics
from llmasos.eval.bias import evaluate_bias, load_probes
from llmasos.eval.config import EvalConfig
from llmasos.eval.perplexity import perplexity
from llmasos.eval.report import EvalReport, EvalSignature
from llmasos.eval.taskfile import (
    ClassificationExample,
    Example,
    GenerationExample,
    MultipleChoiceExample,
    TaskFile,
    file_digest,
    load_task,
)
from llmasos.runtime.scoring import loglikelihood
from llmasos.sampling_params import SamplingParams
from llmasos.templates import placeholders

if TYPE_CHECKING:  # a Backend (llmasos.runtime), or an LLM, which offers the same calls
    from llmasos.runtime import Backend

# the prompt of each kind; its answer follows after one space, as in lm-evaluation-harness
DEFAULT_TEMPLATES = {
    "multiple_choice": "{context}",
    "generation": "{prompt}",
    "classification": "{text}\nLabel:",
}
_FIELDS = {"multiple_choice": "context", "generation": "prompt", "classification": "text"}
SHOT_SEPARATOR = "\n\n"


def check_config(config: EvalConfig) -> None:
    """Everything about the task that can be wrong without a model: checked before one loads."""
    config = datatask.resolve(config)[0]
    if config.task == "perplexity":
        _read_text(config.data)
    elif config.task == "bias":
        load_probes(config.data)
    else:
        task = load_task(config.task, config.kind)
        check_template(config.template or DEFAULT_TEMPLATES[task.kind], task.kind)


def evaluate(llm: Backend, model: str, config: EvalConfig) -> EvalReport:
    config, task_name = datatask.resolve(config)  # a store dataset: its task file or its text
    if config.task == "perplexity":
        return _perplexity(llm, model, config, task_name or "perplexity")
    if config.task == "bias":
        scores = evaluate_bias(llm, config)
        signature = _signature(llm, model, "bias", scores.digest, "", config)
        return EvalReport(
            "bias", "bias", scores.metrics, scores.stderr, scores.num_examples, signature, scores.extra
        )
    task = load_task(config.task, config.kind)
    template = config.template or DEFAULT_TEMPLATES[task.kind]
    check_template(template, task.kind)
    examples = task.examples[: config.limit] if config.limit else task.examples
    prompts = [_prompt(llm, task, i, template, config) for i in range(len(examples))]
    run = {"multiple_choice": _multiple_choice, "generation": _generation, "classification": _classification}
    scores, extra = run[task.kind](llm, examples, prompts, task, config)
    report_metrics = {name: result.score for name, result in scores.items()}
    stderr = {name: result.stderr for name, result in scores.items()}
    task_name = task_name or Path(config.task).stem
    signature = _signature(llm, model, task_name, task.digest, template, config)
    return EvalReport(task_name, task.kind, report_metrics, stderr, len(examples), signature, extra)


def check_template(template: str, kind: str) -> None:
    """A template names only its kind's field, and names it at least once."""
    field = _FIELDS[kind]
    names = placeholders(template, "the prompt template")
    if names != {field}:
        raise InvalidRequestError(
            f"a {kind} prompt template must use the placeholder {{{field}}} and no other; "
            f"{template!r} uses {sorted(names) or 'none'} (write literal braces as {{{{ and }}}})"
        )


def _fill(template: str, example: Example) -> str:
    field = {MultipleChoiceExample: "context", GenerationExample: "prompt", ClassificationExample: "text"}
    return template.format(**{field[type(example)]: getattr(example, field[type(example)])})


def _answer(example: Example) -> str:
    if isinstance(example, MultipleChoiceExample):
        return example.choices[example.answer]
    if isinstance(example, GenerationExample):
        return example.references[0]
    return example.label


def _prompt(llm: Backend, task: TaskFile, index: int, template: str, config: EvalConfig) -> str:
    shots = [
        f"{_fill(template, shot)} {_answer(shot)}" for shot in task.few_shot(index, config.shots, config.seed)
    ]
    prompt = SHOT_SEPARATOR.join([*shots, _fill(template, task.examples[index])])
    if config.chat:
        return llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    return prompt


def _delimiter(config: EvalConfig) -> str:
    """Between a prompt and its answer: a space, or nothing after a chat template's assistant turn
    (lm-evaluation-harness's target_delimiter under --apply_chat_template)."""
    return "" if config.chat else " "


def _multiple_choice(llm, examples, prompts, task, config):
    delimiter = _delimiter(config)
    pairs = [(prompt, delimiter + choice) for prompt, ex in zip(prompts, examples) for choice in ex.choices]
    scores = [lp for lp, _ in loglikelihood(llm, pairs, progress=config.progress)]
    per_example, at = [], 0
    for ex in examples:
        per_example.append(scores[at : at + len(ex.choices)])
        at += len(ex.choices)
    return metrics.multiple_choice_metrics(per_example, [ex.choices for ex in examples],
                                           [ex.answer for ex in examples]), {}  # fmt: skip


def _generation(llm, examples, prompts, task, config):
    stop = None if config.chat else [SHOT_SEPARATOR]  # a chat model ends its turn; a base model runs on
    params = SamplingParams(temperature=0, max_tokens=config.max_tokens, stop=stop)
    if llm.kind == "decoder" and not config.chat:  # tokenized as the scored tasks are: no BOS added
        prompts = [llm.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    outputs = llm.generate(prompts, params, progress=config.progress)
    predictions = [out.outputs[0].text.strip() for out in outputs]
    references = [list(ex.references) for ex in examples]
    scores = {"bleu": metrics.bleu(predictions, references)}
    scores |= {
        name: metrics.MetricResult(value) for name, value in metrics.rouge(predictions, references).items()
    }
    scores |= {"exact_match": metrics.exact_match(predictions, references),
               "f1": metrics.token_f1(predictions, references)}  # fmt: skip
    extra = {"bleu_signature": scores["bleu"].signature, "predictions": predictions}
    return scores, extra


def _classification(llm, examples, prompts, task, config):
    labels = list(task.labels)
    pairs = [(prompt, _delimiter(config) + label) for prompt in prompts for label in labels]
    scores = [lp for lp, _ in loglikelihood(llm, pairs, progress=config.progress)]
    predictions = []
    for i in range(len(examples)):
        row = scores[i * len(labels) : (i + 1) * len(labels)]
        predictions.append(labels[row.index(max(row))])
    result = metrics.classification_metrics(predictions, [ex.label for ex in examples], labels)
    extra = {"confusion_matrix": {"labels": result.labels, "matrix": result.confusion}}
    return {"accuracy": result.accuracy, "macro_f1": metrics.MetricResult(result.macro_f1)}, extra


def _read_text(data: Path | None) -> str:
    if data is None:
        raise InvalidRequestError("the perplexity task needs a text file: give --data FILE")
    path = Path(data)
    if not path.is_file():
        raise InvalidRequestError(f"{path} is not a file; give --data a plain text file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise InvalidRequestError(f"{path} is empty; perplexity needs some text")
    return text


def _perplexity(llm: Backend, model: str, config: EvalConfig, name: str) -> EvalReport:
    path = Path(config.data or "")
    text = _read_text(config.data)
    result = perplexity(llm, text, config.context, config.stride, config.progress)
    signature = _signature(llm, model, name, file_digest(path), "", config)
    return EvalReport(
        name,
        "perplexity",
        {"perplexity": result.perplexity, "mean_nll": result.mean_nll},
        {"perplexity": None, "mean_nll": None},
        result.num_tokens,
        signature,
        {
            "num_tokens": result.num_tokens,
            "context": result.context,
            "stride": result.stride,
            "data": str(path),
        },
    )


def _signature(llm: Backend, model: str, task: str, task_digest: str, template: str, config: EvalConfig):
    return EvalSignature(
        model=model,
        model_digest=model_digest(llm),
        task=task,
        task_digest=task_digest,
        prompt_template=template + (" [chat template]" if config.chat else ""),
        shots=config.shots,
        dtype=str(llm.dtype).removeprefix("torch."),
        quantization=weight_quantization(llm.module),
        batch_size=llm.batch_size,
        seed=config.seed,
    )


def model_digest(llm: Backend) -> str:
    """The store's digest of the model (a hash of its files' digests), or the same over a folder's files."""
    from llmasos.store import ModelStore

    try:
        return ModelStore().get(llm.name).digest
    except LLMasOSError:  # a local folder used in place
        folder = llm.model_dir
        lines = [
            f"{p.relative_to(folder)}={file_digest(p)}\n" for p in sorted(folder.rglob("*")) if p.is_file()
        ]
        return "sha256:" + hashlib.sha256("".join(lines).encode()).hexdigest()


def weight_quantization(model) -> str | None:
    """The block formats the weights actually ran in (e.g. "Q4_1"), or None for plain floats."""
    layouts = sorted({m.qtype for m in model.modules() if hasattr(m, "qtype")})
    return ", ".join(layouts) or None
