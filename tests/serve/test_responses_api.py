"""The Responses API through the official `openai` client against a live server with keys, serving a
tiny model: text answers that match the chat path's, OpenAI's typed stream events, stored responses
chained by previous_response_id, and one key never seeing another's responses."""

import asyncio
import json
import typing
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from openai.types.responses import ResponseStreamEvent
from pydantic import BaseModel

import agents
from llmasos.serve.keys import KeyStore
from llmasos.serve.stored_responses import ResponseStore, StoredResponse
from llmasos.store import ModelStore

from serving import LiveServer, server_config
from tiny import TOOLS_CHAT_TEMPLATE, save_tiny_model

SETTINGS = {"model": "tiny", "temperature": 0, "max_output_tokens": 12}
TOOL_SETTINGS = {**SETTINGS, "max_output_tokens": 150}  # room for a forced call to close
WEATHER = {
    "type": "function",
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
    "strict": True,
}
TIME = {
    "type": "function",
    "name": "now",
    "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
}
SCHEMAS = {tool["name"]: tool["parameters"] for tool in (WEATHER, TIME)}
QUESTION = "What is the weather in Paris?"
EVENT_TYPES = {  # each stream event's class in the openai package, by its type
    typing.get_args(cls.model_fields["type"].annotation)[0]: cls
    for cls in typing.get_args(typing.get_args(ResponseStreamEvent)[0])
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server with two keys, serving a tiny model whose template renders tools and <tool_call>s."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMASOS_HOME", str(tmp_path_factory.mktemp("home")))
        store = ModelStore()
        folder = save_tiny_model(tmp_path_factory.mktemp("tiny"), chat_template=TOOLS_CHAT_TEMPLATE)
        store.import_path(folder, "tiny", progress=False)
        keys = KeyStore(store.home / "keys.json")
        secrets = {name: keys.add(name)[1] for name in ("alice", "bob")}
        with LiveServer(server_config(["tiny"], store.home)) as server:
            server.secrets = secrets
            yield server


def client_of(server, name: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.secrets[name], max_retries=0)


@pytest.fixture(scope="module")
def alice(server):
    return client_of(server, "alice")


@pytest.fixture(scope="module")
def bob(server):
    return client_of(server, "bob")


def test_text_response_is_the_chat_answer(alice):
    response = alice.responses.create(instructions="Be brief.", input="Once upon a time", **SETTINGS)
    chat = alice.chat.completions.create(
        model="tiny",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Once upon a time"},
        ],
        temperature=0,
        max_tokens=12,
    )
    choice = chat.choices[0]
    assert response.object == "response" and response.id.startswith("resp_")
    assert [item.type for item in response.output] == ["message"]
    assert response.output_text == choice.message.content
    stopped_early = choice.finish_reason == "length"
    assert response.status == ("incomplete" if stopped_early else "completed")
    assert (response.incomplete_details is not None) == stopped_early
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    assert response.instructions == "Be brief." and response.max_output_tokens == 12


def test_stream_sends_openais_typed_events(alice):
    whole = alice.responses.create(input="Hello, world!", **SETTINGS)
    events = list(alice.responses.create(input="Hello, world!", stream=True, **SETTINGS))
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    terminal = f"response.{whole.status}"
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * len(deltas),
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        terminal,
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    text = "".join(e.delta for e in deltas)
    assert text == whole.output_text
    assert next(e for e in events if e.type == "response.output_text.done").text == text
    final = events[-1].response
    assert final.output_text == text and final.usage.output_tokens == whole.usage.output_tokens
    item_ids = {e.item_id for e in events if hasattr(e, "item_id")}
    assert item_ids == {final.output[0].id}


