"""Virtual memory for the KV cache: fixed-size blocks, block tables, prefix sharing.

Pure Python over integer block ids; it never touches a tensor. The runner owns the tensors and
turns a block table into slots. A block holds `block_size` tokens of KV for every layer.

Prefix sharing: once a block is full, its identity is a chained hash of all tokens up to and
including it (so equal hashes mean equal prefixes). A new sequence whose leading full blocks hash
the same reuses those blocks instead of recomputing them, with a reference count. Shared blocks
are always full and never written again, so no copy-on-write is needed: a sequence only ever
writes into its own last, partial block. Freed blocks keep their hash and stay reusable until
the allocator needs them (least recently freed first), which is what makes a prefix *cache*.
The chain starts from the sequence's cache salt, so a server can keep tenants' prefixes apart:
one key cannot learn by timing whether another key's prompt is cached.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from llmasos.kernel.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None
    token_ids: tuple[int, ...] = ()  # checked on a hit, so a hash collision cannot leak another prefix


def chain_hash(parent: bytes, token_ids: list[int] | tuple[int, ...]) -> bytes:
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, evicted from the front: uncached blocks go to the front,
        # blocks that still hold a cached prefix go to the back.
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached_block_ids: dict[bytes, int] = {}
        # Free blocks that still hold a cached prefix, kept as a count so that a monitor reads it in
        # O(1) from another thread (iterating free_block_ids there would race the engine's step).
        self.num_cached_free_blocks = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _hash_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Extend seq.block_hashes to cover every full block within the first num_tokens tokens."""
        bs = self.block_size
        for i in range(len(seq.block_hashes), num_tokens // bs):
            parent = seq.block_hashes[-1] if seq.block_hashes else seq.cache_salt
            seq.block_hashes.append(chain_hash(parent, seq.token_ids[i * bs : (i + 1) * bs]))

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Ids of cached blocks holding seq's leading tokens; takes no references.

        The last token is never served from cache: the step must compute at least one token
        to produce the next token's logits.
        """
        if not self.enable_prefix_caching:
            return []
        self._hash_full_blocks(seq, len(seq) - 1)
        hits = []
        for i, block_hash in enumerate(seq.block_hashes[: (len(seq) - 1) // self.block_size]):
            block_id = self.cached_block_ids.get(block_hash)
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    def allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Give seq the blocks for num_new_tokens more tokens, after the cached ones; False if they don't fit.

        cached_blocks come from find_cached_prefix for a sequence that holds no blocks yet.
        All or nothing: on False, nothing changed.
        """
        total = seq.num_computed_tokens + len(cached_blocks) * self.block_size + num_new_tokens
        num_new_blocks = self.blocks_needed(total) - len(seq.block_table) - len(cached_blocks)
        reclaimed = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        if num_new_blocks > self.num_free_blocks - reclaimed:
            return False
        for block_id in cached_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
                self.num_cached_free_blocks -= 1
            block.ref_count += 1
            seq.block_table.append(block_id)
        for _ in range(num_new_blocks):
            block_id, _ = self.free_block_ids.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None:  # evict the cached prefix it held
                self.num_cached_free_blocks -= 1
                del self.cached_block_ids[block.hash]
                block.hash, block.token_ids = None, ()
            block.ref_count = 1
            seq.block_table.append(block_id)
        return True

    def cache_full_blocks(self, seq: Sequence, num_tokens_before: int, num_tokens_after: int) -> list[int]:
        """Publish the blocks that the step now scheduled fills (seq's tokens num_tokens_before up to
        num_tokens_after), so a sequence scheduled later in the same step already hits them: the runner
        writes every new token's KV before any attention reads the cache, layer by layer. Returns the
        ids published, for `uncache` if the step fails."""
        if not self.enable_prefix_caching:
            return []
        self._hash_full_blocks(seq, num_tokens_after)
        bs = self.block_size
        published = []
        for i in range(num_tokens_before // bs, num_tokens_after // bs):
            block = self.blocks[seq.block_table[i]]
            block_hash = seq.block_hashes[i]
            if block.hash is None and block_hash not in self.cached_block_ids:
                block.hash, block.token_ids = block_hash, tuple(seq.token_ids[i * bs : (i + 1) * bs])
                self.cached_block_ids[block_hash] = block.block_id
                published.append(block.block_id)
        return published

    def uncache(self, block_ids: list[int]) -> None:
        """Withdraw published blocks whose KV was never computed (their step failed)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.hash is not None and self.cached_block_ids.get(block.hash) == block_id:
                del self.cached_block_ids[block.hash]
            if block.hash is not None and block.ref_count == 0:
                self.num_cached_free_blocks -= 1
            block.hash, block.token_ids = None, ()

    def free(self, seq: Sequence) -> None:
        """Drop seq's references; blocks nobody uses become free (cached ones stay reusable)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
                if block.hash is None:
                    self.free_block_ids.move_to_end(block_id, last=False)
                else:
                    self.num_cached_free_blocks += 1
        seq.block_table = []
        seq.num_computed_tokens = 0
