"""Conversations with tools render as transformers' `apply_chat_template(messages, tools=...)` renders
them, on the real templates of the three families (Qwen2.5, Llama 3.1, Mistral v0.3)."""

import json
from pathlib import Path

import pytest

from llmasos.errors import InvalidRequestError
from llmasos.tokenizer import Tokenizer
from llmasos.tools import FALLBACK, FORMATS, ToolRequest, detect_format, render_chat, tool_format

from tiny import CHAT_TEMPLATE, save_tokenizer

TEMPLATES = Path(__file__).parent / "templates"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        "strict": True,
    },
}
FAMILIES = {"qwen2.5": "hermes", "llama3.1": "llama3_json", "mistral-v0.3": "mistral"}


def history(call_id: str) -> list[dict]:
    """A tool-result turn as the openai client sends it: the call's arguments as JSON text."""
    call = {
        "id": call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": '{"temp": 21}'},
    ]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def folder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    save_tokenizer(path, (TEMPLATES / f"{request.param}.jinja").read_text())
    return request.param, path


def test_tool_turns_render_as_transformers_renders_them(folder):
    from transformers import AutoTokenizer

    family, path = folder
    tokenizer = Tokenizer.from_dir(path)
    fmt = tool_format(tokenizer)
    assert fmt.name == FAMILIES[family]
    messages = history(fmt.call_id())
    prompt, plan = render_chat(tokenizer, messages, ToolRequest.from_openai([WEATHER]), fmt)
    # transformers gets the arguments as an object, as vLLM hands them to templates
    expected_messages = json.loads(json.dumps(messages))
    expected_messages[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    expected = AutoTokenizer.from_pretrained(path).apply_chat_template(
        expected_messages, tools=[WEATHER], tokenize=False, add_generation_prompt=True
    )
    assert prompt == expected
    assert "Paris" in prompt and "get_weather" in prompt and "21" in prompt
    assert plan is not None and plan.format is fmt


def test_the_format_is_read_from_the_template_or_named():
    assert detect_format((TEMPLATES / "qwen2.5.jinja").read_text()) is FORMATS["hermes"]
    assert detect_format(CHAT_TEMPLATE) is FALLBACK
    assert detect_format(None) is FALLBACK


def test_a_template_without_tools_gets_them_in_the_system_message(tmp_path):
    save_tokenizer(tmp_path)  # the plain ChatML template: no tools variable
    tokenizer = Tokenizer.from_dir(tmp_path)
    prompt, plan = render_chat(tokenizer, history("call_1"), ToolRequest.from_openai([WEATHER]), FALLBACK)
    assert prompt.startswith("<|im_start|>system\n# Tools") and '"name": "get_weather"' in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response>' in prompt
    assert plan.format is FALLBACK and not plan.format.native


def test_tool_choice_none_renders_tools_but_plans_no_calls(tmp_path):
    save_tokenizer(tmp_path, (TEMPLATES / "qwen2.5.jinja").read_text())
    tokenizer = Tokenizer.from_dir(tmp_path)
    prompt, plan = render_chat(
        tokenizer, history("call_1"), ToolRequest.from_openai([WEATHER], "none"), FORMATS["hermes"]
    )
    assert "<tools>" in prompt and plan is None


def test_history_arguments_that_are_not_json_are_a_clear_error(tmp_path):
    save_tokenizer(tmp_path, (TEMPLATES / "qwen2.5.jinja").read_text())
    messages = history("call_1")
    messages[1]["tool_calls"][0]["function"]["arguments"] = "{city: Paris"
    with pytest.raises(InvalidRequestError, match="arguments of tool_calls\\[0\\].*not JSON"):
        render_chat(Tokenizer.from_dir(tmp_path), messages, None, FORMATS["hermes"])


@pytest.mark.parametrize(
    ("tools", "choice", "message"),
    [
        ([{"type": "function"}], None, "tools\\[0\\].function is missing"),
        ([{"type": "function", "function": {"name": "a b"}}], None, "not a function name"),
        ([WEATHER, WEATHER], None, "same name"),
        ([WEATHER], "always", "not one of auto, none, required"),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "'nope', which is not in tools"),
        (None, "required", "needs tools"),
    ],
)
def test_bad_tools_and_choices_name_the_problem(tools, choice, message):
    with pytest.raises(InvalidRequestError, match=message):
        ToolRequest.from_openai(tools, choice)


def test_choices_decide_what_is_constrained():
    plain = {"type": "function", "function": {"name": "now"}}
    assert not ToolRequest.from_openai([plain]).constrained
    assert ToolRequest.from_openai([plain, WEATHER]).constrained  # a strict tool under auto
    assert not ToolRequest.from_openai([WEATHER], "none").constrained
    named = ToolRequest.from_openai(
        [plain, WEATHER], {"type": "function", "function": {"name": "now"}}, False
    )
    assert named.forced and [t.name for t in named.called] == ["now"] and not named.parallel