def test_stream_helper_gives_the_final_response_under_a_schema(alice):
    schema = {
        "type": "object",
        "properties": {"fine": {"type": "boolean"}},
        "required": ["fine"],
        "additionalProperties": False,
    }
    text = {"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}}
    with alice.responses.stream(
        model="tiny", input="How are you today?", text=text, temperature=0, max_output_tokens=64
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()  # needs response.completed
    assert final.status == "completed" and final.output_text == "".join(deltas)
    jsonschema.validate(json.loads(final.output_text), schema)
    assert final.text.format.type == "json_schema"


def test_previous_response_id_continues_the_conversation(alice):
    first = alice.responses.create(instructions="Be brief.", input="Once upon a time", **SETTINGS)
    second = alice.responses.create(previous_response_id=first.id, input="And then?", **SETTINGS)
    chat = alice.chat.completions.create(  # the same conversation, sent whole; instructions do not carry over
        model="tiny",
        messages=[
            {"role": "user", "content": "Once upon a time"},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "And then?"},
        ],
        temperature=0,
        max_tokens=12,
    )
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.output_text == chat.choices[0].message.content
    listed = list(alice.responses.input_items.list(second.id, order="asc"))
    assert [(item.type, item.role) for item in listed] == [
        ("message", "user"),
        ("message", "assistant"),
        ("message", "user"),
    ]
    assert listed[1].id == first.output[0].id and listed[2].content[0].text == "And then?"


def test_store_keeps_responses_per_owner_across_restarts(tmp_path):
    """An open server's responses (owner None) and a key's are apart; a new store on the file (a
    restarted server) still has them."""
    path = tmp_path / "responses.sqlite"
    first = ResponseStore(path)
    for owner in (None, "alice"):
        response = {"id": f"resp_{owner}", "output": [{"type": "message", "id": f"msg_{owner}"}]}
        first.put(StoredResponse(response["id"], owner, response, [{"type": "message", "id": "in"}]))
    first.close()
    again = ResponseStore(path)
    assert again.get("resp_None", "alice") is None and again.get("resp_alice", None) is None
    kept = again.get("resp_alice", "alice")
    assert [item["id"] for item in kept.conversation()] == ["in", "msg_alice"]
    assert not again.delete("resp_alice", None) and again.delete("resp_alice", "alice")
    assert again.get("resp_alice", "alice") is None and again.get("resp_None", None) is not None
    assert path.stat().st_mode & 0o077 == 0


def test_stored_response_is_retrieved_and_deleted(alice):
    response = alice.responses.create(input="Hello", metadata={"topic": "greeting"}, **SETTINGS)
    again = alice.responses.retrieve(response.id)
    assert again.model_dump() == response.model_dump() and again.metadata == {"topic": "greeting"}
    alice.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError) as info:
        alice.responses.retrieve(response.id)
    assert info.value.body["code"] == "response_not_found"
    with pytest.raises(openai.NotFoundError):
        alice.responses.delete(response.id)


def test_another_key_cannot_read_chain_or_delete(alice, bob):
    response = alice.responses.create(input="The capital of France is", **SETTINGS)
    with pytest.raises(openai.NotFoundError):
        bob.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.input_items.list(response.id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError) as info:
        bob.responses.create(previous_response_id=response.id, input="Rome?", **SETTINGS)
    assert info.value.body["param"] == "previous_response_id"
    assert alice.responses.retrieve(response.id).output_text == response.output_text  # still there


def test_store_false_is_not_kept(alice):
    response = alice.responses.create(input="Hello", store=False, **SETTINGS)
    assert response.store is False and response.output_text is not None
    with pytest.raises(openai.NotFoundError):
        alice.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        alice.responses.create(previous_response_id=response.id, input="Again", **SETTINGS)


def test_input_items_are_messages_of_text(alice):
    items = [
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello, "}]},
        {"role": "user", "content": [{"type": "input_text", "text": "world!"}]},
    ]
    response = alice.responses.create(input=items, **SETTINGS)
    assert response.status in ("completed", "incomplete")
    with pytest.raises(openai.UnprocessableEntityError) as info:
        alice.responses.create(
            input=[{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}],
            **SETTINGS,
        )
    assert "input_text" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        alice.responses.create(input=[], **SETTINGS)
    assert "input is empty" in info.value.body["message"]


def test_mistakes_are_clear_errors(alice):
    with pytest.raises(openai.BadRequestError) as info:
        alice.responses.create(input="Once upon a time " * 200, **SETTINGS)
    assert info.value.body["code"] == "context_length_exceeded" and info.value.body["param"] == "input"
    with pytest.raises(openai.BadRequestError) as info:
        alice.responses.create(input="Hello", tool_choice="required", **SETTINGS)
    assert "needs tools" in info.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError) as info:
        alice.responses.create(input="Hello", tools=[{"type": "web_search"}], **SETTINGS)
    assert info.value.body["param"].startswith("tools.0")


@pytest.mark.parametrize("tools", [False, True])
def test_events_parse_as_openais_types(server, tools):
    """Every event, read raw off the wire, validates (strictly, unlike the client's lenient parsing) as
    the openai package's class of its type."""
    body = {"input": "Hello", "stream": True, **SETTINGS}
    if tools:
        body.update(tools=[WEATHER], tool_choice="required", max_output_tokens=150)
    headers = {"Authorization": f"Bearer {server.secrets['alice']}"}
    with httpx.stream("POST", f"{server.url}/v1/responses", json=body, headers=headers, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines[0::2]]
    datas = [json.loads(line.removeprefix("data: ")) for line in lines[1::2]]
    assert len(names) == len(datas) and names[0] == "response.created"
    for name, data in zip(names, datas):
        assert data["type"] == name
        EVENT_TYPES[name].model_validate(data)
    assert ("response.function_call_arguments.done" in names) == tools


def calls_of(response) -> list[tuple[str, str]]:
    return [(item.name, item.arguments) for item in response.output if item.type == "function_call"]


