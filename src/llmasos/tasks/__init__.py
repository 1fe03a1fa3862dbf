"""Everyday jobs without writing prompts: summarize, translate, classify, answer, extract, complete code.

Each task is a prompt template (data, in templates.yaml, which a user can override) plus the
decoding that suits it: classification compares the labels' log-likelihoods (never parses free
text), extraction is constrained to a JSON Schema in the sampler, summaries and translations get a
length budget, code completion stops where its block ends. Everything runs through `LLM`, so the
same calls work on the native kernel and on the transformers-backed families (T5, BART, BERT).
"""

from llmasos.tasks.tasks import Classification, Tasks, load_templates

__all__ = ["Classification", "Tasks", "load_templates"]
