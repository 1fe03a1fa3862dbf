"""Multi-LoRA serving through the official `openai` client against a live server: adapters named
`base:adapter` or by their store name, listed with their parent, several at once over one base model
(more than its slots), each answering as its merged model; unknown adapters are a clean 404."""

import asyncio
import dataclasses

import openai
import pytest

from llmasos import LLM, SamplingParams
from llmasos.serve.registry import RegistryConfig

from serving import ENGINE, LiveServer, server_config
from tiny_lora import save_tiny_lora

CHAT = [{"role": "user", "content": "Once upon a time"}]
ADAPTERS = ["tiny-a", "tiny-b", "tiny-c"]


@pytest.fixture(scope="module")
def home(store, tmp_path_factory):
    work = tmp_path_factory.mktemp("adapters")
    for seed, name in enumerate(ADAPTERS):
        save_tiny_lora(store, "tiny", name, seed=seed, work=work)
    return store.home


@pytest.fixture(scope="module")
def server(home):
    engine = dataclasses.replace(ENGINE, enable_lora=True, max_loras=2)
    with LiveServer(server_config(["tiny"], home, registry=RegistryConfig(["tiny"], engine))) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def merged_answer(name: str) -> str:
    """The adapter as the store loads it alone: merged into its base's weights."""
    llm = LLM(name, **vars(ENGINE))
    return llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=10))[0].outputs[0].text


def test_adapters_are_listed_with_their_parent(client):
    models = {m.id: m.model_extra.get("parent") for m in client.models.list()}
    assert models == {"tiny": None, "tiny-a": "tiny", "tiny-b": "tiny", "tiny-c": "tiny"}
    assert client.models.retrieve("tiny:tiny-b").model_extra["parent"] == "tiny"


def test_requests_naming_adapters_mixed_in_one_batch_answer_as_each_merged_model(server):
    names = ["tiny:tiny-a", "tiny-b", "tiny:tiny-c", "tiny", "tiny:tiny-a", "tiny-c"]  # 3 adapters, 2 slots
    aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

    async def ask(model: str) -> str:
        reply = await aclient.chat.completions.create(
            model=model, messages=CHAT, max_tokens=10, temperature=0
        )
        assert reply.model == model
        return reply.choices[0].message.content

    async def ask_all() -> list[str]:
        return await asyncio.gather(*(ask(name) for name in names))

    answers = asyncio.run(ask_all())
    expected = {name: merged_answer(name) for name in [*ADAPTERS, "tiny"]}
    assert answers == [expected[name.rpartition(":")[2]] for name in names]
    assert len(set(expected.values())) == 4  # each adapter does change the answer
    slots = server.state.registry.loaded["tiny"].served.engine.core.runner.lora
    assert len(slots.stats().loaded) == 2 and slots.stats().loads >= 3


def test_an_unknown_adapter_is_a_404_naming_it(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="tiny:nope", messages=CHAT, max_tokens=2)
    assert info.value.body["code"] == "model_not_found"
    assert "no LoRA adapter 'nope' in the store" in info.value.body["message"]


def test_adapter_names_without_enable_lora_say_how_to_turn_it_on(home):
    with LiveServer(server_config(["tiny"], home)) as plain:
        client = openai.OpenAI(base_url=f"{plain.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="--enable-lora"):
            client.chat.completions.create(model="tiny:tiny-a", messages=CHAT, max_tokens=2)
