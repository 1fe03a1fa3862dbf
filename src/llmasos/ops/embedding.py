"""An embedding table without random init.

The loader builds drivers on the meta device and fills every weight from the checkpoint, so
initialization is wasted work; and nn.Embedding's `normal_` init costs ~2 s of one-time set-up on
the meta device, almost half the CLI's start-up budget. Passing the table skips the init.
"""

import torch
from torch import nn


def empty_embedding(num_embeddings: int, embedding_dim: int) -> nn.Embedding:
    return nn.Embedding(num_embeddings, embedding_dim, _weight=torch.empty(num_embeddings, embedding_dim))
