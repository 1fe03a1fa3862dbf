"""The prefix cache that survives restarts, through the doors users hold: `LLM` in a new process, and a
server stopped and started again over the same folder (its /metrics, /api/ps and `llmasos ps`)."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmasos import LLM, SamplingParams
from llmasos.serve.registry import RegistryConfig

from serving import ENGINE, LiveServer, server_config

PROMPT = list(range(10, 74))  # token ids: 64, so 15 full blocks of 4 before the last token


@pytest.mark.slow
def test_a_new_llm_over_the_same_home_reads_the_prefix_a_finished_process_wrote(store, tmp_path):
    settings = {"device": "cpu", "block_size": 4, "num_kv_blocks": 256, "kv_disk_cache_gb": 0.01,
                "kv_disk_cache_dir": str(tmp_path)}  # fmt: skip
    first_process = textwrap.dedent(f"""
        import json
        from llmasos import LLM, SamplingParams
        out = LLM("tiny", **{settings!r}).generate(
            [{PROMPT!r}], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        )[0]
        print(json.dumps([out.outputs[0].token_ids, out.num_cached_tokens]))
    """)  # it exits without a word about the cache: what it queued is written at exit
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run([sys.executable, "-c", first_process], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    first_tokens, first_cached = json.loads(done.stdout.splitlines()[-1])
    assert first_cached == 0

    llm = LLM("tiny", **settings)
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == first_tokens
    assert out.num_cached_tokens == 60, "only the last partial block is computed"
    assert llm.engine.stats().prefix_disk_hit_tokens == 60


def metric(url: str, name: str) -> float:
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
    return sum(
        s.value for f in families for s in f.samples if s.name == name and s.labels["model_name"] == "tiny"
    )


@pytest.mark.slow
def test_a_restarted_server_answers_from_the_disk_cache_and_reports_it(store, tmp_path):
    engine = dataclasses.replace(ENGINE, kv_disk_cache_gb=0.01, kv_disk_cache_dir=str(tmp_path))
    config = server_config(["tiny"], store.home, registry=RegistryConfig(["tiny"], engine))
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    with LiveServer(config) as server:  # stopping it unloads the model: its queued blocks are written
        first = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    with LiveServer(config) as server:
        url = server.url
        again = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
        assert again["choices"][0]["text"] == first["choices"][0]["text"]
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 60  # 15 blocks of 4
        row = httpx.get(f"{url}/api/ps").json()["models"][0]
        assert row["prefix_disk_hit_tokens"] == 60 and row["kv_disk_cache_bytes"] > 0
        assert metric(url, "llmasos:prefix_cache_disk_hits_total") == 60
        assert metric(url, "llmasos:kv_disk_cache_bytes") == row["kv_disk_cache_bytes"]
        env = {**os.environ, "LLMASOS_HOST": url.removeprefix("http://"), "COLUMNS": "200"}  # one line a row
        ps = subprocess.run([sys.executable, "-m", "llmasos", "ps"], env=env, capture_output=True, text=True)
        assert ps.returncode == 0 and "KV ON DISK" in ps.stdout and "60 tok hit" in ps.stdout
