"""The shell: `llmasos VERB`, one module per group of verbs, all added to the one Typer app of app.py.

    app.py     the root `app`, `main()` (an LLMasOS error is one line on stderr and exit code 1),
               what the groups share
    run.py     run (one answer, or a chat)
    store.py   pull, import, list, show, quantize, rm, verify
    serve.py   serve, ps, stop
    top.py     top (its drawing: dashboard.py)
    eval.py    eval, explain
    tasks.py   task
    train.py   pretrain, finetune, dpo
    bench.py   bench and its commands: serve, guards, kernels, quality, train
    keys.py    keys add, list, revoke
    data.py    data import, list, show, rm, verify, export, prepare

Importing this package registers every verb (in the order above, which is the order of
`llmasos --help`); the console script is `llmasos.cli:main`, and `python -m llmasos` runs it too.
"""

# isort: off
from llmasos.cli.app import app, main
from llmasos.cli import run, store, serve, top, eval, tasks, train, bench, keys, data  # noqa: F401 (registers the verbs)
# isort: on

__all__ = ["app", "main"]
