"""Replicas as Ray actors: `llmasos serve --replicas 2 --replica-executor ray` on a two-node Ray cluster
on loopback (tests/ray_cluster.py), a replica on each node behind the router. The openai client gets
answers through them, a replica's actor killed under load costs no request an answer or a clear error
and is restarted on its node, and after SIGTERM no actor and no replica server is left. A key's rate
limit holds once for both replicas, which admit through the router over the network (never the
router's file), with the router's secret in their environment, not on their command line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import openai
import psutil
import pytest
from test_replica_limits import RPM, call, key_row, routed
from test_replica_limits import all_ready as all_ready_with_key
from test_replica_limits import replica_rows as replica_rows_with_key
from test_router import (
    all_ready,
    ask,
    chat_and_stream_through,
    free_port,
    merged_samples,
    replica_rows,
    wait_for,
)

import ray_cluster  # first: it keeps Ray on loopback
from llmasos.serve.keys import KeyStore
from llmasos.serve.remote_limits import SECRET_ENV
from llmasos.store import ModelStore
from ray_cluster import actor_processes

from tiny import save_tiny_model

pytestmark = pytest.mark.slow
cluster = ray_cluster.cluster  # the fixture


def alive(pid: int) -> bool:
    return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


def test_two_ray_replicas_answer_survive_a_killed_actor_and_leave_nothing_behind(cluster, store, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "llmasos", *"serve tiny --replicas 2 --replica-executor ray".split()]
    command += ["--ray-address", cluster.address, "--ray-placement", "STRICT_SPREAD", "--port", str(port)]
    command += ["--kv-cache-gib", "0.01", "--shutdown-timeout", "10"]
    log = open(tmp_path / "router.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(command, env=dict(os.environ), stdout=log, stderr=log)
    try:
        wait_for(
            lambda: process.poll() is None and all_ready(url), what="both Ray replicas ready", log=tmp_path
        )
        before = replica_rows(url)
        assert len({r["node"] for r in before}) == 2  # STRICT_SPREAD: one replica on each node
        assert len(actor_processes("ReplicaActor")) == 2

        chat_and_stream_through(url)
        merged_samples(url)

        results: list[str] = []
        threads = [threading.Thread(target=ask, args=(url, i, results)) for i in range(8)]
        for t in threads:
            t.start()
        wait_for(lambda: replica_rows(url)[0]["in_flight"] > 0, what="requests on replica 0")
        actor = psutil.Process(before[0]["pid"]).ppid()  # the server is its actor's child
        assert actor in actor_processes("ReplicaActor")
        os.kill(actor, signal.SIGKILL)
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a request hung"
        print(sorted(results))
        assert len(results) == 8 and set(results) <= {"answer", "error replica_failed", "error no_replica"}
        assert "answer" in results

        wait_for(lambda: all_ready(url) and replica_rows(url)[0]["restarts"] == 1, what="replica 0 restarted")
        after = replica_rows(url)
        assert "Ray actor died" in (tmp_path / "router.log").read_text()
        assert after[0]["pid"] != before[0]["pid"] and after[0]["node"] == before[0]["node"]  # its bundle
        servers = [r["pid"] for r in after] + [before[0]["pid"]]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        answer = client.completions.create(
            model="tiny", prompt="Again", max_tokens=3, extra_body={"ignore_eos": True}
        )
        assert answer.usage.completion_tokens == 3

        process.send_signal(signal.SIGTERM)
        # uvicorn re-raises the SIGTERM once stopped; Ray's driver handler makes that exit status 15
        assert process.wait(timeout=90) in (0, signal.SIGTERM, -signal.SIGTERM)
        wait_for(lambda: not actor_processes("ReplicaActor"), what="no replica actor left")
        assert [p for p in servers if alive(p)] == [], "replica servers outlived the router"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        log.close()


def test_a_key_limit_holds_across_ray_replicas_admitting_through_the_router(cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path / "home"))  # its own keys: the test above has none
    ModelStore().import_path(save_tiny_model(tmp_path / "llama", "llama"), "tiny", progress=False)
    keys = KeyStore()
    ops, limited = keys.add("ops", admin=True)[1], keys.add("rpm", requests_per_minute=RPM)[1]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "llmasos", "serve", "tiny", "--replicas", "2"]
    command += ["--routing", "round-robin", "--replica-executor", "ray", "--ray-address", cluster.address]
    command += ["--ray-placement", "STRICT_SPREAD", "--port", str(port), "--kv-cache-gib", "0.01"]
    command += ["--shutdown-timeout", "10"]
    log = open(tmp_path / "router.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(command, env=dict(os.environ), stdout=log, stderr=log)
    try:
        wait_for(
            lambda: process.poll() is None and all_ready_with_key(url, ops),
            what="both Ray replicas ready",
            log=tmp_path,
        )
        rows = replica_rows_with_key(url, ops)
        assert len({r["node"] for r in rows}) == 2
        for row in rows:  # the network path: a URL, no file, and the secret only in the environment
            server = psutil.Process(row["pid"])
            argv, secret = server.cmdline(), server.environ()[SECRET_ENV]
            assert argv[argv.index("--shared-limits-url") + 1] == url and "--shared-limits" not in argv
            assert len(secret) >= 32 and not any(secret in arg for arg in argv)

        before = routed(url, ops)
        codes = [call(url, limited) for _ in range(2 * RPM)]
        assert [r.status_code for r in codes] == [200] * RPM + [429] * RPM
        assert [a - b for a, b in zip(routed(url, ops), before)] == [RPM, RPM]  # both replicas asked
        assert f"key 'rpm' is limited to {RPM} requests per minute" in codes[-1].json()["error"]["message"]
        row = key_row(url, ops, "rpm")
        assert (row["requests"], row["rate_limited"]) == (RPM, RPM)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=90)
        log.close()


def test_a_router_on_loopback_is_reported_unreachable_from_the_clusters_other_machines(monkeypatch, caplog):
    from llmasos.serve import ray_replicas
    from llmasos.serve.ray_replicas import RayLauncher, unreachable_machines

    nodes = ["10.0.0.5", "10.0.0.7", "10.0.0.7"]
    assert unreachable_machines("127.0.0.1", nodes, "10.0.0.5") == ["10.0.0.7"]
    # every node on this machine
    assert unreachable_machines("localhost", ["127.0.0.1", "10.0.0.5"], "10.0.0.5") == []
    assert unreachable_machines("0.0.0.0", nodes, "10.0.0.5") == []  # every interface: reachable
    assert unreachable_machines("10.0.0.5", nodes, "10.0.0.5") == []

    monkeypatch.setattr(ray_replicas.ray.util, "get_node_ip_address", lambda: "10.0.0.5")
    monkeypatch.setattr(
        ray_replicas.ray,
        "nodes",
        lambda: (
            [{"NodeManagerAddress": a, "Alive": True} for a in nodes]
            + [{"NodeManagerAddress": "10.0.0.9", "Alive": False}]
        ),
    )
    launcher = RayLauncher.__new__(RayLauncher)  # limits_url needs no placement group
    with caplog.at_level("WARNING", logger="llmasos.serve.ray_replicas"):
        assert launcher.limits_url("127.0.0.1", 8000) == "http://127.0.0.1:8000"
    assert "10.0.0.7" in caplog.text and "--host 0.0.0.0" in caplog.text and "10.0.0.9" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="llmasos.serve.ray_replicas"):
        assert launcher.limits_url("0.0.0.0", 8000) == "http://10.0.0.5:8000"
    assert caplog.text == ""
