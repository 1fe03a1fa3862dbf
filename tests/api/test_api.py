"""The `LLM` and `AsyncLLM` system calls on a tiny model: text, stops, streaming, concurrency, errors."""

import asyncio
import logging

import pytest

from llmasos import LLM, AsyncLLM, SamplingParams
from llmasos.errors import InvalidRequestError

from tiny import save_tiny_model

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
PROMPTS = ["Once upon a time", "The capital of France is", "def add(a, b):", "Hello"]
CONFIG = dict(device="cpu", block_size=4, num_kv_blocks=128)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("llama"), "llama"))


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, **CONFIG)


def test_generate_keeps_prompt_order_and_reports_usage(llm):
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.prompt for o in outs] == PROMPTS
    for out in outs:
        completion = out.outputs[0]
        assert len(completion.token_ids) == 20 and completion.finish_reason == "length"
        assert completion.text == llm.tokenizer.decode(completion.token_ids)
        assert out.usage == {
            "prompt_tokens": len(out.prompt_token_ids),
            "completion_tokens": 20,
            "total_tokens": len(out.prompt_token_ids) + 20,
        }
        assert out.finished and out.metrics.first_token_time >= out.metrics.arrival_time
    alone = [llm.generate(p, GREEDY)[0].outputs[0].text for p in PROMPTS]
    assert [o.outputs[0].text for o in outs] == alone


def test_n_outputs_and_seeds(llm):
    params = SamplingParams(n=3, temperature=3.0, seed=7, max_tokens=8, ignore_eos=True)
    out = llm.generate("Hello", params)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1, "different seeds per output"
    again = llm.generate("Hello", params)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]


def test_stop_strings_cut_the_text(llm):
    full = llm.generate("Once upon a time", GREEDY)[0].outputs[0].text
    stop = full[5:8]
    assert stop and full.find(stop) == 5
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop])
    out = llm.generate("Once upon a time", params)[0].outputs[0]
    assert out.text == full[:5] and out.finish_reason == "stop" and out.stop_reason == stop
    params.include_stop_str_in_output = True
    assert llm.generate("Once upon a time", params)[0].outputs[0].text == full[:8]


def test_stream_deltas_add_up_and_closing_aborts(llm):
    full = llm.generate("Hello", GREEDY)[0].outputs[0].text
    assert "".join(llm.stream("Hello", GREEDY)) == full
    stream = llm.stream("Hello", SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    next(stream)
    stream.close()
    assert not llm.engine.has_unfinished()
    assert llm.engine.stats().kv_cache_usage == 0, "an abandoned stream frees its KV blocks at once"


def test_chat_applies_the_template(llm):
    messages = [{"role": "user", "content": "Hello"}]
    out = llm.chat(messages, GREEDY)[0]
    assert out.prompt == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert out.outputs[0].text == llm.generate(out.prompt, GREEDY)[0].outputs[0].text


def test_a_template_that_writes_bos_gets_one_bos(tmp_path):
    """Llama 3's way: the tokenizer adds BOS to any text and the chat template writes it too; the chat
    prompt must hold it once, as transformers' apply_chat_template(tokenize=True) makes it."""
    import json

    from transformers import AutoTokenizer

    folder = save_tiny_model(tmp_path / "bos", "llama")
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text())
    bos = json.loads((folder / "tokenizer_config.json").read_text())["bos_token"]
    bos_id = next(t["id"] for t in tokenizer_json["added_tokens"] if t["content"] == bos)
    tokenizer_json["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    template = folder / "chat_template.jinja"
    template.write_text("{{ bos_token }}" + template.read_text())
    messages = [{"role": "user", "content": "Hello"}]
    llm = LLM(str(folder), **CONFIG)
    assert llm.tokenizer.encode("Hello")[0] == bos_id  # plain text gets its BOS
    [out] = llm.chat(messages, SamplingParams(max_tokens=1))
    expected = AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, add_generation_prompt=True)
    assert out.prompt_token_ids == list(getattr(expected, "input_ids", expected))
    assert out.prompt_token_ids[:2] != [bos_id, bos_id]


