"""`torchrun --nproc_per_node N -m llmasos.train pretrain|finetune|dpo ...`: one process per rank."""

from llmasos.train.cli import main

main()
