"""Datasets, first-class citizens of the store like models, and the pipelines that clean them.

    store/      datasets in the model store's home: Parquet shards as content-addressed blobs, a
                manifest per dataset (schema, rows, digests, lineage); importing from JSONL, Parquet,
                CSV, text and Hugging Face `datasets` folders, streamed; export, verify, remove
    pipeline/   `llmasos data prepare`: a YAML recipe of steps (datatrove's quality filters and
                deduplication, LLMasOS's PII scrub, decontamination and chat checks) run over a
                stored dataset into a new one whose lineage names its parent and recipe

The two sit at different layers: store/ just above llmasos.store (no torch, no model), pipeline/
beside the evaluation apps, since it uses the safety guards and the eval task files.
"""