def test_bad_requests_fail_before_anything_runs(llm):
    with pytest.raises(InvalidRequestError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(InvalidRequestError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(InvalidRequestError, match="context is 256"):
        llm.generate("Hello " * 300, GREEDY)
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        llm.generate([[10**6]], GREEDY)
    assert not llm.engine.has_unfinished()


def test_truncation_only_when_asked_and_with_a_warning(llm, caplog):
    params = SamplingParams(temperature=0, max_tokens=4, truncate_prompt_tokens=10, ignore_eos=True)
    with caplog.at_level(logging.WARNING, logger="llmasos"):
        out = llm.generate("Hello " * 300, params)[0]
    assert len(out.prompt_token_ids) == 10 and "truncated" in caplog.text


def test_async_callers_share_one_batch(model_dir):
    llm = AsyncLLM(model_dir, **CONFIG)
    expected = [o.outputs[0].text for o in LLM(model_dir, **CONFIG).generate(PROMPTS * 2, GREEDY)]

    async def one(prompt):
        last = None
        async for out in llm.generate(prompt, GREEDY):
            last = out
        return last

    async def cancelled():
        async for _ in llm.generate("Hello", SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)):
            break  # the caller walks away: the request is aborted

    async def main():
        outs = await asyncio.gather(*(one(p) for p in PROMPTS * 2), cancelled())
        await asyncio.sleep(0.2)
        return outs

    try:
        outs = asyncio.run(main())
        assert [o.outputs[0].text for o in outs[:-1]] == expected
        assert max(llm.engine.num_steps, 1) < 8 * 20, "requests were batched, not run one by one"
        with pytest.raises(InvalidRequestError):
            asyncio.run(one("Hello " * 300))
        assert not llm.engine.has_unfinished() and llm.engine.stats().kv_cache_usage == 0
    finally:
        llm.shutdown()


def test_params_list_must_match_the_prompts(llm):
    with pytest.raises(InvalidRequestError, match="3 prompts but 2"):
        llm.generate(["a", "b", "c"], [GREEDY, GREEDY])


def test_stop_token_text_and_special_tokens(llm):
    reference = llm.generate("Hello", GREEDY)[0].outputs[0]
    stop_id = reference.token_ids[3]
    params = SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id])
    out = llm.generate("Hello", params)[0].outputs[0]
    assert out.token_ids[-1] == stop_id and out.stop_reason == stop_id
    assert out.text == llm.tokenizer.decode(out.token_ids[:-1]), "the stop token's text is left out"
    params.include_stop_str_in_output = True
    assert llm.generate("Hello", params)[0].outputs[0].text == llm.tokenizer.decode(out.token_ids)
    (im_end,) = llm.tokenizer.encode("<|im_end|>", add_special_tokens=False)
    for skip, expected in ((True, ""), (False, "<|im_end|>")):
        state = llm.engine.make_request("Hello", SamplingParams(skip_special_tokens=skip))
        assert state.texts[0].detokenizer.step(im_end) == expected


def test_async_duplicate_ids_and_closed_loops_do_not_hang_others(model_dir):
    llm = AsyncLLM(model_dir, **CONFIG)

    async def collect(request_id, max_tokens=20):
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        return [out async for out in llm.generate("Hello", params, request_id=request_id)][-1]

    async def main():
        first = asyncio.create_task(collect("same", 60))
        await asyncio.sleep(0)
        second = asyncio.create_task(collect("same"))
        results = await asyncio.gather(first, second, return_exceptions=True)
        return results

    try:
        first, second = asyncio.run(main())
        assert isinstance(second, InvalidRequestError) and "already in use" in str(second)
        assert first.finished and first.outputs[0].finish_reason == "length", "the first caller is unharmed"
        # a caller whose event loop is gone: the engine thread survives and serves the next one
        loop = asyncio.new_event_loop()
        agen = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        loop.run_until_complete(agen.__anext__())
        loop.close()
        assert asyncio.run(collect("after")).finished
    finally:
        llm.shutdown()


