"""A real LLMasOS server on 127.0.0.1 for tests: uvicorn in a background thread, on a free port."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn

from llmasos.config import EngineConfig
from llmasos.serve.app import create_app
from llmasos.serve.gateway import ServerConfig
from llmasos.serve.registry import RegistryConfig

ENGINE = EngineConfig(device="cpu", block_size=4, num_kv_blocks=512, max_num_seqs=64)


def server_config(models: list[str], home: Path, **overrides) -> ServerConfig:
    registry = overrides.pop("registry", None) or RegistryConfig(models, ENGINE)
    return ServerConfig(
        registry=registry,
        keys_file=home / "keys.json",
        audit_file=home / "audit.jsonl",
        **overrides,
    )


class LiveApp:
    """`with LiveApp(app) as live:` then `live.url`: an ASGI app under uvicorn in a thread on a free
    port, stopped like SIGTERM would stop it."""

    def __init__(self, app, idle_timeout_s: int = 5):
        self.app = app
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, log_level="warning", timeout_graceful_shutdown=5, timeout_keep_alive=idle_timeout_s
            )
        )
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()


class LiveServer(LiveApp):
    """`with LiveServer(config) as server:` then `server.url`: a whole LLMasOS server."""

    def __init__(self, config: ServerConfig, idle_timeout_s: int = 5):
        super().__init__(create_app(config, is_shutting_down=lambda: self.server.should_exit), idle_timeout_s)

    @property
    def state(self):
        """The `Server` object behind the app: registry, keys, metrics."""
        return self.app.state.server


def slow_engine(server, monkeypatch, seconds_per_step: float = 0.02) -> None:
    """Make every engine step take a while, so a request is surely still running when its client leaves."""
    engine = server.state.registry.loaded["tiny"].served.engine
    step = engine.step

    def slow_step():
        time.sleep(seconds_per_step)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)


@contextmanager
def serve_process(args: list[str], env: dict, port: int) -> Iterator[subprocess.Popen]:
    """`llmasos serve ARGS --port PORT` as its own process, handed over once /ready answers; killed after
    the block if it still runs (a test may stop it first, with SIGTERM, to see how it stops).

    Its output goes to a temporary file, not a pipe: a pipe nobody drains blocks a chatty server, and
    reading one from a server that never exits hangs the test; the file is read once the server is gone."""
    command = [sys.executable, "-m", "llmasos", "serve", *args, "--port", str(port)]
    with tempfile.TemporaryFile(mode="w+") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    process.wait(timeout=60)
                    log.seek(0)
                    raise AssertionError(f"the server did not become ready:\n{log.read()}")
                time.sleep(0.2)
            yield process
        finally:
            process.kill()
            process.wait(timeout=60)
