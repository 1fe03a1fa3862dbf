"""Rate limits hold across the replicas of one server: `llmasos serve --replicas 2 --routing round-robin`
on loopback, keys with requests and tokens per minute; the requests alternate between the replicas,
yet a key gets its limit once, not once per replica, and keeps it when a replica is killed and
restarted. The merged /api/stats counts every admitted and refused call."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest
from test_router import free_port, wait_for

from llmasos.serve.keys import KeyStore
from llmasos.store import ModelStore

from tiny import save_tiny_model

RPM, TPM = 5, 35
PROMPT, MAX_TOKENS = [1, 2, 3, 4], 6  # 10 tokens a call, estimated and charged: 3 calls fit in TPM


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(url, {key name: secret}, router process) with both replicas ready."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMASOS_HOME", str(home))
        ModelStore().import_path(save_tiny_model(tmp_path_factory.mktemp("llama"), "llama"), "tiny")
        keys = KeyStore()
        secrets = {
            "ops": keys.add("ops", admin=True)[1],
            "rpm": keys.add("rpm", requests_per_minute=RPM)[1],
            "tpm": keys.add("tpm", tokens_per_minute=TPM)[1],
        }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "llmasos", *"serve tiny --replicas 2 --routing round-robin".split()]
    command += ["--port", str(port), "--kv-cache-gib", "0.01", "--shutdown-timeout", "10"]
    log = open(home / "router.log", "w")  # noqa: SIM115 - closed after the module
    process = subprocess.Popen(command, env={**os.environ, "LLMASOS_HOME": str(home)}, stdout=log, stderr=log)
    try:
        wait_for(
            lambda: process.poll() is None and all_ready(url, secrets["ops"]),
            what="both replicas ready",
            log=home,
        )
        yield url, secrets, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
        log.close()


def call(url: str, secret: str) -> httpx.Response:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "ignore_eos": True}
    return httpx.post(
        f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {secret}"}, timeout=60
    )


def replica_rows(url: str, ops: str) -> list[dict]:
    return httpx.get(f"{url}/api/ps", headers={"Authorization": f"Bearer {ops}"}, timeout=30).json()[
        "replicas"
    ]


def all_ready(url: str, ops: str) -> bool:
    try:
        return all(r["healthy"] for r in replica_rows(url, ops))
    except (httpx.HTTPError, KeyError, ValueError):
        return False


def routed(url: str, ops: str) -> list[int]:
    return [r["routed"] for r in replica_rows(url, ops)]


def key_row(url: str, ops: str, name: str) -> dict:
    stats = httpx.get(f"{url}/api/stats", headers={"Authorization": f"Bearer {ops}"}, timeout=30).json()
    return next(row for row in stats["keys"] if row["key"] == name)


@pytest.mark.slow
def test_a_request_limit_holds_across_replicas_and_through_a_restart(server):
    url, secrets, _ = server
    before = routed(url, secrets["ops"])
    codes = [call(url, secrets["rpm"]) for _ in range(2 * RPM)]
    assert [r.status_code for r in codes] == [200] * RPM + [429] * RPM
    after = routed(url, secrets["ops"])
    assert [a - b for a, b in zip(after, before)] == [RPM, RPM]  # both replicas took their share
    refusal = codes[-1].json()["error"]
    assert refusal["code"] == "rate_limit_exceeded"
    assert f"key 'rpm' is limited to {RPM} requests per minute; retry in" in refusal["message"]
    assert 1 <= int(codes[-1].headers["retry-after"]) <= 60
    row = key_row(url, secrets["ops"], "rpm")
    assert (row["requests"], row["rate_limited"]) == (RPM, RPM)

    os.kill(replica_rows(url, secrets["ops"])[0]["pid"], signal.SIGKILL)
    wait_for(
        lambda: all_ready(url, secrets["ops"]) and replica_rows(url, secrets["ops"])[0]["restarts"] == 1,
        what="replica 0 restarted",
    )
    assert [call(url, secrets["rpm"]).status_code for _ in range(2)] == [429, 429]  # its window kept


@pytest.mark.slow
def test_a_token_limit_holds_across_replicas(server):
    url, secrets, _ = server
    codes = [call(url, secrets["tpm"]).status_code for _ in range(6)]
    assert codes == [200, 200, 200, 429, 429, 429]  # 3 x 10 tokens; one replica alone would admit 3 more
    refusal = call(url, secrets["tpm"]).json()["error"]
    assert f"key 'tpm' is limited to {TPM} tokens per minute; retry in" in refusal["message"]
    row = key_row(url, secrets["ops"], "tpm")
    assert (row["requests"], row["tokens"], row["rate_limited"]) == (3, 30, 4)
