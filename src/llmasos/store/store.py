"""The model store: LLMasOS's file system, laid out like Ollama's and the Hugging Face cache.

    $LLMASOS_HOME/                  (default ~/.llmasos)
      blobs/sha256-<hex>            file contents, named by their hash, read-only, shared
      manifests/<name>.json         one per model: its files (relpath -> digest, size) and facts
      datasets/<name>.json          one per dataset (llmasos.data): its Parquet shards, schema, lineage
      models/<name>/                symlinks relpath -> ../blobs/...: a plain Hugging Face folder
      cache/gguf-<sha256>/          local .gguf files converted on first use (not in the store)
      tmp/                          work in progress; anything left here is from a crash
      .lock                         flock'd around every change

A change is atomic because the manifest is its commit point: blobs are written to tmp/, hashed,
fsynced and renamed into blobs/; the manifest is renamed into place last. A crash or an error
before that leaves no manifest, hence no model; the next change clears tmp/ and unreferenced
blobs. The models/ folders are derived data, rebuilt from the manifest whenever they disagree.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from llmasos.errors import ModelNotFoundError, StoreError, UnsupportedModelError
from llmasos.files import exclusive, fsync_dir, sha256_file, stage_text
from llmasos.store import sources
from llmasos.store.catalog import CATALOG

# One or two parts ("smollm2", "org/name"), each starting with a letter or digit, so that no
# name can be "..", absolute, hidden, or reach outside manifests/ and models/.
_NAME_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_NAME_RE = re.compile(f"{_NAME_PART}(/{_NAME_PART})?")
_CHUNK = 1 << 20


@dataclass
class Manifest:
    """What a model is: its files by content digest, where it came from, and what it is."""

    name: str
    source: str  # "catalog:smollm2", "hf:org/name@<commit>", "file:/abs/path"
    format: str  # "gguf" or "safetensors"
    files: dict[str, dict]  # relpath -> {"digest": "sha256:<hex>", "size": int}
    created: str  # ISO 8601, UTC
    facts: dict = field(default_factory=dict)  # architecture, quantization/dtype, context_length, ...

    @property
    def digest(self) -> str:
        """The model's identity: a hash over its files only, so the same bytes under two names
        or imported twice have the same digest."""
        canonical = json.dumps(self.files, sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def size(self) -> int:
        """Bytes on disk: each distinct blob counted once."""
        return sum({f["digest"]: f["size"] for f in self.files.values()}.values())


class ModelStore:
    """The models on this machine, by name. Reads need no lock; changes take `$LLMASOS_HOME/.lock`."""

    def __init__(self, home: Path | None = None):
        self.home = Path(home or os.environ.get("LLMASOS_HOME") or Path.home() / ".llmasos").expanduser()
        self.blobs = self.home / "blobs"
        self.manifests = self.home / "manifests"
        self.models = self.home / "models"
        self.cache = self.home / "cache"
        self.tmp = self.home / "tmp"
        self.datasets = self.home / "datasets"  # the manifests of llmasos.data's datasets
        for folder in (self.blobs, self.manifests, self.models, self.cache, self.tmp, self.datasets):
            folder.mkdir(parents=True, exist_ok=True)

    # ---- adding models -------------------------------------------------------------------------

    def pull(self, name: str, progress: bool | sources.ProgressSink = True) -> Manifest:
        """Fetch a catalog model ("smollm2") or a hub repo ("org/name", "org/name@revision").

        The store lock is held for the whole download, so two pulls queue instead of racing."""
        repo_id, _, revision = name.partition("@")
        if repo_id in CATALOG:
            with self.lock(), self.staging() as work:
                gguf = sources.download_catalog(CATALOG[repo_id], work, progress)
                staged = sources.stage_gguf(gguf, work, f"catalog:{repo_id}", progress)
                return self._register(repo_id, staged, progress)
        if "/" in repo_id:
            check_name(repo_id)
            with self.lock(), self.staging() as work:
                folder, commit = sources.download_hf(repo_id, revision or "main", work, progress)
                staged = sources.stage_folder(folder, f"hf:{repo_id}@{commit}")
                return self._register(repo_id, staged, progress)
        raise ModelNotFoundError(
            f"'{name}' is neither a catalog model ({', '.join(CATALOG)}) nor a Hugging Face repo id "
            f"(org/name); see `llmasos list`, or import a local file with `llmasos import PATH --name {name}`"
        )

    def import_path(
        self, path: Path | str, name: str | None = None, progress: bool | sources.ProgressSink = True
    ) -> Manifest:
        """Copy a local Hugging Face folder or .gguf file into the store (default name: its stem)."""
        path = Path(path).expanduser().resolve()
        if not path.exists():
            raise StoreError(f"{path} does not exist; give a Hugging Face-format folder or a .gguf file")
        if name is None:
            name = path.name if path.is_dir() else path.stem
        check_name(name)
        with self.lock(), self.staging() as work:
            if path.is_dir():
                staged = sources.stage_folder(path, f"file:{path}")
            else:
                staged = sources.stage_gguf(path, work, f"file:{path}", progress)
            return self._register(name, staged, progress)

    def resolve(self, model: str, progress: bool | sources.ProgressSink = True) -> Path:
        """The folder the engine loads for `model`: a store name, a catalog name (pulled on first
        use), a local Hugging Face folder (used in place) or a local .gguf (converted once)."""
        if self._has(model):
            return self.path(model)
        local = Path(model).expanduser()
        if local.is_dir():
            if not (local / "config.json").is_file():
                raise UnsupportedModelError(
                    f"{local} has no config.json; give a Hugging Face-format folder, a .gguf file, "
                    "or a model name from `llmasos list`"
                )
            return local.resolve()
        if local.is_file():
            return self._converted_gguf(local.resolve(), progress)
        if model in CATALOG:
            return self.path(self.pull(model, progress=progress).name)
        raise ModelNotFoundError(_not_found(model))

    def obtain(self, model: str, progress: bool | sources.ProgressSink = True) -> str:
        """The name to open `model` by, pulled into the store first if it is not here: a store name or
        a local folder or .gguf as given; a catalog name or a Hugging Face repo id ("org/name",
        "org/name@revision") that the store lacks, pulled (the revision too, unless the store holds
        that very commit), then its store name. `resolve` never reaches the hub for a repo id, so that
        a mistyped path fails at once; this is for callers that asked to download (`from_pretrained`,
        `llmasos run`)."""
        if self._has(model) or Path(model).expanduser().exists():
            return model
        repo_id, _, revision = model.partition("@")
        if revision and self._has(repo_id) and self.get(repo_id).source == f"hf:{model}":
            return repo_id
        if repo_id in CATALOG or ("/" in repo_id and _NAME_RE.fullmatch(repo_id)):
            return self.pull(model, progress=progress).name
        raise ModelNotFoundError(
            f"model '{model}' is not in the store, a local folder or .gguf file, a catalog model "
            f"({', '.join(CATALOG)}) or a Hugging Face repo id (org/name or org/name@revision); "
            "see `llmasos list`"
        )

    # ---- reading -------------------------------------------------------------------------------

    def list(self) -> list[Manifest]:
        """Every model in the store, by name."""
        return [self.get(name) for name in self._names()]

    def get(self, name: str) -> Manifest:
        """The manifest of a model in the store; never fetches anything."""
        check_name(name)
        path = self._manifest_path(name)
        if not path.is_file():
            raise ModelNotFoundError(_not_found(name))
        try:
            return Manifest(**json.loads(path.read_text()))
        except (ValueError, TypeError) as e:
            raise StoreError(
                f"the manifest of '{name}' ({path}) is damaged ({e}); "
                f"run `llmasos rm {name}` and add the model again"
            ) from e

    def path(self, name: str) -> Path:
        """The model's Hugging Face-format folder, rebuilt from the manifest if it is missing or stale."""
        manifest = self.get(name)
        missing = [rel for rel, f in manifest.files.items() if not self.blob(f["digest"]).is_file()]
        if missing:
            raise StoreError(
                f"model '{name}' is missing the blobs of {', '.join(missing)}; {_refetch_hint(manifest)}"
            )
        if not self._links_match(manifest):
            with self.lock():
                self._link(manifest)
        return self.models / name

    def show(self, name: str) -> dict:
        """What `llmasos show` prints: identity, provenance, facts and files.

        A GGUF has no one dtype: its tensor types by part are read from the file itself, so models
        imported before this was shown get it too.
        """
        m = self.get(name)
        gguf = self.blob(m.files["model.gguf"]["digest"]) if "model.gguf" in m.files else None
        if gguf is not None and gguf.is_file():
            from llmasos.store.gguf import tensor_types

            weights = {"tensor_types": tensor_types(gguf)}
        else:
            weights = {"dtype": m.facts.get("dtype")}
        return {
            "name": m.name,
            "architecture": m.facts.get("architecture"),
            "parameters": m.facts.get("parameter_count"),
            "quantization": m.facts.get("quantization"),
            **weights,
            "context_length": m.facts.get("context_length"),
            "chat_template": bool(m.facts.get("has_chat_template")),
            "size": m.size,
            "digest": m.digest,
            "format": m.format,
            "source": m.source,
            "created": m.created,
            "files": {rel: f["size"] for rel, f in sorted(m.files.items())},
        }

    def verify(self, name: str) -> list[str]:
        """Re-hash every blob of the model; returns the problems found (empty: all good)."""
        manifest = self.get(name)
        problems = []
        for rel, f in sorted(manifest.files.items()):
            blob = self.blob(f["digest"])
            if not blob.is_file():
                problem = "is missing"
            elif sha256_file(blob) != f["digest"]:
                problem = "is corrupted (hash mismatch)"
            else:
                continue
            problems.append(f"blob {blob.name} of {rel} {problem}; {_refetch_hint(manifest)}")
        return problems

    # ---- removing ------------------------------------------------------------------------------

    def remove(self, name: str) -> None:
        """Delete the model, then every blob no remaining manifest refers to."""
        check_name(name)  # not `get`: a damaged manifest must still be removable
        if not self._manifest_path(name).is_file():
            raise ModelNotFoundError(_not_found(name))
        with self.lock():
            shutil.rmtree(self.models / name, ignore_errors=True)
            self._manifest_path(name).unlink()
            (self.home / "cards" / f"{name}.json").unlink(missing_ok=True)  # the card data of store/card.py
            if "/" in name:  # drop the org folder with its last model
                cards = (self.home / "cards" / name).parent
                for parent in ((self.models / name).parent, (self.manifests / name).parent, cards):
                    if parent.is_dir() and not any(parent.iterdir()):
                        parent.rmdir()
            self.collect_garbage()

    # ---- internals -----------------------------------------------------------------------------

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive access for one change. Whatever is in tmp/ when we get the lock was left by
        a process that died mid-change (every live change holds this lock), so it goes."""
        with exclusive(self.home / ".lock"):
            for stray in self.tmp.iterdir():
                if stray.is_dir():
                    shutil.rmtree(stray)
                else:
                    stray.unlink()
            yield

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A private folder in tmp/, removed however the work in it ends."""
        work = Path(tempfile.mkdtemp(dir=self.tmp, prefix="stage-"))
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _register(self, name: str, staged: sources.Staged, progress: bool | sources.ProgressSink) -> Manifest:
        """Blobs first, manifest last (the commit point), then the folder of links. Lock held."""
        check_name(name)
        for other in self._names():
            if ("/" in name) != ("/" in other) and name.split("/")[0] == other.split("/")[0]:
                raise StoreError(
                    f"name '{name}' clashes with the model '{other}' (one would be a folder of the other); "
                    "choose another name with `--name`"
                )
        try:
            files = {}
            with sources.progress_bar(progress) as bar:
                task = bar.add_task("storing", total=sum(p.stat().st_size for p in staged.files.values()))
                for rel, path in staged.files.items():
                    files[rel] = self.add_blob(path)
                    bar.advance(task, files[rel]["size"])
            manifest = Manifest(
                name=name,
                source=staged.source,
                format=staged.format,
                files=files,
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                facts=staged.facts,
            )
            target = self._manifest_path(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            _write_atomically(target, json.dumps(asdict(manifest), indent=2) + "\n", self.tmp)
        finally:
            self.collect_garbage()  # blobs of a failed attempt, or of the version just replaced
        self._link(manifest)
        return manifest

    def add_blob(self, src: Path) -> dict:
        """Hash `src` into blobs/. Files already in tmp/ are renamed; anything else is copied
        into tmp/ first, so a blob only ever appears whole and durable."""
        if src.resolve().is_relative_to(self.tmp.resolve()):
            staged, digest = src, sha256_file(src)
            with open(staged, "rb") as f:
                os.fsync(f.fileno())
        else:
            fd, name = tempfile.mkstemp(dir=self.tmp, prefix="blob-")
            staged, hasher = Path(name), hashlib.sha256()
            with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
                while chunk := fin.read(_CHUNK):
                    hasher.update(chunk)
                    fout.write(chunk)
                fout.flush()
                os.fsync(fout.fileno())
            digest = "sha256:" + hasher.hexdigest()
        staged.chmod(0o444)  # the models/ links lead here; writing through them must fail
        size = staged.stat().st_size
        # Replacing an existing blob with the fresh copy also repairs one that was corrupted.
        os.replace(staged, self.blob(digest))
        fsync_dir(self.blobs)
        return {"digest": digest, "size": size}

    def _link(self, manifest: Manifest) -> None:
        """Build models/<name>/ from the manifest beside the old one, then swap it in. Lock held."""
        target = self.models / manifest.name
        new = Path(tempfile.mkdtemp(dir=self.tmp, prefix="links-"))
        for rel, f in manifest.files.items():
            link = new / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(self.blob(f["digest"]), target / Path(rel).parent))
        new.chmod(0o755)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # a directory cannot be renamed over a full one: move it aside first
            old = Path(tempfile.mkdtemp(dir=self.tmp, prefix="old-"))
            os.replace(target, old / "model")
            os.replace(new, target)
            shutil.rmtree(old)
        else:
            os.replace(new, target)

    def _links_match(self, manifest: Manifest) -> bool:
        folder = self.models / manifest.name
        if not folder.is_dir():
            return False
        expected = {
            rel: os.path.relpath(self.blob(f["digest"]), folder / Path(rel).parent)
            for rel, f in manifest.files.items()
        }
        actual = {
            str(p.relative_to(folder)): os.readlink(p) if p.is_symlink() else None
            for p in folder.rglob("*")
            if not p.is_dir() or p.is_symlink()
        }
        return actual == expected

    def _converted_gguf(self, gguf: Path, progress: bool | sources.ProgressSink) -> Path:
        """A local .gguf converted once into cache/gguf-<sha256>/, keyed by content so that an
        edited file is converted again."""
        if not sources.is_gguf(gguf):
            raise UnsupportedModelError(
                f"{gguf} is neither a .gguf file nor a Hugging Face-format folder; "
                "give one of those, or a model name from `llmasos list`"
            )
        target = self.cache / f"gguf-{sha256_file(gguf).removeprefix('sha256:')}"
        if target.is_dir():
            return target
        with self.lock(), self.staging() as work:
            if not target.is_dir():  # another process may have converted it while we waited
                sources.stage_gguf(gguf, work, f"file:{gguf}", progress)
                os.replace(work / "hf", target)
        return target

    def collect_garbage(self) -> None:
        """Delete blobs no manifest refers to, a model's or a dataset's (llmasos.data shares these
        blobs). Lock held. If any manifest cannot be read we cannot know what it refers to, so
        nothing is deleted until it is fixed or removed."""
        try:
            referenced = {self.blob(f["digest"]).name for m in self.list() for f in m.files.values()}
            for path in self.datasets.rglob("*.json"):
                files = json.loads(path.read_text())["files"]
                referenced |= {self.blob(f["digest"]).name for f in files.values()}
        except (StoreError, ValueError, KeyError, TypeError, AttributeError):
            return
        for blob in self.blobs.iterdir():
            if blob.name not in referenced:
                blob.unlink()

    def _names(self) -> list[str]:
        paths = [*self.manifests.glob("*.json"), *self.manifests.glob("*/*.json")]
        names = (str(p.relative_to(self.manifests).with_suffix("")) for p in paths)
        return sorted(name for name in names if _NAME_RE.fullmatch(name))

    def _has(self, name: str) -> bool:
        return bool(_NAME_RE.fullmatch(name)) and self._manifest_path(name).is_file()

    def _manifest_path(self, name: str) -> Path:
        return self.manifests / f"{name}.json"

    def blob(self, digest: str) -> Path:
        return self.blobs / digest.replace(":", "-")


def check_name(name: str) -> None:
    """Raise StoreError unless `name` can name a model in the store (checked before any work is spent)."""
    if not _NAME_RE.fullmatch(name):
        raise StoreError(
            f"invalid model name '{name}': use letters, digits, '.', '_' and '-', starting with a letter "
            "or digit, with at most one '/' as in org/name; pick one with `--name`"
        )


def _not_found(name: str) -> str:
    return (
        f"model '{name}' is not in the store; see `llmasos list`, or `llmasos pull {name}` "
        f"(catalog: {', '.join(CATALOG)}; or a Hugging Face repo id org/name)"
    )


def _refetch_hint(manifest: Manifest) -> str:
    kind, _, where = manifest.source.partition(":")
    if kind == "file":
        return f"import it again with `llmasos import {where} --name {manifest.name}`"
    return f"run `llmasos pull {manifest.name}` again"


def _write_atomically(target: Path, text: str, tmp: Path) -> None:
    staged = stage_text(tmp, "manifest-", text)
    os.chmod(staged, 0o644)
    os.replace(staged, target)
    fsync_dir(target.parent)
