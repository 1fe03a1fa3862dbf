"""The prefix cache that survives restarts (kernel/disk_cache.py): files checked on every read, a size
bound with LRU eviction, and engines (a restart) that read a prefix back instead of computing it."""

import hashlib
import os

import pytest

from llmasos.config import EngineConfig
from llmasos.errors import LLMasOSError
from llmasos.kernel import disk_cache
from llmasos.kernel.core import EngineCore
from llmasos.kernel.disk_cache import DiskPrefixCache
from llmasos.kernel.memory import chain_hash
from llmasos.kernel.sequence import Sequence
from llmasos.sampling_params import SamplingParams

from tiny import save_tiny_model

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
KEY = hashlib.sha256(b"model a").digest()
BLOCK = 1000  # payload bytes of a block in the file-level tests


@pytest.fixture
def restart(monkeypatch):
    """Forget the folders this process has seen, as a new process would: the next cache scans its folder."""

    def forget() -> None:
        disk_cache._flush_all()
        monkeypatch.setattr(disk_cache, "_folders", {})

    forget()
    return forget


def block(i: int) -> tuple[bytes, tuple[int, ...], bytes]:
    """A block's chain hash, tokens and payload, all different per i."""
    tokens = (i, i + 1, i + 2, i + 3)
    return chain_hash(b"", tokens), tokens, bytes([i % 256]) * BLOCK


def saved(folder, *indices, key=KEY, max_bytes=10**6) -> DiskPrefixCache:
    cache = DiskPrefixCache(folder, max_bytes, key, BLOCK)
    for i in indices:
        cache.save(*block(i))
    cache.flush()
    return cache


def test_a_block_is_read_back_after_a_restart_with_its_tokens_checked(tmp_path, restart):
    saved(tmp_path, 1, 2)
    restart()
    cache = DiskPrefixCache(tmp_path, 10**6, KEY, BLOCK)
    assert cache.num_files == 2
    block_hash, tokens, payload = block(1)
    assert cache.load(block_hash, tokens) == payload
    assert cache.load(*block(3)[:2]) is None  # never saved
    assert cache.hit_blocks == 1


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[:-1], id="truncated"),
        pytest.param(lambda data: data[:40], id="truncated-header"),
        pytest.param(lambda data: data[:-1] + bytes([data[-1] ^ 1]), id="payload-bit-flipped"),
        pytest.param(lambda data: b"NOTKV01\n" + data[8:], id="not-a-kv-file"),
        pytest.param(lambda data: b"", id="empty"),
    ],
)
def test_a_damaged_file_is_a_miss_and_is_removed(tmp_path, restart, damage):
    cache = saved(tmp_path, 1)
    block_hash, tokens, _ = block(1)
    path = cache.path / cache.name(block_hash)
    path.write_bytes(damage(path.read_bytes()))
    restart()
    cache = DiskPrefixCache(tmp_path, 10**6, KEY, BLOCK)
    assert cache.load(block_hash, tokens) is None
    assert not path.exists() and cache.num_files == 0 and cache.dropped_files == 1


def test_another_models_file_under_this_models_name_is_refused(tmp_path, restart):
    other = saved(tmp_path, 1, key=hashlib.sha256(b"model b").digest())
    block_hash, tokens, _ = block(1)
    mine = DiskPrefixCache(tmp_path, 10**6, KEY, BLOCK)
    assert mine.load(block_hash, tokens) is None  # named apart: no file of its own
    os.replace(other.path / other.name(block_hash), mine.path / mine.name(block_hash))
    restart()
    mine = DiskPrefixCache(tmp_path, 10**6, KEY, BLOCK)
    assert mine.load(block_hash, tokens) is None and mine.dropped_files == 1


def test_a_file_whose_tokens_differ_from_the_prompts_is_refused(tmp_path):
    cache = saved(tmp_path, 1)
    block_hash, tokens, _ = block(1)
    assert cache.load(block_hash, (9, 9, 9, 9)) is None  # as if two prefixes collided on one hash
    assert cache.dropped_files == 1


def test_the_folder_keeps_its_bound_evicting_the_least_recently_used(tmp_path, restart):
    size = saved(tmp_path, 1).total_bytes
    restart()  # (a process keeps the largest bound it was asked for)
    cache = saved(tmp_path, 2, 3, max_bytes=3 * size)
    assert cache.load(*block(1)[:2]) is not None  # 1 is now more recent than 2 and 3
    cache.save(*block(4))
    cache.flush()
    assert [cache.load(*block(i)[:2]) is not None for i in (1, 2, 3, 4)] == [True, False, True, True]
    assert cache.total_bytes == 3 * size == sum(f.stat().st_size for f in tmp_path.iterdir())
    # after a restart the order is the files' times: the oldest goes first under a smaller bound
    for age, i in enumerate((4, 1, 3)):
        os.utime(cache.path / cache.name(block(i)[0]), (1000 + age, 1000 + age))
    restart()
    cache = DiskPrefixCache(tmp_path, 2 * size, KEY, BLOCK)
    assert [cache.load(*block(i)[:2]) is not None for i in (1, 3, 4)] == [True, True, False]


