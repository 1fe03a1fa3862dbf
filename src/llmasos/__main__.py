"""`python -m llmasos VERB` is `llmasos VERB`.

torchrun starts one per rank: `torchrun --nproc_per_node N -m llmasos pretrain ...`.
"""

from llmasos.cli import main

main()
