"""G3 against llama.cpp's own server: `llmasos serve MODEL` and `llama-server -m MODEL.gguf -np N`,
each started here as its own process on loopback, each at its default settings but for the slots
the load needs, and the same client load (bench/serve.py) through each HTTP server in turn.

llama-server is not a Python package: it is built from the llama.cpp that llama-cpp-python vendors
(docs/benchmarks.md says how) and passed by path. It batches its `-np` slots continuously, as our
server does; its context (`-c`) is split among the slots, so it gets `N x (prompt + output + 64)`
tokens, enough for every request. The rounds alternate which server goes first, so that the
machine's drift weighs on both alike.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from llmasos.bench.common import Row, free_port, server_process
from llmasos.bench.serve import ServeBenchResult, run_serve_bench
from llmasos.errors import LLMasOSError

WORKLOAD = "G3 vs llama-server"


@dataclass
class ServerPeer:
    """One HTTP server of the comparison: how to start it on a port, and where it says it is ready."""

    name: str
    command: list[str]
    url: str
    ready_path: str


def model_gguf(model: str) -> Path:
    """The GGUF file behind a store model (llama-server reads only GGUF)."""
    from llmasos.store import ModelStore

    found = sorted(ModelStore().path(model).rglob("*.gguf"))
    if not found:
        raise LLMasOSError(
            f"{model} has no GGUF file in the store, and llama-server runs only GGUF; "
            "compare with a model imported from a .gguf (e.g. smollm2)"
        )
    return found[0]


def peers(model: str, llama_server: Path, slots: int, context_per_slot: int) -> list[ServerPeer]:
    """Our server and llama-server, each on a free port of 127.0.0.1."""
    ours, theirs = free_port(), free_port()
    llmasos = [sys.executable, "-m", "llmasos", "serve", model, "--host", "127.0.0.1", "--port", str(ours)]
    llama = [str(llama_server), "-m", str(model_gguf(model)), "--host", "127.0.0.1", "--port", str(theirs)]
    llama += ["-np", str(slots), "-c", str(slots * context_per_slot)]
    return [
        ServerPeer("LLMasOS", llmasos, f"http://127.0.0.1:{ours}", "/ready"),
        ServerPeer("llama-server", llama, f"http://127.0.0.1:{theirs}", "/health"),
    ]


def find_llama_server(path: str | Path) -> Path:
    """The llama-server binary, by path or on PATH, or a clear error saying how to build it."""
    found = shutil.which(str(path))
    if found is None:
        raise LLMasOSError(
            f"no llama-server at {path}: build it from the llama.cpp that llama-cpp-python vendors "
            "(docs/benchmarks.md, 'G3 against llama-server') and pass its path"
        )
    return Path(found)


def compare_with_llama_server(
    model: str,
    llama_server: str | Path,
    num_requests: int,
    max_concurrency: int,
    prompt_len: int,
    output_len: int,
    rounds: int = 1,
) -> tuple[list[Row], dict[str, list[ServeBenchResult]]]:
    """The same G3 load through both servers, `rounds` times each in alternating order: one row per
    server (its best round's output tokens a second), and every round's result."""
    binary = find_llama_server(llama_server)
    results: dict[str, list[ServeBenchResult]] = {"LLMasOS": [], "llama-server": []}
    with tempfile.TemporaryDirectory(prefix="llmasos-bench-") as workdir:
        for round_ in range(rounds):
            order = peers(model, binary, max_concurrency, prompt_len + output_len + 64)
            for peer in order if round_ % 2 == 0 else order[::-1]:
                log = Path(workdir) / f"{peer.name}-{round_}.log"
                with server_process(peer.command, peer.url + peer.ready_path, log):
                    result = run_serve_bench(
                        peer.url, model, num_requests, max_concurrency=max_concurrency,
                        prompt_len=prompt_len, output_len=output_len,
                    )  # fmt: skip
                if result.failed:
                    raise LLMasOSError(f"{peer.name}: {result.failed} requests failed: {result.errors}")
                results[peer.name].append(result)
    rows = []
    for name, runs in results.items():
        best = max(runs, key=lambda r: r.output_throughput)
        latency = f"TTFT p50 {best.ttft.p50 * 1e3:.0f} ms, TPOT p50 {best.tpot.p50 * 1e3:.1f} ms"
        note = f"{max_concurrency} slots, {latency}"
        rows.append(Row(WORKLOAD, name, best.output_throughput, "tok/s", note))
    return rows, results
