"""A bounded load test on loopback: 200 concurrent streaming requests against one tiny model.

Every response must be complete and well-formed, nothing lost, every KV block freed afterwards,
and the server's metrics must agree with what the clients were sent."""

import asyncio
import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmasos.store import ModelStore

from serving import LiveServer, server_config
from tiny import save_tiny_model

NUM_REQUESTS = 200
MAX_TOKENS = 16


async def one_stream(client: httpx.AsyncClient, i: int) -> dict:
    body = {
        "model": "tiny",
        "prompt": f"Request number {i} says",
        "max_tokens": MAX_TOKENS,
        "temperature": 0.8,
        "seed": i,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        events = [line[len("data: ") :] async for line in response.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all("error" not in chunk for chunk in chunks)
    choices = [chunk["choices"][0] for chunk in chunks if chunk["choices"]]
    assert [c["finish_reason"] for c in choices][-1] == "length"
    assert all(c["finish_reason"] is None for c in choices[:-1])
    assert len({chunk["id"] for chunk in chunks}) == 1
    return {"text": "".join(c["text"] for c in choices), "usage": chunks[-1]["usage"]}


@pytest.mark.slow
def test_200_concurrent_streams(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMASOS_HOME", str(home))
        ModelStore().import_path(save_tiny_model(tmp_path_factory.mktemp("llama"), "llama"), "tiny")
        with LiveServer(server_config(["tiny"], home)) as server:

            async def main():
                limits = httpx.Limits(max_connections=NUM_REQUESTS)
                async with httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits) as client:
                    return await asyncio.gather(*(one_stream(client, i) for i in range(NUM_REQUESTS)))

            results = asyncio.run(main())
            text = httpx.get(f"{server.url}/metrics").text
            engine = server.state.registry.loaded["tiny"].served.engine
            stats = engine.stats()
            assert not engine.requests and stats.num_running == stats.num_waiting == 0
            assert stats.kv_cache_usage == 0  # every block back in the free pool

    assert len(results) == NUM_REQUESTS
    assert all(r["usage"]["completion_tokens"] == MAX_TOKENS for r in results)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    label = (("model_name", "tiny"),)
    assert samples[("llmasos:request_success_total", (("finished_reason", "length"), *label))] == NUM_REQUESTS
    assert samples[("llmasos:generation_tokens_total", label)] == NUM_REQUESTS * MAX_TOKENS
    assert samples[("llmasos:prompt_tokens_total", label)] == sum(
        r["usage"]["prompt_tokens"] for r in results
    )
    assert samples[("llmasos:e2e_request_latency_seconds_count", label)] == NUM_REQUESTS
    assert samples[("llmasos:inter_token_latency_seconds_count", label)] == NUM_REQUESTS * (MAX_TOKENS - 1)
