"""Structured output on a tiny random model: whatever it samples, the text parses and matches.

A random model is the hard case for a grammar: it never wants to write JSON, so every token the
grammar forbids is likely, and only the mask keeps the output valid.
"""

import json
import re

import jsonschema
import pytest
from llguidance import LLMatcher

from llmasos import LLM, SamplingParams
from llmasos.errors import InvalidRequestError
from llmasos.kernel.structured import grammar_source
from llmasos.sampling_params import StructuredOutputParams

from tiny import save_tiny_model

CONFIG = dict(device="cpu", block_size=4, num_kv_blocks=256)
PROMPTS = ["Once upon a time", "The capital of France is", "Hello"]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "city": {"enum": ["Paris", "Rome"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
        "admin": {"type": "boolean"},
        "home": {
            "type": "object",
            "properties": {"x": {"type": "integer", "maximum": 9}, "y": {"type": ["integer", "null"]}},
            "required": ["x"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "city", "home"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(str(save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")), **CONFIG)


def sampled(seed, structured, **params):
    params = dict(temperature=1.0, seed=seed, max_tokens=200, structured_output=structured) | params
    return SamplingParams(**params)


def completions(llm, structured, seeds=range(3), **params):
    outs = llm.generate(
        PROMPTS * len(seeds), [sampled(s, structured, **params) for s in seeds for _ in PROMPTS]
    )
    return [c for out in outs for c in out.outputs]


def test_json_schema_output_parses_and_validates(llm):
    outs = completions(llm, StructuredOutputParams(json=SCHEMA), seeds=range(2), n=2)
    outs += completions(llm, StructuredOutputParams(json=json.dumps(SCHEMA)), seeds=[7])  # the schema as text
    for c in outs:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), SCHEMA)


def test_json_object_gives_a_dict_and_every_output_stays_in_the_grammar(llm):
    structured = StructuredOutputParams(json_object=True)
    outs = completions(llm, structured, seeds=range(3), max_tokens=100)
    stopped = [c for c in outs if c.finish_reason == "stop"]
    assert len(stopped) >= len(outs) // 2
    assert all(isinstance(json.loads(c.text), dict) for c in stopped)
    # cut short by max_tokens, the output is still a prefix the grammar accepts
    for c in outs:
        matcher = LLMatcher(llm.engine.grammars.ll_tokenizer, grammar_source(structured))
        assert matcher.consume_tokens(c.token_ids) and not matcher.is_error()


def test_regex_choice_and_grammar_outputs_match(llm):
    for c in completions(llm, StructuredOutputParams(regex=r"[a-c]{2,5}@(x|yz)\.com"), n=3):
        assert re.fullmatch(r"[a-c]{2,5}@(x|yz)\.com", c.text) and c.finish_reason == "stop"
    choices = ["Paris", "Rome", "New York", "café"]
    outs = completions(llm, StructuredOutputParams(choice=choices), seeds=range(5))
    assert {c.text for c in outs} <= set(choices) and len({c.text for c in outs}) > 1
    lark = 'start: "(" num ("," num)* ")"\nnum: /[0-9]{1,3}/'
    for c in completions(llm, StructuredOutputParams(grammar=lark)):
        assert re.fullmatch(r"\(\d{1,3}(,\d{1,3})*\)", c.text) and c.finish_reason == "stop"


def test_grammar_stops_even_when_eos_is_ignored(llm):
    out = llm.generate("Hello", sampled(0, StructuredOutputParams(choice=["yes", "no"]), ignore_eos=True))[0]
    assert out.outputs[0].text in ("yes", "no") and out.outputs[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "structured, message",
    [
        (dict(json={"type": "foo"}), "json cannot be used, correct it: Invalid type: foo"),
        (dict(json="{not json"), "json cannot be used"),
        (dict(json={"type": "string", "format": "no-such-format"}), "Unknown format"),
        (dict(regex="a(b"), "(?s)regex cannot be used.*unclosed group"),
        (dict(grammar="start: undefined_rule"), "(?s)grammar cannot be used.*unknown name"),
    ],
)
def test_grammars_that_do_not_compile_are_rejected_before_queueing(llm, structured, message):
    params = SamplingParams(structured_output=StructuredOutputParams(**structured))
    with pytest.raises(InvalidRequestError, match=message):
        llm.engine.make_request("Hello", params)
    assert not llm.engine.has_unfinished() and not llm.engine.core.has_unfinished()


@pytest.mark.parametrize(
    "fields, message",
    [
        ({}, "exactly one of json, json_object, regex, choice or grammar; got none"),
        (dict(json={}, regex="a"), "got json, regex: set only one"),
        (dict(choice=[]), "choice=\\[\\]: it must be a non-empty list of strings"),
        (dict(grammar=" "), "grammar=' ': it must be a non-empty string"),
        (dict(json=3), "json=3: it must be a JSON Schema"),
    ],
)
def test_structured_output_params_are_validated(fields, message):
    with pytest.raises(InvalidRequestError, match=message):
        StructuredOutputParams(**fields)


def test_unconstrained_greedy_rows_are_batch_invariant(llm):
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    alone = [llm.generate(p, greedy)[0].outputs[0].token_ids for p in PROMPTS]
    constrained = [
        sampled(1, StructuredOutputParams(json=SCHEMA)),
        SamplingParams(
            temperature=0, max_tokens=40, structured_output=StructuredOutputParams(regex="[a-z]+")
        ),
    ]
    outs = llm.generate(PROMPTS + PROMPTS[:2], [greedy] * len(PROMPTS) + constrained)
    assert [o.outputs[0].token_ids for o in outs[: len(PROMPTS)]] == alone


def test_preemption_keeps_the_grammar_state(tmp_path):
    model = str(save_tiny_model(tmp_path, "llama"))
    params = [sampled(s, StructuredOutputParams(json=SCHEMA), max_tokens=120) for s in range(8)]
    roomy = LLM(model, **CONFIG).generate(PROMPTS[:1] * 8, params)
    tight = LLM(model, **(CONFIG | dict(num_kv_blocks=40))).generate(PROMPTS[:1] * 8, params)
    assert sum(o.metrics.num_preemptions for o in tight) > 0
    assert [o.outputs[0].text for o in tight] == [o.outputs[0].text for o in roomy]
    for out in tight:
        jsonschema.validate(json.loads(out.outputs[0].text), SCHEMA)


def test_finished_and_aborted_sequences_drop_their_matcher(llm):
    structured = StructuredOutputParams(json_object=True)
    done = llm.engine.make_request("Hello", sampled(0, StructuredOutputParams(choice=["a", "b"])))
    aborted = llm.engine.make_request("Hello", sampled(0, structured, max_tokens=50, n=2))
    assert all(seq.matcher is not None for seq in done.seqs + aborted.seqs)
    assert aborted.seqs[0].matcher is not aborted.seqs[1].matcher
    llm.engine.enqueue(done)
    llm.engine.enqueue(aborted)
    while not done.finished:
        llm.engine.step()
    llm.engine.abort_request(aborted.request_id)
    assert all(seq.matcher is None for seq in done.seqs + aborted.seqs)
    assert not llm.engine.has_unfinished()


@pytest.mark.slow
def test_smollm2_answers_in_the_schema(smollm2_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path))
    llm = LLM(str(smollm2_gguf))
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    prompt = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in JSON with city and country."}]
    )
    params = SamplingParams(
        temperature=0, max_tokens=64, structured_output=StructuredOutputParams(json=schema)
    )
    completion = llm.generate(prompt, params)[0].outputs[0]
    assert completion.finish_reason == "stop", completion.text
    answer = json.loads(completion.text)
    jsonschema.validate(answer, schema)
    assert "Paris" in answer["city"]
