"""Building the CPU kernels survives a build that was stopped: torch's loader waits forever on the
`lock` file such a build leaves behind, so llmasos serializes its builds with an flock (dropped by the
OS with its holder) and removes a lock file it finds while holding it."""

import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import torch.utils.cpp_extension

from llmasos.ops import kernels as cpu


def test_a_lock_left_by_a_stopped_build_is_removed(tmp_path, caplog):
    build_dir = tmp_path / "llmasos_cpu_kernels"
    build_dir.mkdir()
    (build_dir / "lock").touch()  # what a build killed mid-compile leaves
    with cpu._exclusive_build(build_dir):
        assert not (build_dir / "lock").exists()
    assert "left by a build that was stopped" in caplog.text


def test_a_live_build_is_waited_for(tmp_path):
    """A second process enters only once the first has left: its `lock` is not taken for stale."""
    build_dir = tmp_path / "llmasos_cpu_kernels"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import time
            from pathlib import Path
            from llmasos.ops.kernels import _exclusive_build
            build_dir = Path({str(build_dir)!r})
            with _exclusive_build(build_dir):
                (build_dir / "lock").touch()  # torch's, while it compiles
                print("held", flush=True)
                time.sleep(0.5)
                (build_dir / "lock").unlink()
                (build_dir / "released").touch()
        """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with cpu._exclusive_build(build_dir):
            assert (build_dir / "released").exists()
    finally:
        holder.wait(timeout=60)
    assert holder.returncode == 0


def test_build_clears_a_stale_lock_before_torch_waits_on_it(tmp_path, monkeypatch):
    """The wiring: torch is asked to build in the folder whose stale lock was removed."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    name = "llmasos_cpu_kernels"
    build_dir = tmp_path / f"py{sys.version_info.major}{sys.version_info.minor}_cpu" / name
    build_dir.mkdir(parents=True)
    (build_dir / "lock").touch()
    library = tmp_path / "built.so"
    library.write_bytes(b"")
    asked = {}

    def load(**kwargs):  # stands in for the compile: what matters is the folder it is given
        asked.update(kwargs, lock_left=Path(kwargs["build_directory"], "lock").exists())
        return SimpleNamespace(__file__=str(library))

    monkeypatch.setattr(torch.utils.cpp_extension, "load", load)
    module = cpu.build.__wrapped__("avx2")
    assert module is not None and module.__file__ == str(library)
    assert asked["name"] == name and Path(asked["build_directory"]) == build_dir
    assert asked["lock_left"] is False
    assert (tmp_path / f"{name}.llmasos-stamp.json").exists()
