"""The model store: content-addressed blobs, one manifest per model, a Hugging Face folder of links."""

from llmasos.store.store import Manifest, ModelStore

__all__ = ["Manifest", "ModelStore"]
