"""`torchrun --nproc_per_node N -m llmasos.train pretrain|finetune|dpo ...`: one process per rank."""

from llmasos.cli.train import main

main()
