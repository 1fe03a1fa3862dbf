"""Multi-LoRA serving in the kernel: one batch mixing 8 adapters gives each request the tokens of its
adapter merged and run alone, on the Python layers, the C++ decode stack and a GGUF base; adapter
slots load and unload least recently used; bad adapter names are refused before anything queues."""

import pytest
from gguf import GGMLQuantizationType as Q

from llmasos import LLM, SamplingParams
from llmasos.errors import InvalidRequestError, ModelNotFoundError
from llmasos.ops.lora import LoraBatch
from llmasos.train.finetune import LORA_TARGETS

from tiny_gguf import write_tiny_gguf
from tiny_lora import save_tiny_lora

ENGINE = dict(device="cpu", block_size=4, num_kv_blocks=256)
PROMPTS = ["Hello, world!", "The capital of France", "def add(a, b):", "Once upon a time"]


@pytest.fixture(scope="module")
def adapters(store, tmp_path_factory):
    """8 adapters of the tiny Llama and 8 of a tiny Q8_0 GGUF Llama, different ranks and targets."""
    work = tmp_path_factory.mktemp("adapters")
    store.import_path(write_tiny_gguf(work / "q8.gguf", "llama", Q.Q8_0), "tiny-q8", progress=False)
    names = {"tiny": [], "tiny-q8": []}
    for base in names:
        for i in range(8):
            targets = ["q_proj", "v_proj"] if i == 3 else LORA_TARGETS
            name = f"{base}-lora{i}"
            save_tiny_lora(store, base, name, seed=i, work=work, rank=4 if i % 2 else 8, targets=targets)
            names[base].append(name)
    return names


def greedy(lora: str | None = None, max_tokens: int = 10) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, lora=lora)


def tokens(outputs) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in outputs]


@pytest.mark.parametrize(
    "base,decode_stack", [("tiny", False), ("tiny", True), ("tiny-q8", True)], ids=["python", "stack", "gguf"]
)
def test_a_batch_mixing_8_adapters_gives_each_its_merged_model_alone(store, adapters, base, decode_stack):
    names = adapters[base]
    llm = LLM(base, enable_lora=True, max_loras=8, decode_stack=decode_stack, **ENGINE)
    # 16 requests, two per adapter, plus two on the base model, all in one batch
    jobs = [(PROMPTS[i % len(PROMPTS)], names[i % 8]) for i in range(16)] + [(PROMPTS[0], None)] * 2
    mixed = tokens(llm.generate([p for p, _ in jobs], [greedy(lora) for _, lora in jobs]))
    assert llm.engine.core.runner.lora.stats().loads == 8
    if decode_stack:
        assert llm.engine.core.runner.decode_stack is not None  # decode steps ran the C++ stack
    alone = {}
    for name in names:  # the adapter as the store loads it on its own: merged into float weights
        merged = LLM(name, decode_stack=decode_stack, **ENGINE)
        alone[name] = tokens(merged.generate(PROMPTS, greedy()))
    base_alone = tokens(LLM(base, decode_stack=decode_stack, **ENGINE).generate(PROMPTS[:1], greedy()))
    for i, ((prompt, lora), got) in enumerate(zip(jobs, mixed)):
        expected = alone[lora][PROMPTS.index(prompt)] if lora else base_alone[0]
        assert got == expected, (i, lora)
    assert len({tuple(alone[name][0]) for name in names}) > 4  # the adapters do answer differently


def test_slots_load_and_unload_least_recently_used(store, adapters):
    a, b, c = adapters["tiny"][:3]
    llm = LLM("tiny", enable_lora=True, max_loras=2, **ENGINE)
    slots = llm.engine.core.runner.lora
    run = lambda name: tokens(llm.generate(PROMPTS[:1], greedy(name)))[0]  # noqa: E731
    first_a = run(a)
    run(b)
    assert slots.stats().loaded == [a, b]
    run(a)  # a is now the most recently used: c replaces b
    run(c)
    assert slots.stats().loaded == [a, c] and slots.stats().evictions == 1
    assert run(b) == tokens(LLM(b, **ENGINE).generate(PROMPTS[:1], greedy()))[0]  # b reloaded, evicting a
    assert slots.stats().loaded == [c, b] and slots.stats().loads == 4
    assert run(a) == first_a


def test_more_adapters_at_once_than_slots_wait_for_a_slot(store, adapters):
    names = adapters["tiny"][:5]
    llm = LLM("tiny", enable_lora=True, max_loras=2, **ENGINE)
    got = tokens(llm.generate([PROMPTS[1]] * 5, [greedy(name, max_tokens=6) for name in names]))
    for name, out in zip(names, got):
        assert out == tokens(LLM(name, **ENGINE).generate(PROMPTS[1:2], greedy(max_tokens=6)))[0]
    assert llm.engine.core.runner.lora.stats().loads == 5
    assert not llm.engine.core.lora_waiting


def test_adapters_keep_their_prefix_cache_apart(store, adapters):
    a, b = adapters["tiny"][:2]
    llm = LLM("tiny", enable_lora=True, **ENGINE)
    long_prompt = PROMPTS[2] * 4  # several full blocks, which the prefix cache would share
    first = tokens(llm.generate([long_prompt], greedy(a)))[0]
    second = tokens(llm.generate([long_prompt], greedy(b)))[0]
    assert second == tokens(LLM(b, **ENGINE).generate([long_prompt], greedy()))[0] != first


def test_bad_adapter_names_are_refused_before_anything_queues(store, adapters):
    llm = LLM("tiny", enable_lora=True, **ENGINE)
    with pytest.raises(ModelNotFoundError, match="no LoRA adapter 'nope' in the store"):
        llm.generate("Hi", greedy("nope"))
    with pytest.raises(InvalidRequestError, match="is a model, not a LoRA adapter"):
        llm.generate("Hi", greedy("tiny-q8"))
    with pytest.raises(InvalidRequestError, match="adapter of another base model"):
        llm.generate("Hi", greedy(adapters["tiny-q8"][0]))
    with pytest.raises(InvalidRequestError, match="start it with enable_lora=True"):
        LLM("tiny", **ENGINE).generate("Hi", greedy(adapters["tiny"][0]))
    small = LLM("tiny", enable_lora=True, max_lora_rank=4, **ENGINE)
    with pytest.raises(InvalidRequestError, match="rank 8, above this engine's max_lora_rank 4"):
        small.generate("Hi", greedy(adapters["tiny"][0]))
    assert not llm.engine.core.has_unfinished()


def test_a_step_without_adapters_builds_no_lora_batch(store, adapters):
    llm = LLM("tiny", enable_lora=True, **ENGINE)
    llm.generate("Hi", greedy())
    assert llm.engine.core.runner.lora.ctx.batch is None
    llm.generate("Hi", greedy(adapters["tiny"][0], max_tokens=2))
    assert isinstance(llm.engine.core.runner.lora.ctx.batch, LoraBatch)
