"""Run the app under uvicorn: idle connections time out, SIGTERM drains in-flight requests.

On SIGTERM uvicorn stops accepting connections and waits up to the shutdown timeout for running
requests to finish; /ready turns 503 at once so a load balancer stops sending new ones. What is
still running after the timeout is cancelled, which aborts it in the engine and frees its blocks.
"""

from __future__ import annotations

import uvicorn

from llmasos.serve.app import create_app
from llmasos.serve.gateway import ServerConfig


def run_server(
    config: ServerConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    idle_timeout_s: float = 5.0,
    shutdown_timeout_s: float = 30.0,
) -> None:
    server: uvicorn.Server | None = None
    app = create_app(config, is_shutting_down=lambda: server is not None and server.should_exit)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            timeout_keep_alive=int(idle_timeout_s),
            timeout_graceful_shutdown=int(shutdown_timeout_s),
            log_level="info",
        )
    )
    server.run()
