"""Under a forced tool choice the tiny random model's arguments always parse and validate against the
tool's schema: a property test over random JSON schemas, through `LLM.chat`; strict tools under auto
joined with a reply format give either an answer in the format or valid calls."""

import json

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmasos import LLM, SamplingParams
from llmasos.errors import InvalidRequestError
from llmasos.sampling_params import StructuredOutputParams

from serving import ENGINE
from tiny import TOOLS_CHAT_TEMPLATE, save_tiny_model

CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(
        str(save_tiny_model(tmp_path_factory.mktemp("tiny"), chat_template=TOOLS_CHAT_TEMPLATE)),
        **vars(ENGINE),
    )


names = st.text("abcdefghij_", min_size=1, max_size=6)
scalars = st.one_of(
    st.just({"type": "string", "maxLength": 3}),
    st.integers(-50, 50).map(lambda low: {"type": "integer", "minimum": low, "maximum": low + 20}),
    st.just({"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.25}),
    st.just({"type": "boolean"}),
    st.lists(st.text("xyz", min_size=1, max_size=3), min_size=1, max_size=3, unique=True).map(
        lambda values: {"enum": values}
    ),
)
properties = st.dictionaries(
    names,
    st.one_of(scalars, scalars.map(lambda item: {"type": "array", "items": item, "maxItems": 2})),
    max_size=3,
)
schemas = properties.flatmap(
    lambda props: (
        st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda required: {
                "type": "object",
                "properties": props,
                "required": required,
                "additionalProperties": False,
            }
        )
        if props
        else st.just({"type": "object", "properties": {}, "additionalProperties": False})
    )
)
# closed objects, as OpenAI's strict mode asks for: an open one lets a random model write keys until
# max_tokens, and a cut-off call cannot validate
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=schemas, named=st.booleans(), seed=st.integers(0, 2**16))
def test_forced_calls_always_validate(llm, schema, named, seed):
    tools = [
        {"type": "function", "function": {"name": "lookup", "parameters": schema}},
        {"type": "function", "function": {"name": "other", "parameters": NO_ARGUMENTS}},
    ]
    choice = {"type": "function", "function": {"name": "lookup"}} if named else "required"
    params = SamplingParams(max_tokens=200, temperature=1.0, seed=seed)
    out = llm.chat(CHAT, params, tools=tools, tool_choice=choice, parallel_tool_calls=False)[0].outputs[0]
    assert out.finish_reason == "tool_calls" and len(out.tool_calls) == 1
    call = out.tool_calls[0]
    assert call.name == "lookup" or not named
    jsonschema.validate(json.loads(call.arguments), schema if call.name == "lookup" else NO_ARGUMENTS)


def test_tool_choice_none_and_auto_without_strict_give_text(llm):
    tools = [{"type": "function", "function": {"name": "lookup"}}]
    params = SamplingParams(max_tokens=8, temperature=0)
    plain = llm.chat(CHAT, params)[0].outputs[0]
    for choice in ("none", "auto"):
        out = llm.chat(CHAT, params, tools=tools, tool_choice=choice)[0].outputs[0]
        assert out.tool_calls is None and out.finish_reason == "length" and out.text
    assert plain.text  # the same model without tools answers too (a different prompt: no tool list)


ANSWER = {
    "type": "object",
    "properties": {"sunny": {"type": "boolean"}},
    "required": ["sunny"],
    "additionalProperties": False,
}
ANSWER_FORMAT = StructuredOutputParams(json=ANSWER)
STRICT_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parser=st.sampled_from(["hermes", "llama3_json", "mistral"]), seed=st.integers(0, 2**16))
def test_strict_tools_under_auto_with_a_reply_format_give_an_answer_in_it_or_a_valid_call(llm, parser, seed):
    """An agent with an output type and strict tools (the openai-agents SDK's defaults) asks for both at
    once: each reply is either JSON under the format's schema or calls under the tools' schemas."""
    params = SamplingParams(max_tokens=120, temperature=1.0, seed=seed, structured_output=ANSWER_FORMAT)
    # one call at most: with parallel calls a random model may keep opening calls until max_tokens
    out = llm.chat(CHAT, params, tools=[STRICT_WEATHER], parallel_tool_calls=False, tool_call_parser=parser)
    out = out[0].outputs[0]
    assert out.finish_reason in ("stop", "tool_calls"), "the grammar completes within max_tokens"
    if out.tool_calls:
        for call in out.tool_calls:
            assert call.name == "get_weather"
            jsonschema.validate(json.loads(call.arguments), STRICT_WEATHER["function"]["parameters"])
    else:
        jsonschema.validate(json.loads(out.text), ANSWER)


def test_a_forced_choice_ignores_the_reply_format_and_other_formats_with_strict_tools_are_refused(llm):
    params = SamplingParams(max_tokens=120, temperature=0, structured_output=ANSWER_FORMAT)
    out = llm.chat(CHAT, params, tools=[STRICT_WEATHER], tool_choice="required")[0].outputs[0]
    assert out.finish_reason == "tool_calls" and out.tool_calls[0].name == "get_weather"
    regex = SamplingParams(max_tokens=8, structured_output=StructuredOutputParams(regex="yes|no"))
    with pytest.raises(InvalidRequestError, match="regex output format and strict tools"):
        llm.chat(CHAT, regex, tools=[STRICT_WEATHER])
