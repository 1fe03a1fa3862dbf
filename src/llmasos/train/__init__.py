"""The toolchain: pretrain, fine-tune (full, frozen layers, LoRA) and DPO, with the result put in the store.

Training runs on transformers' model classes (peft's LoRA needs them, and their checkpoints are
what the store and the kernel's drivers load); the loop, data pipeline, checkpoints and
distributed setup are ours.
"""
