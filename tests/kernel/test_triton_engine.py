"""The engine on the Triton attention backend gives the reference backend's greedy tokens: prefills,
prefix-cache hits, chunked prefill and batched decode, through the runner's TritonBatch.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py)."""

import random

import pytest

from llmasos.config import EngineConfig
from llmasos.errors import LLMasOSError
from llmasos.kernel.core import EngineCore
from llmasos.kernel.sequence import Sequence
from llmasos.sampling_params import SamplingParams

from tiny import save_tiny_model

pytest.importorskip("triton")
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


def run(model_dir, backend: str, prompts: list[list[int]], **overrides) -> list[list[int]]:
    config = EngineConfig(
        device="cpu", block_size=4, num_kv_blocks=128, attention_backend=backend, **overrides
    )
    core = EngineCore(model_dir, config, eos_token_ids=[2], max_model_len=256)
    seqs = [Sequence(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)]
    for wave in (seqs[:1], seqs[1:]):  # the first alone, so the others find its prefix in the cache
        for seq in wave:
            core.add(seq)
        while core.has_unfinished():
            core.step()
    assert sum(seq.num_cached_tokens for seq in seqs) > 0
    return [seq.output_token_ids for seq in seqs]


@pytest.mark.slow
def test_triton_backend_gives_the_reference_tokens(model_dir):
    rng = random.Random(0)
    shared = [rng.randrange(3, 380) for _ in range(13)]
    prompts = [shared + [rng.randrange(3, 380) for _ in range(n)] for n in (1, 4, 9)] + [[7], [9, 10, 11, 12]]
    expected = run(model_dir, "torch", prompts)
    assert run(model_dir, "triton", prompts) == expected
    assert run(model_dir, "triton", prompts, max_num_batched_tokens=5) == expected  # chunked prefill


def test_unknown_backend_is_refused(model_dir):
    with pytest.raises(LLMasOSError, match="torch or triton"):
        run(model_dir, "flash", [[5], [6]])
