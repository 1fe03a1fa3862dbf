"""Speculative decoding as users see it: `llmasos serve tiny --speculative ngram` as its own process on
loopback, an input-grounded request, then its /metrics counters, its /api/ps row and `llmasos ps`."""

import os
import subprocess
import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_serve_ops import socket_port

from serving import serve_process

# input-grounded: a run of token ids repeated, so that prompt lookup finds drafts in the prompt
PROMPT = [17, 240, 33, 81, 5, 199, 64, 12, 301, 77] * 4 + [17, 240]
NEW_TOKENS = 48


def spec_counters(url: str) -> dict[str, float]:
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
    return {
        s.name.removeprefix("llmasos:spec_decode_"): s.value
        for f in families
        for s in f.samples
        if s.name.startswith("llmasos:spec_decode_")
        and s.name.endswith("_total")
        and s.labels["model_name"] == "tiny"
    }


@pytest.mark.slow
def test_drafts_and_acceptances_reach_metrics_and_ps(store):
    with socket_port() as port:
        pass
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "LLMASOS_HOME": str(store.home),
        "LLMASOS_HOST": f"127.0.0.1:{port}",
        "COLUMNS": "200",
    }
    with serve_process(["tiny", "--kv-cache-gib", "0.01", "--speculative", "ngram"], env, port):
        before = spec_counters(url)
        assert before == {"num_drafts_total": 0, "num_draft_tokens_total": 0, "num_accepted_tokens_total": 0}
        assert httpx.get(f"{url}/api/ps").json()["models"][0]["speculative"]["num_drafts"] == 0

        body = {
            "model": "tiny",
            "prompt": PROMPT,
            "max_tokens": NEW_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
        }
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()
        assert answer["usage"]["completion_tokens"] == NEW_TOKENS

        after = spec_counters(url)
        drafts, drafted = after["num_drafts_total"], after["num_draft_tokens_total"]
        accepted = after["num_accepted_tokens_total"]
        assert drafts > 0 and drafts <= drafted and accepted <= drafted
        # the first token comes from the prefill; each verify step gives its kept drafts and one more
        assert drafts + accepted <= NEW_TOKENS - 1

        spec = httpx.get(f"{url}/api/ps").json()["models"][0]["speculative"]
        assert (spec["num_drafts"], spec["num_draft_tokens"], spec["num_accepted_tokens"]) == (
            drafts,
            drafted,
            accepted,
        )
        assert spec["acceptance_rate"] == pytest.approx(accepted / drafted)
        assert spec["tokens_per_forward"] == pytest.approx(1 + accepted / drafts)

        ps = subprocess.run([sys.executable, "-m", "llmasos", "ps"], env=env, capture_output=True, text=True)
        assert ps.returncode == 0, ps.stderr
        assert "SPECULATION" in ps.stdout
        assert f"{accepted / drafted:.0%} accepted, {1 + accepted / drafts:.2f} tok/forward" in ps.stdout
