"""The audit log: written as it goes, prompts only on request, whole lines even after a crash."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from llmasos.serve.audit import AuditLog

REQUEST = dict(
    key="alice",
    model="smollm2",
    route="/v1/chat/completions",
    status=200,
    prompt_tokens=12,
    completion_tokens=34,
    latency_s=0.5,
    request_id="req-1",
)


def wait_for_lines(path, count, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            return [json.loads(line) for line in lines]
        time.sleep(0.01)
    raise AssertionError(f"{path} has fewer than {count} lines after {timeout} s")


def test_records_are_written_while_the_log_is_open(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    try:
        log.log(**REQUEST, prompt="secret question")
        log.log(**{**REQUEST, "key": None, "status": 429, "request_id": "req-2"})
        first, second = wait_for_lines(path, 2)
    finally:
        log.close()
    assert {k: first[k] for k in REQUEST} == REQUEST
    assert first["time"].endswith("+00:00") and "T" in first["time"]
    assert "prompt" not in first and "secret question" not in path.read_text()
    assert second["key"] is None and second["status"] == 429 and second["request_id"] == "req-2"


def test_prompts_only_when_enabled(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, include_prompts=True)
    messages = [{"role": "user", "content": "héllo"}]
    log.log(**REQUEST, prompt=messages)
    log.close()
    assert wait_for_lines(path, 1)[0]["prompt"] == messages


def test_close_drains_the_queue_and_appends(tmp_path):
    path = tmp_path / "audit.jsonl"
    for run in range(2):
        log = AuditLog(path)
        for i in range(500):
            log.log(**{**REQUEST, "request_id": f"{run}-{i}"})
        log.close()
        log.close()
        assert len(path.read_text().splitlines()) == 500 * (run + 1)
    with pytest.raises(ValueError, match="closed"):
        log.log(**REQUEST)


def test_default_path_is_in_llmasos_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path / "home"))
    log = AuditLog()
    log.close()
    assert log.path == tmp_path / "home" / "audit.jsonl" and log.path.is_file()


def test_a_crash_leaves_complete_lines(tmp_path):
    path = tmp_path / "audit.jsonl"
    script = textwrap.dedent(f"""
        import os, time
        from llmasos.serve.audit import AuditLog
        log = AuditLog({str(path)!r}, include_prompts=True)
        for i in range(50):
            log.log(key="k", model="m", route="/v1/completions", status=200, prompt_tokens=1,
                    completion_tokens=1, latency_s=0.1, request_id=str(i), prompt="x" * 5000)
        deadline = time.monotonic() + 10
        while open({str(path)!r}).read().count("\\n") < 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        for i in range(50, 2000):  # still queued or being written when the process dies
            log.log(key="k", model="m", route="/v1/completions", status=200, prompt_tokens=1,
                    completion_tokens=1, latency_s=0.1, request_id=str(i), prompt="x" * 5000)
        os._exit(1)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert os.stat(path).st_mode & 0o077 == 0
    # Every line is whole, in order, but the last one, which the kill may have cut short.
    lines = path.read_text().splitlines(keepends=True)
    whole = [json.loads(line) for line in lines if line.endswith("\n")]
    assert len(whole) >= 50 and [r["request_id"] for r in whole] == [str(i) for i in range(len(whole))]
    assert all(line.endswith("\n") for line in lines[:-1])

    log = AuditLog(path)  # the server restarts: its first record is a line of its own
    log.log(**REQUEST)
    log.close()
    assert json.loads(path.read_text().splitlines()[-1])["request_id"] == "req-1"


def test_a_line_cut_short_is_ended_before_the_next_record(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_text('{"time": "2026-01-01T00:00:00.000+00:00", "key": "a"}\n{"time": "2026-01-')
    log = AuditLog(path)
    log.log(**REQUEST)
    log.close()
    lines = path.read_text().splitlines()
    assert lines[1] == '{"time": "2026-01-' and json.loads(lines[2])["request_id"] == "req-1"
    AuditLog(path).close()  # a file that ends whole is left as it is
    assert path.read_text().splitlines() == lines
