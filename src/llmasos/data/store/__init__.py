"""Datasets in the store: see datasets.py (the store) and readers.py (the input formats)."""

from llmasos.data.store.datasets import DatasetManifest, DatasetStore, row_line

__all__ = ["DatasetManifest", "DatasetStore", "row_line"]
