"""`llmasos top` as a user runs it: a real terminal (pexpect) against a real server on loopback."""

import os
import re
import subprocess
import sys

import openai
import pexpect
import pytest

from llmasos.cli.dashboard import sparkline
from llmasos.serve.keys import KeyStore

from serving import LiveServer, server_config

LLMASOS = [sys.executable, "-c", "from llmasos.cli import main; main()"]


@pytest.fixture(scope="module")
def secret(store):
    return KeyStore(store.home / "keys.json").add("ops", admin=True, token_budget=5000)[1]


@pytest.fixture(scope="module")
def server(store, secret):
    with LiveServer(server_config(["tiny"], store.home)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=secret, max_retries=0)
        for i in range(3):
            client.completions.create(model="tiny", prompt=f"request {i} to watch", max_tokens=5)
        yield server


def env(server, secret=None) -> dict:
    environ = {**os.environ, "LLMASOS_HOST": server.url.removeprefix("http://"), "COLUMNS": "140"}
    environ.pop("LLMASOS_API_KEY", None)
    return {**environ, "LLMASOS_API_KEY": secret} if secret else environ


def test_one_frame_shows_the_server_and_loads_no_torch(server, secret):
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *LLMASOS[1:], "top", "--once"],
        env=env(server, secret),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "httpx" in imported and "rich.table" in imported  # the importtime lines are there
    assert not {m for m in imported if m.split(".")[0] in ("torch", "transformers")}
    frame = result.stdout
    assert re.search(r"tiny\s+[\d.]+ MB\s+0\s+0\s+0\s", frame)  # the model, idle
    assert re.search(r"ops\s+3\s+\d+\s+0\s+\d+ of 5000", frame)  # the key's 3 requests and its budget
    assert "3 admitted" in frame and "TTFT" in frame


def test_the_live_dashboard_redraws_and_quits_on_q(server, secret):
    top = pexpect.spawn(
        LLMASOS[0], [*LLMASOS[1:], "top"], env=env(server, secret), timeout=60, dimensions=(50, 140)
    )
    top.expect_exact("tiny")
    top.expect(r"ops\s+3\s+")  # the key's row, with its numbers
    top.expect_exact("up ")  # a second frame: the dashboard goes on drawing
    top.send("q")
    top.expect(pexpect.EOF)
    top.close()
    assert top.exitstatus == 0


def test_errors_are_one_line(server):
    refused = subprocess.run([*LLMASOS, "top", "--once"], env=env(server), capture_output=True, text=True)
    assert refused.returncode == 1 and "401" in refused.stderr and "Traceback" not in refused.stderr
    nobody = {**env(server), "LLMASOS_HOST": "127.0.0.1:9"}
    missing = subprocess.run([*LLMASOS, "top"], env=nobody, capture_output=True, text=True)
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1
    assert "127.0.0.1:9" in missing.stderr and "LLMASOS_HOST" in missing.stderr
    assert "llmasos serve" in missing.stderr


def test_sparkline_scales_to_the_peak():
    assert sparkline([0, 1, 2, 4]) == "▁▃▅█"
    assert sparkline([0, 0, 0]) == "▁▁▁" and sparkline([]) == ""
