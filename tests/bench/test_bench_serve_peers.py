"""G3 against llama-server: finding the binary and the GGUF, and the orchestration of both servers
end to end. CI has no llama-server build, so the end-to-end test gives it a stand-in executable that
checks llama-server's arguments and serves the same GGUF with `llmasos serve` on the port it was
given: what is tested is the starting, the readiness (/health), the load through each server in
alternating order, and that no server process is left behind."""

import os
import stat
import sys
import textwrap

import psutil
import pytest
from typer.testing import CliRunner

from llmasos.bench.serve_peers import compare_with_llama_server, find_llama_server, model_gguf
from llmasos.cli import app
from llmasos.errors import LLMasOSError
from llmasos.store import ModelStore

from tiny import save_tiny_model
from tiny_gguf import Q, write_tiny_gguf


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path / "home"))
    store = ModelStore()
    store.import_path(write_tiny_gguf(tmp_path / "tiny.gguf", "llama", Q.Q8_0), "tiny-gguf", progress=False)
    store.import_path(save_tiny_model(tmp_path / "llama", "llama"), "tiny-float", progress=False)
    return store


def test_the_gguf_of_a_model_is_found_and_a_float_model_is_refused(store):
    assert model_gguf("tiny-gguf").suffix == ".gguf" and model_gguf("tiny-gguf").is_file()
    with pytest.raises(LLMasOSError, match="runs only GGUF"):
        model_gguf("tiny-float")


def test_a_missing_binary_says_how_to_build_it(tmp_path):
    with pytest.raises(LLMasOSError, match="build it from the llama.cpp that llama-cpp-python vendors"):
        find_llama_server(tmp_path / "llama-server")
    result = CliRunner().invoke(app, ["bench", "serve", "--llama-server", str(tmp_path / "nope")])
    assert isinstance(result.exception, LLMasOSError) and "llama-cpp-python vendors" in str(result.exception)


STAND_IN = """\
    #!{python}
    import os, sys
    args = sys.argv[1:]
    value = lambda flag: args[args.index(flag) + 1]
    assert value("-m").endswith(".gguf") and os.path.isfile(value("-m")), args
    assert int(value("-np")) == {slots} and int(value("-c")) >= {slots} * 24, args
    assert value("--host") == "127.0.0.1", args
    serve = [sys.executable, "-m", "llmasos", "serve", "tiny-gguf", "--port", value("--port")]
    os.execv(sys.executable, serve)
    """


@pytest.mark.slow  # four server starts
def test_both_servers_take_the_same_load_in_alternating_rounds_and_none_is_left(store, tmp_path):
    binary = tmp_path / "llama-server"
    binary.write_text(textwrap.dedent(STAND_IN.format(python=sys.executable, slots=4)))
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    before = {p.pid for p in psutil.Process(os.getpid()).children(recursive=True)}
    rows, results = compare_with_llama_server("tiny-gguf", binary, 6, 4, 8, 4, rounds=2)
    assert [r.system for r in rows] == ["LLMasOS", "llama-server"]
    assert all(r.value > 0 and r.unit == "tok/s" and "4 slots" in r.note for r in rows)
    for runs in results.values():
        assert len(runs) == 2
        assert all(r.completed == 6 and r.failed == 0 and r.output_tokens == 6 * 4 for r in runs)
    assert {p.pid for p in psutil.Process(os.getpid()).children(recursive=True)} <= before
