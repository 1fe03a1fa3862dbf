"""The CLI as a client of a resident `llmasos serve` (a real server process on loopback): the verbs
answer through it without loading torch, give what the in-process path gives, and fail cleanly when it
goes away."""

import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llmasos.store import ModelStore

from hub import folder_files, serve_hub
from serving import serve_process
from tiny import save_tiny_model

# Runs the CLI and reports on stderr, last, whether torch was ever imported.
CLI = [
    sys.executable,
    "-c",
    "import atexit, sys; "
    "atexit.register(lambda: print('torch loaded:', 'torch' in sys.modules, file=sys.stderr)); "
    "from llmasos.cli import main; sys.argv[0] = 'llmasos'; main()",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_folder):
    """`llmasos serve` over a store holding "tiny", with a local hub to pull from; yields the CLI's env."""
    home = tmp_path_factory.mktemp("home")
    port = free_port()
    with serve_hub({"org/pulled": folder_files(tiny_folder)}) as hub:
        env = {
            **os.environ,
            "LLMASOS_HOME": str(home),
            "LLMASOS_HOST": f"127.0.0.1:{port}",
            "HF_ENDPOINT": hub.url,
        }
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LLMASOS_HOME", str(home))
            ModelStore().import_path(tiny_folder, "tiny", progress=False)
        with serve_process(["--kv-cache-gib", "0.01", "--lazy"], env, port):
            yield env


def cli(env, *args):
    result = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.mark.slow
def test_run_through_the_daemon_equals_run_in_process_and_loads_no_torch(daemon):
    served = cli(daemon, "run", "tiny", "Hello there", "--max-tokens", "8", "--verbose")
    assert served.returncode == 0 and "on the server at" in served.stderr
    assert "torch loaded: False" in served.stderr
    here = cli({**daemon, "LLMASOS_HOST": "127.0.0.1:9"}, "run", "tiny", "Hello there", "--max-tokens", "8")
    assert here.returncode == 0 and "torch loaded: True" in here.stderr
    assert served.stdout == here.stdout and served.stdout.strip()
    # a model the server does not have runs here, saying so
    local = cli(daemon, "run", "org/absent", "Hi", "--verbose")
    assert local.returncode == 1 and "does not serve org/absent" in local.stderr


@pytest.mark.slow
def test_store_verbs_and_ps_and_stop_through_the_daemon(daemon):
    pulled = cli(daemon, "pull", "org/pulled", "--verbose")
    assert pulled.returncode == 0 and "asking the server" in pulled.stderr
    assert pulled.stdout.startswith("pulled org/pulled (sha256:") and "storing" in pulled.stderr  # its bar
    listing = cli(daemon, "list").stdout
    assert "org/pulled" in listing and "tiny" in listing
    shown = cli(daemon, "show", "org/pulled")
    assert "architecture  llama" in shown.stdout and "torch loaded: False" in shown.stderr
    assert '"name": "org/pulled"' in cli(daemon, "show", "org/pulled", "--json").stdout

    assert cli(daemon, "run", "org/pulled", "Hi", "--max-tokens", "2").returncode == 0  # loads it
    ps = cli(daemon, "ps")
    assert "org/pulled" in ps.stdout and "torch loaded: False" in ps.stderr
    assert cli(daemon, "stop", "org/pulled").stdout.strip() == "unloaded org/pulled"
    assert "org/pulled" not in cli(daemon, "ps").stdout
    assert cli(daemon, "stop", "org/pulled").stdout.strip() == "org/pulled was not loaded"
    assert cli(daemon, "rm", "org/pulled").returncode == 0
    assert "org/pulled" not in cli(daemon, "list").stdout
    missing = cli(daemon, "rm", "org/pulled")
    assert missing.returncode == 1 and "404" in missing.stderr and "not in the store" in missing.stderr


class _DyingDaemon(BaseHTTPRequestHandler):
    """A server that knows the daemon's probes, then dies after the first token of an answer: the
    connection closes mid-body, as when `llmasos serve` is killed while streaming."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = b'{"version": "0"}' if self.path == "/api/version" else b'{"data": [{"id": "tiny"}]}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        event = b'data: {"choices": [{"index": 0, "delta": {"content": "Once"}}]}\n\n'
        self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)  # gone, without the last chunk

    def log_message(self, *args):
        pass


def test_a_daemon_that_dies_mid_answer_is_a_clear_error():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _DyingDaemon)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "LLMASOS_HOST": f"127.0.0.1:{server.server_port}"}
        result = cli(env, "run", "tiny", "Hi")
    finally:
        server.shutdown()
    assert result.returncode == 1 and result.stdout.startswith("Once")
    assert "went away mid-answer" in result.stderr and "torch loaded: False" in result.stderr


def test_ps_and_stop_without_a_daemon_say_so(tmp_path):
    env = {**os.environ, "LLMASOS_HOME": str(tmp_path)}  # conftest points LLMASOS_HOST at a closed port
    ps = cli(env, "ps")
    assert ps.returncode == 0 and "no LLMasOS server answers at http://127.0.0.1:9" in ps.stderr
    stop = cli(env, "stop", "tiny")
    assert stop.returncode == 1 and "start one with `llmasos serve`" in stop.stderr
