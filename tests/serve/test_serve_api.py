"""The OpenAI-compatible API through the official `openai` client (sync, async, streaming) against a
live server on 127.0.0.1 serving a tiny model: every endpoint and parameter the server takes."""

import asyncio
import json

import jsonschema
import numpy as np
import openai
import pytest

from llmasos import LLM, SamplingParams
from llmasos.runtime.embedder import SentenceEmbedder
from llmasos.store import ModelStore

from serving import ENGINE, LiveServer, server_config
from tiny import save_tiny_bert

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Once upon a time"}]


@pytest.fixture(scope="module")
def home(store, tmp_path_factory):
    store.import_path(save_tiny_bert(tmp_path_factory.mktemp("bert"), pooling="cls"), "tiny-bert")
    return store.home


@pytest.fixture(scope="module")
def server(home):
    with LiveServer(server_config(["tiny", "tiny-bert"], home)) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def offline(home):
    """The same model through the Python API: what the server must answer, token for token."""
    return LLM("tiny", **vars(ENGINE))


def test_models_are_listed_and_retrieved(client):
    assert [m.id for m in client.models.list()] == ["tiny", "tiny-bert"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("nope")
    assert info.value.body["code"] == "model_not_found" and "GET /v1/models" in info.value.body["message"]


def test_chat_completion_matches_the_engine(client, offline):
    response = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0)
    expected = offline.chat(CHAT, SamplingParams(temperature=0, max_tokens=12))[0]
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.outputs[0].text
    assert choice.finish_reason == expected.outputs[0].finish_reason
    assert response.object == "chat.completion" and response.model == "tiny"
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_chat_stream_adds_up_to_the_whole_answer(client):
    whole = client.chat.completions.create(
        model="tiny", messages=CHAT, max_completion_tokens=16, temperature=0
    ).choices[0]
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=CHAT,
            max_completion_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert all(c.usage is None for c in chunks[:-1])


def test_streamed_completion_logprobs_add_up_to_the_whole_response(client):
    """Stream chunks carry each choice's new tokens (the engine's delta outputs): their logprobs and
    text offsets continue where the previous chunk's ended, as in the non-streamed response."""
    kwargs = dict(
        model="tiny", prompt=["Once", "Hello"], n=2, max_tokens=6, temperature=0, logprobs=2, echo=True
    )
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True))
    for choice in whole.choices:
        pieces = [c for chunk in chunks for c in chunk.choices if c.index == choice.index]
        assert "".join(p.text for p in pieces) == choice.text
        for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            streamed = [x for p in pieces if p.logprobs for x in getattr(p.logprobs, field)]
            assert streamed == getattr(choice.logprobs, field), field
        assert [p.finish_reason for p in pieces if p.finish_reason] == [choice.finish_reason]


def test_completions_with_several_prompts_n_echo_and_stop(client, offline):
    response = client.completions.create(
        model="tiny",
        prompt=["Once upon a time", "def add(a, b):"],
        n=2,
        max_tokens=8,
        temperature=0,
        echo=True,
    )
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    expected = offline.generate(
        ["Once upon a time", "def add(a, b):"], SamplingParams(temperature=0, max_tokens=8)
    )
    for choice in response.choices:
        prompt = ["Once upon a time", "def add(a, b):"][choice.index // 2]
        assert choice.text == prompt + expected[choice.index // 2].outputs[0].text
    assert response.usage.completion_tokens == 4 * 8

    full = expected[0].outputs[0].text
    stop = full[3:5]
    stopped = client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].text == full[: full.index(stop)] and stopped.choices[0].finish_reason == "stop"


def test_token_id_prompts_and_vllm_extensions(client, offline):
    ids = offline.tokenizer.encode("Hello there")
    response = client.completions.create(
        model="tiny", prompt=ids, max_tokens=6, temperature=0, extra_body={"ignore_eos": True, "top_k": 5}
    )
    expected = offline.generate([ids], SamplingParams(temperature=0, max_tokens=6))[0]
    assert response.choices[0].text == expected.outputs[0].text
    assert response.usage.prompt_tokens == len(ids)


def test_seed_penalties_and_user(client):
    kwargs = dict(model="tiny", prompt="Once", max_tokens=10, temperature=1.0, top_p=0.9, seed=7, user="u1")
    first = client.completions.create(**kwargs, presence_penalty=0.5, frequency_penalty=0.5)
    again = client.completions.create(**kwargs, presence_penalty=0.5, frequency_penalty=0.5)
    assert first.choices[0].text == again.choices[0].text
    other = [client.completions.create(**{**kwargs, "seed": s}).choices[0].text for s in range(8, 12)]
    assert len(set(other)) > 1  # sampling really samples


def test_logprobs(client):
    chat = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and "".join(t.token for t in content) == chat.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 3 and token.logprob <= 0
        assert token.top_logprobs[0].logprob == max(t.logprob for t in token.top_logprobs)
        assert token.logprob == token.top_logprobs[0].logprob  # greedy picks the most likely token

    completion = client.completions.create(
        model="tiny", prompt="Once", max_tokens=4, temperature=0, logprobs=2
    )
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0 and "".join(logprobs.tokens) == completion.choices[0].text


SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["small", "large"]}},
    "required": ["ok", "size"],
    "additionalProperties": False,
}


