"""Under a forced tool choice the tiny random model's arguments always parse and validate against the
tool's schema: a property test over random JSON schemas, through `LLM.chat`."""

import json

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmasos import LLM, SamplingParams

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
