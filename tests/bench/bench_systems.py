"""Stand-in systems for test_bench_cpu.py. The benchmark builds each in a process of its own from
its "bench_systems:Class" path (the test folder is on that process's import path, as on the test's):
one that records the token ids it is sent, one that segfaults (a real native crash, through ctypes),
and targets for the process runner itself."""

from __future__ import annotations

import ctypes
import json
import os
import time
from pathlib import Path


class Recorder:
    """Answers every call at once with made-up times, and appends each call and its token ids to
    $BENCH_RECORD_DIR/<name>.jsonl: what this system's process was sent."""

    name = "recorder"

    def __init__(self, workload):
        self.log = Path(os.environ["BENCH_RECORD_DIR"]) / f"{self.name}.jsonl"

    def _record(self, call: str, ids) -> None:
        with open(self.log, "a") as f:
            f.write(json.dumps([call, ids]) + "\n")

    def decode(self, ids: list[int], n: int) -> tuple[int, float, float]:
        self._record("decode", ids)
        first = time.perf_counter()
        return n, first, first + n / 100

    def prefill(self, ids: list[int]) -> float:
        self._record("prefill", ids)
        return len(ids) / 1000

    def batch(self, prompts: list[list[int]], n: int) -> tuple[int, float]:
        self._record("batch", prompts)
        return len(prompts) * n, 1.0


class Ours(Recorder):
    name = "LLMasOS"


class Peer(Recorder):
    name = "peer"


def segfault() -> None:
    ctypes.string_at(0)  # reads address 0: SIGSEGV in native code, as a bad native library would


class SegfaultsAtOnce(Recorder):
    """Dies in its first call (the warm-up): no figure at all."""

    name = "crasher"

    def decode(self, ids: list[int], n: int) -> tuple[int, float, float]:
        segfault()


class SegfaultsInC2(Recorder):
    """Finishes C1, then dies in C2's first prompt."""

    name = "crasher"

    def prefill(self, ids: list[int]) -> float:
        segfault()


def sleeps(payload: dict):
    time.sleep(600)
    yield {}


def fails(payload: dict):
    yield {"first": payload["value"]}
    raise ValueError(f"no second result for {payload['value']}")
