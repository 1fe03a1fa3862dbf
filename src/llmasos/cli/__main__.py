"""`python -m llmasos.cli VERB` is `llmasos VERB` (as `python -m llmasos VERB` is)."""

from llmasos.cli import main

main()
