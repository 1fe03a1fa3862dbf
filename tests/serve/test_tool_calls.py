"""Function calling through the official `openai` client and LangChain against a live server serving a
tiny random model with a Hermes/Qwen-style template: forced choices decode under the tools' grammar,
so the random model's calls are valid and its runs deterministic."""

import json

import jsonschema
import openai
import pytest

from llmasos.serve.keys import KeyStore
from llmasos.store import ModelStore

from serving import LiveServer, server_config
from tiny import TOOLS_CHAT_TEMPLATE, save_tiny_model

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Rome"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "now",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
    },
}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMASOS_HOME", str(tmp_path_factory.mktemp("home")))
        store = ModelStore()
        folder = save_tiny_model(tmp_path_factory.mktemp("tiny"), chat_template=TOOLS_CHAT_TEMPLATE)
        store.import_path(folder, "tiny", progress=False)
        with LiveServer(server_config(["tiny"], store.home)) as server:
            yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def ask(client, **options):
    options = {"max_tokens": 150, "temperature": 0, **options}
    return client.chat.completions.create(model="tiny", messages=CHAT, tools=TOOLS, **options)


def assert_valid(call):
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("choice", ["required", NAMED])
def test_forced_choices_return_valid_calls(client, choice):
    choice_ = ask(client, tool_choice=choice, parallel_tool_calls=False).choices[0]
    assert choice_.finish_reason == "tool_calls" and choice_.message.content is None
    (call,) = choice_.message.tool_calls
    assert_valid(call)
    if choice is NAMED:
        assert call.function.name == "get_weather"


def test_parallel_calls_are_each_valid_and_ids_distinct(client):
    # with parallel calls allowed the grammar lets the model go on to a next call after each one
    for seed in range(30):
        choice = ask(client, tool_choice="required", temperature=1.0, seed=seed, max_tokens=180).choices[0]
        calls = choice.message.tool_calls
        complete = calls if choice.finish_reason == "tool_calls" else calls[:-1]  # the last may be cut off
        for call in complete:
            assert_valid(call)
        assert len({c.id for c in calls}) == len(calls)
        if len(complete) > 1:
            return
    pytest.fail("no seed gave parallel calls")


@pytest.mark.parametrize("choice", ["required", NAMED])
def test_a_stream_sends_openai_tool_call_deltas_that_add_up_to_the_response(client, choice):
    whole = ask(client, tool_choice=choice, parallel_tool_calls=False).choices[0].message.tool_calls
    chunks = list(ask(client, tool_choice=choice, parallel_tool_calls=False, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    first, rest = deltas[0].tool_calls[0], [d.tool_calls[0] for d in deltas[1:]]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == whole[0].function.name
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in rest)  # the name once
    assert (
        first.function.arguments + "".join(d.function.arguments for d in rest) == whole[0].function.arguments
    )
    assert len(rest) > 1  # the arguments come as they are decoded, not at the end
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_a_tool_result_turn_renders_and_runs(client):
    now = {"type": "function", "function": {"name": "now"}}  # short calls: the tiny model has 256 positions
    first = ask(client, tool_choice=now, parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    messages = [
        *CHAT,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "12:00"},
    ]
    response = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=5, temperature=0, tools=TOOLS
    )
    assert response.choices[0].message.role == "assistant" and response.choices[0].message.content
    forced = client.chat.completions.create(
        model="tiny",
        messages=messages,
        temperature=0,
        tools=TOOLS,
        tool_choice=now,
        parallel_tool_calls=False,
    )
    assert forced.choices[0].finish_reason == "tool_calls"
    assert_valid(forced.choices[0].message.tool_calls[0])
    assert response.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result are in it


def test_tool_choice_none_gives_text(client):
    choice = ask(client, tool_choice="none", max_tokens=8).choices[0]
    assert choice.message.tool_calls is None and choice.message.content and choice.finish_reason == "length"


def test_bad_tool_choices_are_400s_naming_the_problem(client):
    with pytest.raises(openai.BadRequestError, match="'nowhere', which is not in tools"):
        ask(client, tool_choice={"type": "function", "function": {"name": "nowhere"}})


def test_a_forced_choice_with_a_response_format_still_calls(client):
    """The format shapes text; a forced reply is calls (tools/grammar.py), as OpenAI takes both."""
    choice = ask(client, tool_choice="required", response_format={"type": "json_object"}).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls


def test_langchain_bind_tools_gets_a_tool_call(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model="tiny", base_url=f"{server.url}/v1", api_key="unused", temperature=0, max_tokens=150
    )
    message = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("What is the weather in Paris?")
    (call,) = message.tool_calls
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], SCHEMAS["get_weather"])


def test_a_key_may_offer_only_its_allowed_tools(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path))
    store = ModelStore()
    store.import_path(
        save_tiny_model(tmp_path / "tiny", chat_template=TOOLS_CHAT_TEMPLATE), "tiny", progress=False
    )
    keys = KeyStore(store.home / "keys.json")
    _, weather = keys.add("weather", tools=["get_*"])
    _, plain = keys.add("plain", tools=[])
    with LiveServer(server_config(["tiny"], store.home)) as server:

        def client(secret):
            return openai.OpenAI(base_url=f"{server.url}/v1", api_key=secret, max_retries=0)

        with pytest.raises(openai.PermissionDeniedError, match="may not use the tool 'now'") as refused:
            ask(client(weather))
        assert refused.value.code == "tool_not_allowed" and refused.value.body["param"] == "tools"
        with pytest.raises(openai.PermissionDeniedError, match="'plain' may not use the tool 'get_weather'"):
            ask(client(plain), stream=True)
        allowed = client(weather).chat.completions.create(
            model="tiny", messages=CHAT, tools=[WEATHER], tool_choice=NAMED, max_tokens=150, temperature=0
        )
        assert_valid(allowed.choices[0].message.tool_calls[0])
        text = client(plain).chat.completions.create(model="tiny", messages=CHAT, max_tokens=3)
        assert text.choices[0].message.content is not None, "a key without tools still chats"