def test_required_tool_choice_gives_valid_function_calls(alice):
    """A forced choice decodes under the tools' grammar: the tiny random model's calls name a tool and
    their arguments validate; streamed, the calls and their argument deltas add up to the same."""
    options = {"input": QUESTION, "tools": [WEATHER, TIME], "tool_choice": "required", **TOOL_SETTINGS}
    response = alice.responses.create(**options)
    assert response.status == "completed" and response.tool_choice == "required"
    assert [tool.name for tool in response.tools] == ["get_weather", "now"]
    assert response.output and all(item.type == "function_call" for item in response.output)
    for item in response.output:
        jsonschema.validate(json.loads(item.arguments), SCHEMAS[item.name])
        assert item.call_id and item.id != item.call_id and item.status == "completed"
    events = list(alice.responses.create(stream=True, **options))
    final = events[-1].response
    assert events[-1].type == "response.completed" and calls_of(final) == calls_of(response)
    for index, item in enumerate(final.output):
        mine = [e for e in events if getattr(e, "output_index", None) == index]
        kinds = [e.type for e in mine]
        assert kinds[0] == "response.output_item.added" and mine[0].item.name == item.name
        assert kinds[-2:] == ["response.function_call_arguments.done", "response.output_item.done"]
        deltas = [e.delta for e in mine if e.type == "response.function_call_arguments.delta"]
        assert "".join(deltas) == mine[-2].arguments == item.arguments
        assert mine[-1].item.call_id == item.call_id


def test_named_tool_choice_calls_that_function_once(alice):
    response = alice.responses.create(
        input=QUESTION,
        tools=[TIME, WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False,
        **TOOL_SETTINGS,
    )
    ((name, arguments),) = calls_of(response)
    assert name == "get_weather"
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def test_function_call_output_turn_is_rendered_as_the_chat_path_does(alice):
    """The tool's result goes back as a function_call_output item, chained or sent whole; the prompt is
    the one a chat completion with the same tool call and tool message gets."""
    first = alice.responses.create(
        input=QUESTION, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, **TOOL_SETTINGS
    )
    (call,) = first.output
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}
    chained = alice.responses.create(
        previous_response_id=first.id, input=[result], tools=[WEATHER], **SETTINGS
    )
    whole = alice.responses.create(
        input=[{"role": "user", "content": QUESTION}, call.model_dump(exclude_none=True), result],
        tools=[WEATHER],
        **SETTINGS,
    )
    function = {"name": call.name, "arguments": call.arguments}
    chat = alice.chat.completions.create(
        model="tiny",
        messages=[
            {"role": "user", "content": QUESTION},
            {
                "role": "assistant",
                "tool_calls": [{"id": call.call_id, "type": "function", "function": function}],
            },
            {"role": "tool", "tool_call_id": call.call_id, "content": "Sunny, 21 C"},
        ],
        tools=[{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}],
        temperature=0,
        max_tokens=12,
    )
    assert chained.usage.input_tokens == whole.usage.input_tokens == chat.usage.prompt_tokens
    assert chained.output_text == whole.output_text
    items = list(alice.responses.input_items.list(chained.id, order="asc"))
    assert [item.type for item in items] == ["message", "function_call", "function_call_output"]


@pytest.mark.parametrize("streamed", [False, True])
def test_openai_agents_sdk_runs_an_agent_with_a_function_tool(server, streamed):
    """The openai-agents SDK, with only its base URL and key changed: a forced first turn calls the strict
    tool, the SDK runs it and sends its output back, and the last turn answers under the agent's output type
    (`Runner.run`, or `Runner.run_streamed` over the typed events)."""

    class Report(BaseModel):
        sunny: bool

    ran = []

    # strict, the SDK's default: the last turn ("auto") decodes under the tools' grammar joined with the
    # output type's JSON schema
    @agents.function_tool
    def get_weather(city: Literal["Paris", "Rome"]) -> str:
        """The weather in a city."""
        ran.append(city)
        return f"Sunny in {city}"

    agents.set_tracing_disabled(True)
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=server.secrets["alice"], max_retries=0)
    agent = agents.Agent(
        name="weather",
        instructions="Answer with the weather.",
        model=agents.OpenAIResponsesModel("tiny", client),
        tools=[get_weather],
        output_type=Report,
        model_settings=agents.ModelSettings(tool_choice="required", temperature=0),
    )

    async def run():
        if not streamed:
            return await agents.Runner.run(agent, QUESTION, max_turns=3)
        result = agents.Runner.run_streamed(agent, QUESTION, max_turns=3)
        async for _ in result.stream_events():
            pass
        return result

    result = asyncio.run(run())
    assert ran and all(city in ("Paris", "Rome") for city in ran)
    assert isinstance(result.final_output, Report)
    kinds = [item.type for item in result.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"] and kinds[-1] == "message_output_item"
