"""Output kinds: DELTA outputs hand each character and token out once, and add up to CUMULATIVE ones."""

import pytest

from llmasos import LLM
from llmasos.errors import InvalidRequestError
from llmasos.outputs import RequestOutputKind, accumulate
from llmasos.sampling_params import SamplingParams

from tiny import save_tiny_model

CONFIG = {"device": "cpu", "block_size": 4, "num_kv_blocks": 256}


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(str(save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")), **CONFIG)


def params(kind: RequestOutputKind, **overrides) -> SamplingParams:
    return SamplingParams(**{"temperature": 0, "max_tokens": 40, "output_kind": kind, **overrides})


def run(llm, prompt, sampling: SamplingParams, abort_after: int | None = None) -> list:
    """Every output the engine gives for one request, stepping it alone."""
    engine = llm.engine
    request_id = engine.add_request(prompt, sampling)
    outputs, steps = [], 0
    while engine.has_unfinished():
        outputs += [out for out in engine.step() if out.request_id == request_id]
        steps += 1
        if steps == abort_after:
            outputs.append(engine.abort_request(request_id))
    return outputs


def test_streaming_n_tokens_hands_out_each_character_and_token_once(llm):
    """O(n) work for an n-token stream: what the outputs carry adds up to the final text and ids."""
    n = 200
    sampling = params(RequestOutputKind.DELTA, max_tokens=n, ignore_eos=True, logprobs=1)
    deltas = run(llm, "Once upon a time", sampling)
    final = llm.generate(
        "Once upon a time", params(RequestOutputKind.CUMULATIVE, max_tokens=n, ignore_eos=True)
    )
    text, token_ids = final[0].outputs[0].text, final[0].outputs[0].token_ids
    assert len(token_ids) == n and len(text) >= n // 2

    assert len(deltas) == n and deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    handed_chars = sum(len(d.outputs[0].text) for d in deltas)
    handed_ids = sum(len(d.outputs[0].token_ids) for d in deltas)
    handed_logprobs = sum(len(d.outputs[0].logprobs) for d in deltas)
    assert (handed_chars, handed_ids, handed_logprobs) == (len(text), n, n)
    assert max(len(d.outputs[0].token_ids) for d in deltas) == 1
    assert "".join(d.outputs[0].text for d in deltas) == text
    assert deltas[-1].usage == {"prompt_tokens": len(deltas[-1].prompt_token_ids), "completion_tokens": n,
                                "total_tokens": len(deltas[-1].prompt_token_ids) + n}  # fmt: skip

    pieces = list(
        llm.stream("Once upon a time", params(RequestOutputKind.CUMULATIVE, max_tokens=n, ignore_eos=True))
    )
    assert sum(map(len, pieces)) == len(text) and "".join(pieces) == text


@pytest.mark.parametrize("include_stop", [False, True])
def test_the_three_kinds_agree_with_stop_strings_and_several_choices(llm, include_stop):
    reference = llm.generate("Hello", params(RequestOutputKind.CUMULATIVE))[0].outputs[0].text
    stop = reference[12:15]
    assert stop and stop not in reference[:14]
    kwargs = {"stop": [stop, "a stop string that never comes"], "include_stop_str_in_output": include_stop}
    kwargs |= {"n": 2, "logprobs": 2}

    cumulative = run(llm, "Hello", params(RequestOutputKind.CUMULATIVE, **kwargs))
    deltas = run(llm, "Hello", params(RequestOutputKind.DELTA, **kwargs))
    (final_only,) = run(llm, "Hello", params(RequestOutputKind.FINAL_ONLY, **kwargs))
    assert len(cumulative) == len(deltas) > 1
    for i in range(len(deltas)):  # every delta output adds up, with those before it, to the cumulative one
        assert accumulate(deltas[: i + 1]).outputs == cumulative[i].outputs
    assert final_only.outputs == cumulative[-1].outputs and final_only.finished
    assert accumulate(deltas).usage == final_only.usage
    for completion in final_only.outputs:  # greedy: both choices stop at the stop string
        assert completion.stop_reason == stop and completion.finish_reason == "stop"
        assert completion.text == reference[: reference.index(stop) + len(stop) * include_stop]


def test_an_aborted_delta_request_hands_out_what_it_held_back(llm):
    kwargs = {"stop": ["a stop string that never comes"], "max_tokens": 30, "ignore_eos": True}
    deltas = run(llm, "Hello", params(RequestOutputKind.DELTA, **kwargs), abort_after=10)
    cumulative = run(llm, "Hello", params(RequestOutputKind.CUMULATIVE, **kwargs), abort_after=10)
    assert deltas[-1].finished and deltas[-1].outputs[0].finish_reason == "abort"
    assert accumulate(deltas).outputs == cumulative[-1].outputs
    assert len(cumulative[-1].outputs[0].token_ids) == 10


def test_output_kind_is_validated():
    assert SamplingParams().output_kind is RequestOutputKind.CUMULATIVE
    assert SamplingParams(output_kind="delta").output_kind is RequestOutputKind.DELTA
    with pytest.raises(InvalidRequestError, match="output_kind='partial'.*delta"):
        SamplingParams(output_kind="partial")
