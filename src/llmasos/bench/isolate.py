"""One system of a benchmark in a fresh Python process of its own, so that one native library
(llama.cpp, torch, LLMasOS's compiled kernels) can neither crash nor slow another: a llama.cpp
built for one CPU segfaulted in the process that already held torch and LLMasOS's kernels.

The parent sends the work as JSON on the child's stdin; the child (`python -m
llmasos.bench.isolate TARGET RESULTS`) calls TARGET, a "module:function" path, on it and appends
each result the function yields to the RESULTS file as one JSON line, flushed at once, so that the
results finished before a crash still count. A child that dies by a signal, exits non-zero or runs
past its time is reported as such (ChildRun.failure), with the last lines it printed, never raised.

A subprocess rather than multiprocessing: a child killed by a signal is a plain exit status, it
inherits none of the parent's loaded libraries or threads, and its output can be kept for the report.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from llmasos.errors import LLMasOSError

TAIL_LINES = 20  # of the child's output, kept for the report of a failure
FATAL_FRAMES = 3  # the innermost frames of a crash, in the report


@dataclass
class ChildRun:
    results: list[dict]  # what the child yielded, in order, up to its end (or its crash)
    failure: str | None  # None: it exited 0; else "crashed (SIGSEGV)", "failed (exit 1)", "timed out ..."
    tail: list[str]  # the last lines of its stdout and stderr together
    fatal: list[str] = field(default_factory=list)  # faulthandler's report of a crash, if any

    def last_lines(self) -> str:
        """What the child said last, on one line: for a crash, faulthandler's error and the
        innermost frames it was in (its stack is printed most recent call first, so the last lines
        would be the outermost); else its last lines (an exception's message)."""
        if self.fatal:
            frames = [line.strip() for line in self.fatal[1:] if line.strip().startswith("File ")]
            return " / ".join([self.fatal[0].strip(), *frames[:FATAL_FRAMES]])
        return last_lines(self.tail)


def last_lines(lines: list[str], count: int = 3) -> str:
    """The last non-empty lines of a process's output, on one line (for a table's notes)."""
    return " / ".join([line.strip() for line in lines if line.strip()][-count:])


def load_object(spec: str):
    """The object a "module:name" path names (the child's target, a benchmark's system class)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise LLMasOSError(f"'{spec}' is not a 'module:name' path (e.g. llmasos.bench.cpu:LlamaCppSystem)")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise LLMasOSError(f"cannot load '{spec}': {e}") from e


def describe_exit(returncode: int) -> str | None:
    """None for success, else what happened: 'crashed (SIGSEGV)' for a signal, 'failed (exit N)'."""
    if returncode == 0:
        return None
    if returncode < 0:
        try:
            return f"crashed ({signal.Signals(-returncode).name})"
        except ValueError:
            return f"crashed (signal {-returncode})"
    return f"failed (exit {returncode})"


def child_env() -> dict[str, str]:
    """The parent's environment, with its import path: the child imports the same llmasos (and any
    module a target names) as the parent, however the parent found them."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def run_isolated(target: str, payload: dict, timeout: float | None = None) -> ChildRun:
    """Run `target(payload)` in a fresh process and collect what it yields. Its output is passed on
    to this process's stderr as it comes (progress of a long benchmark) and its tail is kept."""
    with tempfile.TemporaryDirectory(prefix="llmasos-bench-") as tmp:
        results_path = Path(tmp) / "results.jsonl"
        command = [sys.executable, "-X", "faulthandler", "-m", __name__, target, str(results_path)]
        child = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # one stream: a crash's last words follow what it was doing
            text=True,
            errors="replace",
            env=child_env(),
            start_new_session=True,  # a group of its own: a timeout stops whatever it started too
        )
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        fatal: list[str] = []
        reader = threading.Thread(target=_relay, args=(child.stdout, tail, fatal), daemon=True)
        reader.start()
        try:
            try:
                child.stdin.write(json.dumps(payload))
                child.stdin.close()
            except BrokenPipeError:  # it died before reading its work: its exit status says why
                pass
            try:
                failure = describe_exit(child.wait(timeout=timeout))
            except subprocess.TimeoutExpired:
                failure = f"timed out after {timeout:g} s"
        finally:  # past its time, or this process interrupted (Ctrl-C): the child must not outlive it
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        reader.join()
        results = _read_results(results_path)
    return ChildRun(results, failure, list(tail), fatal)


def _relay(stream, tail: deque[str], fatal: list[str]) -> None:
    """Pass the child's output on as it comes; keep its tail and, from faulthandler's "Fatal Python
    error" line on, the first lines of a crash report."""
    for line in stream:
        tail.append(line.rstrip("\n"))
        if (fatal or line.startswith("Fatal Python error")) and len(fatal) < 2 * FATAL_FRAMES + 4:
            fatal.append(line.rstrip("\n"))
        sys.stderr.write(line)
        sys.stderr.flush()


def _read_results(path: Path) -> list[dict]:
    """Every complete line: a crash in the middle of a write leaves a last line without its newline."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]


def _child(target: str, results: str) -> None:
    function = load_object(target)
    payload = json.load(sys.stdin)
    with open(results, "a") as out:
        for result in function(payload):
            out.write(json.dumps(result) + "\n")
            out.flush()


if __name__ == "__main__":
    _child(*sys.argv[1:])
