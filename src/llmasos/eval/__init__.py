"""Diagnostics: scores for a model on a task file, the way lm-evaluation-harness, sacrebleu and
rouge-score compute them, each recorded in a report with the signature that reproduces it.

The model-free parts live here: metrics (pure functions), task files (load and check JSONL)
and reports (JSON and Markdown).
"""

from llmasos.eval.metrics import (
    ClassificationResult,
    MetricResult,
    bleu,
    classification_metrics,
    exact_match,
    multiple_choice_metrics,
    rouge,
    token_f1,
)
from llmasos.eval.report import EvalReport, EvalSignature
from llmasos.eval.taskfile import (
    ClassificationExample,
    GenerationExample,
    MultipleChoiceExample,
    TaskFile,
    file_digest,
    load_task,
)

__all__ = [
    "ClassificationExample",
    "ClassificationResult",
    "EvalReport",
    "EvalSignature",
    "GenerationExample",
    "MetricResult",
    "MultipleChoiceExample",
    "TaskFile",
    "bleu",
    "classification_metrics",
    "exact_match",
    "file_digest",
    "load_task",
    "multiple_choice_metrics",
    "rouge",
    "token_f1",
]