def test_embeddings_are_the_normalized_last_hidden_state(llm, model_dir):
    import torch
    from transformers import AutoModel

    prompts = ["Once upon a time", "def add(a, b):", "Once upon a time there was"]
    reference = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
    expected = []
    for prompt in prompts:
        ids = torch.tensor([llm.tokenizer.encode(prompt)])
        with torch.no_grad():
            last = reference(ids).last_hidden_state[0, -1]
        expected.append(torch.nn.functional.normalize(last, dim=0).tolist())
    vectors = llm.embed(prompts)  # batched, and the third prompt shares the first one's prefix
    torch.testing.assert_close(torch.tensor(vectors), torch.tensor(expected), atol=1e-4, rtol=1e-4)
    # alone as in a batch; a prefix-cache hit changes nothing (up to float rounding of batched matmuls)
    torch.testing.assert_close(torch.tensor(llm.embed(prompts[0])), torch.tensor(vectors[:1]))

    # pooling requests in the same batch as generation leave the generated tokens unchanged
    alone = llm.generate(PROMPTS, GREEDY)
    states = [llm.engine.make_request(p, GREEDY) for p in PROMPTS]
    states += [llm.engine.make_request(p, pooling=True) for p in prompts]
    mixed = llm.backend.run(states)
    assert [o.outputs[0].token_ids for o in mixed[: len(PROMPTS)]] == [o.outputs[0].token_ids for o in alone]
    torch.testing.assert_close(
        torch.tensor([o.embedding for o in mixed[len(PROMPTS) :]]), torch.tensor(vectors)
    )
    assert all(o.usage["completion_tokens"] == 0 for o in mixed[len(PROMPTS) :])


def test_async_generate_honours_the_output_kind(model_dir):
    from llmasos.outputs import RequestOutputKind, accumulate

    llm = AsyncLLM(model_dir, **CONFIG)

    async def outputs(kind):
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, output_kind=kind)
        return [out async for out in llm.generate("Hello", params)]

    try:
        cumulative, deltas, final_only = (asyncio.run(outputs(kind)) for kind in RequestOutputKind)
        assert len(cumulative) == len(deltas) == 12 and len(final_only) == 1
        assert accumulate(deltas).outputs == cumulative[-1].outputs == final_only[0].outputs
        assert [len(d.outputs[0].token_ids) for d in deltas] == [1] * 12
    finally:
        llm.shutdown()


def test_async_llm_opens_through_the_runtime_switch_and_refuses_a_non_decoder_unloaded(
    model_dir, tmp_path, monkeypatch
):
    import llmasos.api
    from llmasos.errors import UnsupportedModelError

    from tiny_families import save_t5

    t5 = save_t5(tmp_path / "t5")
    opened = []
    monkeypatch.setattr(llmasos.api, "open_model", lambda *a: opened.append(a) or pytest.fail("loaded"))
    with pytest.raises(UnsupportedModelError, match="seq2seq model that runs on the transformers engine"):
        AsyncLLM(str(t5), **CONFIG)
    assert not opened
    monkeypatch.undo()
    llm = AsyncLLM(model_dir, **CONFIG)
    try:
        assert llm.engine.max_model_len > 0 and llm.engine.device.type == "cpu"
    finally:
        llm.shutdown()


def test_an_llm_is_a_whole_backend(llm):
    """The apps (eval, explain, the judge) read these from whatever model they are given."""
    import torch

    from llmasos.runtime import Backend

    assert (
        isinstance(llm, Backend) and isinstance(llm.backend, Backend) and isinstance(llm.tasks.model, Backend)
    )
    assert (llm.device, llm.dtype, llm.labels) == (torch.device("cpu"), llm.engine.dtype, ())
    assert llm.batch_size == llm.engine.config.max_num_seqs and llm.module is llm.engine.model
