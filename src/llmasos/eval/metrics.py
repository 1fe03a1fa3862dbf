"""Evaluation metrics: pure functions over strings, labels and log-likelihoods, no model involved.

BLEU and ROUGE come from sacrebleu and rouge-score so the numbers equal the ones papers report;
exact match and token F1 follow the official SQuAD script; multiple-choice accuracy follows
lm-evaluation-harness. The few lines of SQuAD and lm_eval logic are restated here rather than
imported because neither is a runtime dependency (lm_eval pulls in a whole harness).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from llmasos.errors import LLMasOSError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_PUNCTUATION = frozenset(string.punctuation)

References = Sequence[str | Sequence[str]]
"""One entry per hypothesis: a reference string or a list of alternative references."""


@dataclass(frozen=True)
class MetricResult:
    """A corpus score; stderr is set for averages of per-example scores (None for one example),
    signature for metrics whose value depends on settings (BLEU's tokenizer, smoothing...)."""

    score: float
    stderr: float | None = None
    signature: str | None = None


@dataclass(frozen=True)
class ClassificationResult:
    """Accuracy, macro-F1 over every label, and confusion[true][predicted] in `labels` order."""

    accuracy: MetricResult
    macro_f1: float
    labels: list[str]
    confusion: list[list[int]]


def mean_stderr(values: Sequence[float]) -> float | None:
    """lm_eval's standard error of a mean: sample standard deviation (n - 1) over sqrt(n)."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def _mean(values: Sequence[float]) -> MetricResult:
    return MetricResult(score=sum(values) / len(values), stderr=mean_stderr(values))


def _reference_lists(hypotheses: Sequence[str], references: References) -> list[list[str]]:
    """Check the pairs line up and every reference has text; each entry becomes a list."""
    if isinstance(hypotheses, str) or isinstance(references, str):
        raise LLMasOSError("give lists of texts, one hypothesis and one reference (or list) per example")
    if not hypotheses:
        raise LLMasOSError("no hypotheses to score; give at least one hypothesis with its reference")
    if len(hypotheses) != len(references):
        raise LLMasOSError(
            f"{len(hypotheses)} hypotheses but {len(references)} references; give one reference "
            "(or a list of references) per hypothesis"
        )
    lists = []
    for i, ref in enumerate(references):
        refs = [ref] if isinstance(ref, str) else list(ref)
        if not refs or any(not isinstance(r, str) or not r.strip() for r in refs):
            raise LLMasOSError(f"reference {i} is empty; every example needs a non-empty reference text")
        lists.append(refs)
    return lists


def bleu(hypotheses: Sequence[str], references: References) -> MetricResult:
    """Corpus BLEU (0-100) by sacrebleu's defaults, with its signature so the number is reproducible.

    Examples may have different numbers of references; sacrebleu skips the missing ones (None)."""
    from sacrebleu.metrics import BLEU

    ref_lists = _reference_lists(hypotheses, references)
    width = max(len(refs) for refs in ref_lists)
    streams = [[refs[k] if k < len(refs) else None for refs in ref_lists] for k in range(width)]
    metric = BLEU()
    result = metric.corpus_score(list(hypotheses), streams)
    return MetricResult(score=float(result.score), signature=str(metric.get_signature()))


def rouge(hypotheses: Sequence[str], references: References) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measure (0-1) by rouge-score with the Porter stemmer; with several
    references, the best one per example (rouge-score's score_multi).

    rougeLsum treats each line as a sentence, as rouge-score expects: put summaries one sentence
    per line, or rougeLsum equals rougeL."""
    from rouge_score.rouge_scorer import RougeScorer

    ref_lists = _reference_lists(hypotheses, references)
    scorer = RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    scores = [scorer.score_multi(refs, hyp) for hyp, refs in zip(hypotheses, ref_lists)]
    return {kind: sum(s[kind].fmeasure for s in scores) / len(scores) for kind in ROUGE_TYPES}


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lowercase, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _f1(prediction: str, reference: str) -> float:
    """SQuAD v2 token F1: two answers with no tokens left agree; otherwise overlap of token bags."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if not same:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(predictions: Sequence[str], references: References) -> MetricResult:
    """Share of predictions equal to some reference after SQuAD normalization."""
    ref_lists = _reference_lists(predictions, references)
    return _mean(
        [
            float(any(normalize_answer(p) == normalize_answer(r) for r in refs))
            for p, refs in zip(predictions, ref_lists)
        ]
    )


def token_f1(predictions: Sequence[str], references: References) -> MetricResult:
    """Mean SQuAD token F1, each prediction against its best reference."""
    ref_lists = _reference_lists(predictions, references)
    return _mean([max(_f1(p, r) for r in refs) for p, refs in zip(predictions, ref_lists)])


def classification_metrics(
    predictions: Sequence[str], labels: Sequence[str], label_set: Sequence[str] | None = None
) -> ClassificationResult:
    """Accuracy, macro-F1 and the confusion matrix (rows true, columns predicted).

    Macro-F1 averages every label of the set, a label never predicted nor present scoring 0,
    as scikit-learn does with `labels=` given. Without a label set, the sorted true labels are used."""
    if not labels:
        raise LLMasOSError("no labels to score; give at least one prediction with its true label")
    if len(predictions) != len(labels):
        raise LLMasOSError(f"{len(predictions)} predictions but {len(labels)} labels; give one label each")
    order = list(label_set) if label_set is not None else sorted(set(labels))
    if len(set(order)) != len(order):
        raise LLMasOSError(f"the label set {order} repeats a label; list each label once")
    if len(order) < 2:
        raise LLMasOSError(
            f"the label set {order} has one label; classification needs at least two labels to tell apart"
        )
    index = {label: i for i, label in enumerate(order)}
    confusion = [[0] * len(order) for _ in order]
    for i, (pred, true) in enumerate(zip(predictions, labels)):
        for name, value in (("label", true), ("prediction", pred)):
            if value not in index:
                raise LLMasOSError(f"{name} {value!r} of example {i} is not in the label set {order}")
        confusion[index[true]][index[pred]] += 1
    f1s = []
    for k in range(len(order)):
        hits = confusion[k][k]
        predicted = sum(row[k] for row in confusion)
        actual = sum(confusion[k])
        f1s.append(2 * hits / (predicted + actual) if hits else 0.0)
    return ClassificationResult(
        accuracy=_mean([float(p == t) for p, t in zip(predictions, labels)]),
        macro_f1=sum(f1s) / len(f1s),
        labels=order,
        confusion=confusion,
    )


def _argmax(values: Sequence[float]) -> int:
    """Index of the first maximum, as numpy.argmax breaks ties."""
    return max(range(len(values)), key=values.__getitem__)


def multiple_choice_metrics(
    choice_logprobs: Sequence[Sequence[float]],
    choice_texts: Sequence[Sequence[str]],
    answers: Sequence[int],
) -> dict[str, MetricResult]:
    """acc and acc_norm as lm-evaluation-harness scores HellaSwag and ARC.

    acc picks the choice with the highest log-likelihood of its continuation; acc_norm divides
    each log-likelihood by the length in characters of the choice text (lm_eval's
    `len(choice)`, without the space it puts before the continuation), which removes the bias
    towards short answers. Each comes with lm_eval's standard error of the mean."""
    if not answers:
        raise LLMasOSError("no multiple-choice examples to score; give at least one")
    if not len(choice_logprobs) == len(choice_texts) == len(answers):
        raise LLMasOSError(
            f"{len(choice_logprobs)} log-likelihood lists, {len(choice_texts)} choice lists and "
            f"{len(answers)} answers; give one of each per example"
        )
    acc, acc_norm = [], []
    for i, (lls, texts, answer) in enumerate(zip(choice_logprobs, choice_texts, answers)):
        if len(lls) != len(texts) or len(texts) < 2:
            raise LLMasOSError(
                f"example {i} has {len(texts)} choices and {len(lls)} log-likelihoods; "
                "give at least two choices and one log-likelihood per choice"
            )
        if any(not text for text in texts):
            raise LLMasOSError(f"example {i} has an empty choice; every choice needs text")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(texts):
            raise LLMasOSError(
                f"answer {answer!r} of example {i} is not a choice index; give 0 to {len(texts) - 1}"
            )
        acc.append(float(_argmax(lls) == answer))
        acc_norm.append(float(_argmax([ll / len(t) for ll, t in zip(lls, texts)]) == answer))
    return {"acc": _mean(acc), "acc_norm": _mean(acc_norm)}
