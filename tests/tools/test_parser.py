"""Tool calls read out of replies in each family's markup, whole and streamed in any pieces."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmasos.tools import FALLBACK, FORMATS, ToolCallParser, parse_tool_calls

WEATHER = {"city": "Paris", "units": {"deg": "C", "note": 'braces } and " quotes { in strings'}}
TIME = {}
REPLIES = {
    "hermes": (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
        + json.dumps(WEATHER)
        + "}\n</tool_call>\n"
        '<tool_call>\n{"name": "time", "arguments": {}}\n</tool_call>',
        "Let me check.\n",
    ),
    "llama3_json": (
        '<|python_tag|>{"name": "get_weather", "parameters": '
        + json.dumps(WEATHER)
        + '}; {"name": "time", "parameters": {}}',
        None,
    ),
    "mistral": (
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": '
        + json.dumps(WEATHER)
        + '}, {"name": "time", "arguments": {}}]',
        None,
    ),
}


@pytest.mark.parametrize("family", sorted(REPLIES))
def test_each_family_reads_its_calls(family):
    text, content = REPLIES[family]
    got_content, calls = parse_tool_calls(FORMATS[family], text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", WEATHER), ("time", TIME)]
    assert len({c.id for c in calls}) == 2
    if family == "mistral":
        assert all(len(c.id) == 9 and c.id.isalnum() for c in calls)  # what its template takes back


def stream(fmt, pieces: list[str], max_calls=None):
    """Feed the pieces; return the content and each call's (id, name, arguments) as the deltas add up."""
    parser = ToolCallParser(fmt, max_calls)
    content, calls = "", {}
    for delta in [*(parser.feed(p) for p in pieces), parser.finish()]:
        content += delta.content
        for call in delta.calls:
            if call.id is not None:
                assert call.index not in calls  # the id and name are sent once
                calls[call.index] = [call.id, call.name, ""]
            calls[call.index][2] += call.arguments
    return content, [tuple(calls[i]) for i in sorted(calls)], parser


def split(text: str, cuts: list[int]) -> list[str]:
    cuts = sorted({c % (len(text) + 1) for c in cuts})
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


@pytest.mark.parametrize("family", sorted(REPLIES))
@given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=40))
def test_streamed_deltas_add_up_to_the_whole_reply(family, cuts):
    text, _ = REPLIES[family]
    content, calls, parser = stream(FORMATS[family], split(text, cuts))
    whole_content, whole = parse_tool_calls(FORMATS[family], text)
    assert content == (whole_content or "")
    assert [(name, args) for _, name, args in calls] == [(c.name, c.arguments) for c in whole]
    assert [(i, n, a) for i, n, a in calls] == [(c.id, c.name, c.arguments) for c in parser.calls]


def test_text_that_only_looks_like_a_call_is_content():
    hermes, llama = FORMATS["hermes"], FORMATS["llama3_json"]
    assert parse_tool_calls(hermes, "a < b and <tool") == ("a < b and <tool", [])
    assert parse_tool_calls(hermes, "<tool_call>\nnot json\n</tool_call>") == (
        "<tool_call>\nnot json\n</tool_call>",
        [],
    )
    assert parse_tool_calls(llama, 'Use {"x": 1} here') == ('Use {"x": 1} here', [])
    assert parse_tool_calls(llama, '{"x": 1}') == ('{"x": 1}', [])  # JSON, but no call
    # held back while it may open a call, then sent once it cannot
    content, calls, _ = stream(hermes, ["Hi <tool", "box>"])
    assert (content, calls) == ("Hi <toolbox>", [])


def test_one_call_when_parallel_calls_are_off():
    text, _ = REPLIES["hermes"]
    _, calls = parse_tool_calls(FORMATS["hermes"], text, max_calls=1)
    assert [c.name for c in calls] == ["get_weather"]


def test_a_call_cut_off_by_the_length_limit_keeps_what_was_written():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    content, calls, _ = stream(FALLBACK, [text[:20], text[20:]])
    assert content == "" and calls[0][1:] == ("get_weather", '{"city": "Par')
