"""The benchmarks of `llmasos bench` (the commands and their flags are in llmasos/cli/bench.py).

    common.py   Row, the speed-up column, machine_facts, print_table, to_markdown, progress
    isolate.py  one system in a fresh process of its own: a crash there is a report, not the end
    cpu.py      C1-C4: decode, prompt, concurrency, cold start, against transformers and llama.cpp
    serve.py    G3: a running server under load, beside the kernel offline
    guards.py   what the guards cost, per request and per streamed delta, and to G3's throughput
    kernels.py  the CPU block matmuls of one model, beside BLAS
    quality.py  perplexity of float, native-block, int8 and int4 runs (its text in data/)
    train.py    pretraining tokens/s and MFU, beside transformers' Trainer
    data.py     a generated corpus through `data import` + a cleaning recipe, beside datatrove bare
    data_corpus.py  that corpus: seeded JSONL with planted duplicates, near duplicates and PII

Each module measures with plain functions (run_*) and prints one table; none imports the CLI.
"""
