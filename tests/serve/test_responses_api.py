"""The Responses API through the official `openai` client against a live server with keys, serving a
tiny model: text answers that match the chat path's, OpenAI's typed stream events, stored responses
chained by previous_response_id, and one key never seeing another's responses."""

import json
import typing

import httpx
import jsonschema
import openai
import pytest
from openai.types.responses import ResponseStreamEvent

from llmasos.serve.keys import KeyStore

from serving import LiveServer, server_config

SETTINGS = {"model": "tiny", "temperature": 0, "max_output_tokens": 12}
EVENT_TYPES = {  # each stream event's class in the openai package, by its type
    typing.get_args(cls.model_fields["type"].annotation)[0]: cls
    for cls in typing.get_args(typing.get_args(ResponseStreamEvent)[0])
}


@pytest.fixture(scope="module")
def server(store):
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


def test_events_parse_as_openais_types(server, alice):
    """Every event, read raw off the wire, validates (strictly, unlike the client's lenient parsing) as
    the openai package's class of its type."""
    body = {"input": "Hello", "stream": True, **SETTINGS}
    headers = {"Authorization": f"Bearer {server.secrets['alice']}"}
    with httpx.stream("POST", f"{server.url}/v1/responses", json=body, headers=headers, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines[0::2]]
    datas = [json.loads(line.removeprefix("data: ")) for line in lines[1::2]]
    assert len(names) == len(datas) and names[0] == "response.created"
    for name, data in zip(names, datas):
        assert data["type"] == name
        EVENT_TYPES[name].model_validate(data)
