"""A stored GGUF model's weights, read from the GGUF itself by their Hugging Face names.

A GGUF model is stored as the GGUF plus `gguf_tensors.json`, written at import: for each tensor its
Hugging Face name, GGUF type, shape, byte range in `model.gguf`, and the one layout change
llama.cpp's converter made to it (transformers' tensor processors decide which, at import, so loading
needs no transformers). Nothing is dequantized on disk: a float32 copy of a 4 GB Q4 model would be
~30 GB.

Loading maps the file (copy-on-write, never written) and hands out, tensor by tensor, the GGUF
blocks the CPU kernels repack (`blocks`) or float32 values dequantized on the fly (`floats`), for a
GPU, the float path and the layers without blocks. The pages of each tensor are dropped from the
process once it has been handed out, so the resident memory of a load is what the model keeps plus
one tensor, not the file on top.
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from llmasos.errors import StoreError, UnsupportedModelError
from llmasos.ops.quant import LAYOUTS, dequantize_reference

GGUF_FILE = "model.gguf"
TENSORS_FILE = "gguf_tensors.json"
FORMAT = 1  # of TENSORS_FILE; a reader refuses a table of another format
# ggml type ids of plain float tensors, read as they are
_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the GGUF as the model folder names it."""

    name: str  # the Hugging Face name, e.g. model.layers.0.self_attn.q_proj.weight
    gguf_name: str  # llama.cpp's, e.g. blk.0.attn_q.weight
    type: str  # GGML type name: F32, F16, Q4_1, Q6_K, ...
    shape: tuple[int, ...]  # in the file, rows first (torch order)
    offset: int  # of its bytes from the start of model.gguf
    nbytes: int
    # what undoes llama.cpp's layout change: None, "transpose" (GPT-2's Conv1D matrices) or
    # "unpermute" (Llama's q/k rows, interleaved per head by the converter; `heads` groups)
    transform: str | None = None
    heads: int | None = None

    def row_order(self) -> torch.Tensor:
        """The file row each Hugging Face row comes from, for "unpermute" (transformers'
        `_reverse_permute_weights` as an index: reshape(heads, rows/heads/2, 2) then swap the last two)."""
        rows = self.shape[0]
        return torch.arange(rows).view(self.heads, rows // self.heads // 2, 2).transpose(1, 2).reshape(-1)


def is_gguf_folder(folder: Path) -> bool:
    """True for a model folder whose weights are a GGUF described by gguf_tensors.json."""
    return (Path(folder) / TENSORS_FILE).is_file()


def write_table(folder: Path, entries: list[TensorEntry]) -> None:
    rows = [{k: v for k, v in vars(e).items() if v is not None} for e in entries]
    text = json.dumps({"format": FORMAT, "tensors": rows}, indent=1)
    (Path(folder) / TENSORS_FILE).write_text(text + "\n", encoding="utf-8")


def read_table(folder: Path) -> list[TensorEntry]:
    path = Path(folder) / TENSORS_FILE
    fix = "run `llmasos verify MODEL`, and pull or import the model again"
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
        if table.get("format") != FORMAT:
            raise UnsupportedModelError(
                f"{path} is of format {table.get('format')!r}, this LLMasOS reads format {FORMAT}; "
                "upgrade LLMasOS, or pull or import the model again with this version"
            )
        return [TensorEntry(**{**row, "shape": tuple(row["shape"])}) for row in table["tensors"]]
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise StoreError(f"{path} is damaged ({error}); {fix}") from error


def parameter_count(folder: Path) -> int:
    total = 0
    for entry in read_table(folder):
        count = 1
        for dim in entry.shape:
            count *= dim
        total += count
    return total


class GGUFTensors:
    """The tensors of a GGUF model folder, memory-mapped. Use as a context manager (or `close`)."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        self.entries = {entry.name: entry for entry in read_table(folder)}
        path = folder / GGUF_FILE
        end = max((e.offset + e.nbytes for e in self.entries.values()), default=0)
        try:
            size = path.stat().st_size
        except OSError as error:
            raise StoreError(
                f"{folder} has {TENSORS_FILE} but no readable {GGUF_FILE} ({error.strerror}); "
                "run `llmasos verify MODEL`, and pull or import the model again"
            ) from error
        if size < end:
            raise StoreError(
                f"{path} is truncated ({size} bytes, its tensors end at {end}); "
                "run `llmasos verify MODEL`, and pull or import the model again"
            )
        with open(path, "rb") as f:
            # ACCESS_COPY: a private mapping torch can view without a read-only warning; never written
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None

    def __enter__(self) -> GGUFTensors:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Unmap the file once no tensor views it (a view left alive keeps the mapping until it goes)."""
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a caller still holds a view of the file: the mapping dies with it
                pass
            self._map = None

    def raw(self, entry: TensorEntry) -> torch.Tensor:
        """The tensor's bytes as uint8 [rows, row bytes], a view of the mapped file."""
        data = torch.frombuffer(self._map, dtype=torch.uint8, count=entry.nbytes, offset=entry.offset)
        return data.view(entry.shape[0] if len(entry.shape) > 1 else 1, -1)

    def release_all(self) -> None:
        """Drop the pages read so far from this process (they stay in the page cache; a view reading them
        again faults them back in from the file, unchanged, since the mapping is never written). The
        whole file, never one tensor's range: a fault maps the page cache's folio around the page it
        needs (up to a megabyte on recent kernels), beyond any tensor's own bytes."""
        if self._map is not None:
            self._map.madvise(mmap.MADV_DONTNEED)

    def block_names(self) -> list[str]:
        """The matrices whose GGUF blocks the CPU kernels run as they are (up to a row order)."""
        return [
            e.name
            for e in self.entries.values()
            if e.type in LAYOUTS and len(e.shape) == 2 and e.transform in (None, "unpermute")
        ]

    def blocks(self, name: str) -> tuple[torch.Tensor, str]:
        """`(uint8 [rows, bytes] GGUF blocks in the Hugging Face row order, layout)` of a `block_names`
        matrix: a view of the file, or for reordered rows a copy."""
        entry = self.entries[name]
        raw = self.raw(entry)
        if entry.transform == "unpermute":  # numpy's copy: one thread (see ops.quant._pack_groups)
            raw = torch.from_numpy(raw.numpy()[entry.row_order().numpy()])
        return raw, entry.type

    def float_tensor(self, name: str) -> torch.Tensor:
        """The tensor as float32 in the Hugging Face layout, a fresh tensor (never a view of the file)."""
        entry = self.entries[name]
        if entry.type in _FLOAT_TYPES:
            dtype = _FLOAT_TYPES[entry.type]
            count = entry.nbytes // dtype.itemsize
            values = torch.frombuffer(self._map, dtype=dtype, count=count, offset=entry.offset)
            values = values.to(torch.float32, copy=True)
        elif entry.type in LAYOUTS:
            values = dequantize_reference(self.raw(entry), entry.type, entry.shape[-1])
        else:  # K-quants and the rest: gguf-py's arithmetic, as the import of old did
            import numpy as np
            from gguf import GGMLQuantizationType, dequantize

            raw = self.raw(entry).numpy()
            values = torch.from_numpy(np.array(dequantize(raw, GGMLQuantizationType[entry.type]), np.float32))
        values = values.reshape(entry.shape)
        if entry.transform == "unpermute":
            values = values[entry.row_order()]
        elif entry.transform == "transpose":
            values = values.T.contiguous()
        return values

    def floats(self, skip: Callable[[str], bool] = lambda name: False) -> Iterator[tuple[str, torch.Tensor]]:
        """`(name, float32 tensor)` for every tensor but those `skip` names, each dequantized as it is
        reached, its pages dropped once the caller has taken it."""
        for name in self.entries:
            if skip(name):
                continue
            yield name, self.float_tensor(name)
            self.release_all()  # (a norm of 2 KB left ~1 MiB resident when only its range was dropped)


def place_gguf(gguf_path: Path, folder: Path) -> None:
    """Copy the GGUF's bytes to folder/model.gguf unless they are there already. Copied, never
    linked: the store renames staged files into its read-only blobs, which a link would make of the
    user's own file."""
    import shutil

    target = Path(folder) / GGUF_FILE
    if not target.exists() or not target.samefile(gguf_path):
        shutil.copyfile(gguf_path, target)