def test_response_format_json_schema_and_json_object(client):
    for seed in range(3):
        response = client.chat.completions.create(
            model="tiny",
            messages=CHAT,
            max_tokens=64,
            temperature=1.0,
            seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}},
        )
        jsonschema.validate(json.loads(response.choices[0].message.content), SCHEMA)
        assert response.choices[0].finish_reason == "stop"
    as_object = client.chat.completions.create(
        model="tiny",
        messages=CHAT,
        max_tokens=200,
        temperature=0.7,
        seed=1,
        response_format={"type": "json_object"},
        extra_body={"min_p": 0.2},
    )
    if as_object.choices[0].finish_reason == "stop":  # a random model may use up max_tokens inside a string
        assert isinstance(json.loads(as_object.choices[0].message.content), dict)
    else:
        assert as_object.choices[0].message.content.startswith("{")


def test_async_clients_share_the_batch(server, client):
    async def main():
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

        async def one(i):
            stream = await aclient.completions.create(
                model="tiny", prompt=f"Story {i}:", max_tokens=12, temperature=0, stream=True
            )
            return "".join([chunk.choices[0].text async for chunk in stream])

        async with aclient:
            return await asyncio.gather(*(one(i) for i in range(8)))

    texts = asyncio.run(main())
    for i, text in enumerate(texts):
        alone = client.completions.create(model="tiny", prompt=f"Story {i}:", max_tokens=12, temperature=0)
        assert text == alone.choices[0].text


def test_embeddings_of_a_sentence_embedding_model(client, home):
    texts = ["The cat sat on the mat.", "A dog", "def add(a, b): return a + b"]
    expected = SentenceEmbedder.from_dir(ModelStore().resolve("tiny-bert"), device="cpu").embed_with_usage(
        texts
    )
    as_base64 = client.embeddings.create(model="tiny-bert", input=texts)  # the client asks for base64
    as_floats = client.embeddings.create(model="tiny-bert", input=texts, encoding_format="float")
    for response in (as_base64, as_floats):
        assert [d.index for d in response.data] == [0, 1, 2]
        np.testing.assert_allclose([d.embedding for d in response.data], expected.vectors, atol=1e-6)
        assert response.usage.prompt_tokens == expected.prompt_tokens
    short = client.embeddings.create(model="tiny-bert", input="A dog", dimensions=8, encoding_format="float")
    vector = np.array(short.data[0].embedding)
    assert vector.shape == (8,) and np.isclose(np.linalg.norm(vector), 1.0, atol=1e-6)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-bert", messages=CHAT)
    assert "/v1/embeddings" in info.value.body["message"]


def test_embeddings_of_a_generative_model_come_from_its_engine(client, offline):
    texts = ["Once upon a time", "Hello there"]
    response = client.embeddings.create(model="tiny", input=texts, encoding_format="float")
    np.testing.assert_allclose([d.embedding for d in response.data], offline.embed(texts), atol=1e-5)
    assert response.usage.prompt_tokens == sum(len(offline.tokenizer.encode(t)) for t in texts)


def test_agents_are_named_by_metadata_a_header_or_user_and_shown_in_ps(client, server):
    import httpx

    kwargs = dict(model="tiny", max_tokens=3, temperature=0)
    client.chat.completions.create(messages=CHAT, extra_body={"metadata": {"agent": "planner"}}, **kwargs)
    client.chat.completions.create(messages=CHAT, extra_headers={"X-Agent": "coder"}, **kwargs)
    client.completions.create(prompt="Once", user="writer", **kwargs)
    row = next(r for r in httpx.get(f"{server.url}/v1/ps").json()["models"] if r["model"] == "tiny")
    agents = row["agents"]
    assert {"planner", "coder", "writer"} <= set(agents)
    assert all(agents[a]["turns"] == 1 and agents[a]["attained_service"] > 0 for a in ("planner", "coder"))