def test_a_crashs_leftover_temporary_file_is_removed_and_a_fresh_one_kept(tmp_path, restart):
    stale, fresh = tmp_path / ".x.1.1.tmp", tmp_path / ".y.1.1.tmp"
    stale.write_bytes(b"half a block")
    fresh.write_bytes(b"another process is writing this")
    os.utime(stale, (1000, 1000))
    DiskPrefixCache(tmp_path, 10**6, KEY, BLOCK)
    assert not stale.exists() and fresh.exists()


def test_bad_settings_are_refused_with_the_fix():
    with pytest.raises(LLMasOSError, match="positive"):
        EngineConfig(kv_disk_cache_gb=0)
    with pytest.raises(LLMasOSError, match="tensor_parallel_size 1"):
        EngineConfig(kv_disk_cache_gb=1, tensor_parallel_size=2)
    with pytest.raises(LLMasOSError, match="enable_prefix_caching"):
        EngineConfig(kv_disk_cache_gb=1, enable_prefix_caching=False)


# -- engines over one folder: a restart --------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


def make_core(model_dir, folder, **overrides):
    config = EngineConfig(
        **{
            "device": "cpu",
            "block_size": 4,
            "num_kv_blocks": 256,
            "kv_disk_cache_gb": 0.01,
            "kv_disk_cache_dir": str(folder),
            **overrides,
        }
    )
    return EngineCore(model_dir, config, eos_token_ids=[2], max_model_len=256)


def run(core, prompt, salt=b""):
    seq = Sequence("r", prompt, GREEDY, cache_salt=salt)
    core.add(seq)
    while core.has_unfinished():
        core.step()
    return seq


SHARED = list(range(10, 50))  # ten full blocks


def test_a_restarted_engine_computes_only_the_uncached_tail_and_gives_the_same_tokens(
    model_dir, tmp_path, restart
):
    first_core = make_core(model_dir, tmp_path)
    first = run(first_core, SHARED + [5])
    first_core.shutdown()
    assert first.num_cached_tokens == 0
    restart()
    core = make_core(model_dir, tmp_path)
    again = run(core, SHARED + [5])
    assert again.num_cached_tokens == 40 and again.output_token_ids == first.output_token_ids
    stats = core.stats()
    assert stats.prefix_disk_hit_tokens == stats.prefix_hit_tokens == 40
    assert stats.kv_disk_cache_bytes == sum(f.stat().st_size for f in tmp_path.iterdir())
    # a prompt that shares only five blocks reads those and computes the rest, as a cold engine does
    diverging = SHARED[:20] + [7] * 21
    restart()
    core = make_core(model_dir, tmp_path)
    partial = run(core, diverging)
    cold = run(make_core(model_dir, tmp_path, kv_disk_cache_gb=None), diverging)
    assert partial.num_cached_tokens == 20 and partial.output_token_ids == cold.output_token_ids


def test_a_damaged_block_on_disk_is_recomputed_from_there_on(model_dir, tmp_path, restart):
    core = make_core(model_dir, tmp_path)
    first = run(core, SHARED + [5])
    core.shutdown()
    disk = core.scheduler.disk
    path = disk.path / disk.name(first.block_hashes[3])
    path.write_bytes(path.read_bytes()[:-10])
    restart()
    core = make_core(model_dir, tmp_path)
    again = run(core, SHARED + [5])
    assert again.num_cached_tokens == 12, "the three blocks before the damaged one"
    assert again.output_token_ids == first.output_token_ids
    assert core.scheduler.disk.dropped_files == 1


def test_a_keys_salt_keeps_its_blocks_on_disk_from_other_keys(model_dir, tmp_path, restart):
    core = make_core(model_dir, tmp_path)
    first = run(core, SHARED + [5], salt=b"tenant-a")
    core.shutdown()
    restart()
    core = make_core(model_dir, tmp_path)
    assert run(core, SHARED + [5], salt=b"tenant-b").num_cached_tokens == 0
    assert core.stats().prefix_disk_hit_tokens == 0
    again = run(core, SHARED + [5], salt=b"tenant-a")
    assert again.num_cached_tokens == 40 and again.output_token_ids == first.output_token_ids


def test_another_layout_of_the_same_model_shares_nothing(model_dir, tmp_path, restart):
    core = make_core(model_dir, tmp_path)
    run(core, SHARED + [5])
    core.shutdown()
    restart()
    other = make_core(model_dir, tmp_path, dtype="bfloat16")  # other KV bytes for the same tokens
    assert run(other, SHARED + [5]).num_cached_tokens == 0
