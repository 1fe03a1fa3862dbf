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

Agents (a sequence's `agent`) are the kernel's processes. Each holds the distinct blocks its
sequences and pins reference, counted per agent, and may hold at most `quota` of them: `allocate`
refuses what would exceed it, so an agent at its quota waits or gives up its own blocks, never
another's. A finished turn's blocks can stay *pinned* for its agent until a deadline (a reference
held by the agent rather than by a sequence), so the agent's next turn, which starts with the same
tokens, hits them even under memory pressure from others; they count against the agent's quota.
Under pressure a pin is released (or, with swap space, first copied to CPU memory: the block
manager only decides which block goes to which CPU slot, and queues the copies for the runner).
A returning turn's swapped-out blocks come back as part of its allocation, whole (with its cached
blocks and new ones) or not at all: a turn that cannot be admitted yet keeps its CPU copy.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from llmasos.kernel.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None
    token_ids: tuple[int, ...] = ()  # checked on a hit, so a hash collision cannot leak another prefix


@dataclass
class Pin:
    """A finished turn's leading cached blocks, referenced by its agent until `expires`."""

    agent: str
    block_ids: list[int]
    expires: float


@dataclass
class SwapSlot:
    """A block's KV copied to CPU memory: its prefix hash, tokens and agent."""

    slot: int
    token_ids: tuple[int, ...]
    agent: str


@dataclass
class SwapCopies:
    """Copies the runner makes before the step's forward pass: out (GPU block -> CPU slot) first,
    since a block swapped out may be reused by this very step, then in (CPU slot -> GPU block)."""

    out: list[tuple[int, int]] = field(default_factory=list)
    into: list[tuple[int, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.out or self.into)


def chain_hash(parent: bytes, token_ids: list[int] | tuple[int, ...]) -> bytes:
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        quota: int | None = None,
        num_swap_slots: int = 0,
    ):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.quota = quota  # most distinct blocks one agent may reference (None: no limit)
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, evicted from the front: uncached blocks go to the front,
        # blocks that still hold a cached prefix go to the back.
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached_block_ids: dict[bytes, int] = {}
        # Free blocks that still hold a cached prefix, kept as a count so that a monitor reads it in
        # O(1) from another thread (iterating free_block_ids there would race the engine's step).
        self.num_cached_free_blocks = 0
        self.agent_blocks: dict[str, Counter[int]] = {}  # agent -> block id -> references it holds
        self.pins: list[Pin] = []  # oldest first
        self.free_swap_slots = list(range(num_swap_slots))
        self.swapped: OrderedDict[bytes, SwapSlot] = OrderedDict()  # least recently swapped out first
        self.copies = SwapCopies()  # queued for the runner; the scheduler hands them to the step
        self._slots_in_flight: list[int] = []  # swapped in this step: not reused before it copies

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

    def find_swapped(self, seq: Sequence, num_cached_blocks: int) -> list[bytes]:
        """Hashes of the blocks of seq's prefix that follow its num_cached_blocks cached on the GPU and
        whose KV lives in CPU memory: the run `allocate` copies back. Takes nothing.

        It stops at a block held in neither place, and at one cached on the GPU after the run started
        (bringing its twin back would shadow it); like `find_cached_prefix`, never the last token.
        """
        if not self.swapped or not self.enable_prefix_caching:
            return []
        bs = self.block_size
        self._hash_full_blocks(seq, len(seq) - 1)
        run = []
        for i in range(num_cached_blocks, (len(seq) - 1) // bs):
            block_hash = seq.block_hashes[i]
            entry = self.swapped.get(block_hash)
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            if entry is None or entry.token_ids != tokens or block_hash in self.cached_block_ids:
                break
            run.append(block_hash)
        return run

    def allocate(
        self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] = (), swapped: list[bytes] = ()
    ) -> bool:
        """Give seq the blocks for num_new_tokens more tokens, after its prefix; False if they don't fit.

        The prefix, for a sequence that holds no blocks yet: cached_blocks from find_cached_prefix, then
        swapped from find_swapped, each brought back into a free block (the copy is queued for the
        runner). All or nothing: on False, nothing changed, so a turn that cannot be admitted yet keeps
        its context's CPU copy; a swapped block's CPU slot is given up only here, once it is back.
        """
        num_prefix = len(cached_blocks) + len(swapped)
        num_new_blocks = self._num_new_blocks(seq, num_new_tokens, num_prefix) + len(swapped)
        reclaimed = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        if num_new_blocks > self.num_free_blocks - reclaimed:
            return False
        if self.quota_lack(seq, num_new_blocks, cached_blocks) > 0:
            return False
        for block_id in cached_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
                self.num_cached_free_blocks -= 1
            self._ref(block_id, seq.agent)
            seq.block_table.append(block_id)
        for block_hash in swapped:
            block_id = self._take_free_block(seq.agent)
            entry = self.swapped.pop(block_hash)
            block = self.blocks[block_id]
            block.hash, block.token_ids = block_hash, entry.token_ids
            self.cached_block_ids[block_hash] = block_id
            self._slots_in_flight.append(entry.slot)  # reusable once this step has copied it
            self.copies.into.append((entry.slot, block_id))
            seq.block_table.append(block_id)
        for _ in range(num_new_blocks - len(swapped)):
            seq.block_table.append(self._take_free_block(seq.agent))
        return True

    def _take_free_block(self, agent: str | None) -> int:
        """The least recently freed block, its cached prefix (if any) evicted, referenced for agent."""
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            self.num_cached_free_blocks -= 1
            del self.cached_block_ids[block.hash]
            block.hash, block.token_ids = None, ()
        self._ref(block_id, agent)
        return block_id

    def _num_new_blocks(self, seq: Sequence, num_new_tokens: int, num_prefix_blocks: int) -> int:
        """Blocks seq lacks for num_new_tokens more tokens after its table and a prefix that long."""
        total = seq.num_computed_tokens + num_prefix_blocks * self.block_size + num_new_tokens
        return self.blocks_needed(total) - len(seq.block_table) - num_prefix_blocks

    def blocks_lacking(
        self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] = (), swapped: list[bytes] = ()
    ) -> int:
        """How many more free blocks `allocate(seq, num_new_tokens, cached_blocks, swapped)` would need."""
        num_prefix = len(cached_blocks) + len(swapped)
        num_new_blocks = self._num_new_blocks(seq, num_new_tokens, num_prefix) + len(swapped)
        reclaimed = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        return num_new_blocks - (self.num_free_blocks - reclaimed)

    def quota_lack(self, seq: Sequence, num_new_blocks: int, cached_blocks: list[int] = ()) -> int:
        """How many blocks over its quota seq's agent would go with num_new_blocks new blocks and
        references to cached_blocks (0 or less: within it)."""
        if self.quota is None or seq.agent is None:
            return 0
        held = self.agent_blocks.get(seq.agent, {})
        taken = sum(1 for b in dict.fromkeys(cached_blocks) if b not in held)
        return len(held) + num_new_blocks + taken - self.quota

    def quota_lack_tokens(
        self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] = (), swapped: list[bytes] = ()
    ) -> int:
        num_prefix = len(cached_blocks) + len(swapped)
        num_new_blocks = self._num_new_blocks(seq, num_new_tokens, num_prefix) + len(swapped)
        return self.quota_lack(seq, num_new_blocks, cached_blocks)

    def agent_usage(self, agent: str) -> int:
        """Distinct blocks the agent references (its sequences' and its pins')."""
        return len(self.agent_blocks.get(agent, ()))

    def _ref(self, block_id: int, agent: str | None) -> None:
        self.blocks[block_id].ref_count += 1
        if agent is not None:
            self.agent_blocks.setdefault(agent, Counter())[block_id] += 1

    def _unref(self, block_id: int, agent: str | None) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if agent is not None:
            held = self.agent_blocks[agent]
            held[block_id] -= 1
            if not held[block_id]:
                del held[block_id]
                if not held:
                    del self.agent_blocks[agent]
        if block.ref_count == 0:
            self.free_block_ids[block_id] = None
            if block.hash is None:
                self.free_block_ids.move_to_end(block_id, last=False)
            else:
                self.num_cached_free_blocks += 1

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

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Keep only the blocks seq's first num_tokens tokens need (speculative decoding's rejected drafts:
        their blocks were never published, kernel/scheduler.py, so dropping them is all it takes)."""
        keep = self.blocks_needed(num_tokens)
        for block_id in reversed(seq.block_table[keep:]):
            self._unref(block_id, seq.agent)
        del seq.block_table[keep:]

    def uncache(self, block_ids: list[int]) -> None:
        """Withdraw published blocks whose KV was never computed (their step failed)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.hash is not None and self.cached_block_ids.get(block.hash) == block_id:
                del self.cached_block_ids[block.hash]
            if block.hash is not None and block.ref_count == 0:
                self.num_cached_free_blocks -= 1
            block.hash, block.token_ids = None, ()

    def free(self, seq: Sequence, pin_until: float | None = None) -> None:
        """Drop seq's references; blocks nobody uses become free (cached ones stay reusable).

        pin_until: keep the leading blocks that hold a published prefix referenced by seq's agent
        until then (a finished turn whose agent will be back), instead of dropping them."""
        keep = 0
        if pin_until is not None and seq.agent is not None and self.enable_prefix_caching:
            while keep < len(seq.block_table) and self.blocks[seq.block_table[keep]].hash is not None:
                keep += 1
        if keep:
            self.pins.append(Pin(seq.agent, seq.block_table[:keep], pin_until))
        for block_id in reversed(seq.block_table[keep:]):
            self._unref(block_id, seq.agent)
        seq.block_table = []
        seq.num_computed_tokens = seq.num_draft_computed_tokens = 0  # the draft model's KV went too

    # -- pins and swap ----------------------------------------------------------------------------
    def pinned_blocks(self, agent: str) -> int:
        return len({b for pin in self.pins if pin.agent == agent for b in pin.block_ids})

    def swapped_blocks(self, agent: str) -> int:
        return sum(1 for entry in self.swapped.values() if entry.agent == agent)

    def release_pin(self, pin: Pin, swap: bool = False) -> None:
        """Drop the pin's references; with swap, first queue a CPU copy of each block it alone held."""
        self.pins.remove(pin)
        if swap:
            for block_id in pin.block_ids:
                if self.blocks[block_id].ref_count == 1:
                    self._swap_out(block_id, pin.agent)
        for block_id in reversed(pin.block_ids):
            self._unref(block_id, pin.agent)

    def release_expired(self, now: float) -> None:
        for pin in [p for p in self.pins if p.expires <= now]:
            self.release_pin(pin)

    def release_pins_hit(self, agent: str, block_ids: list[int]) -> None:
        """The agent's next turn holds these blocks now: the pins that held them are done."""
        hit = set(block_ids)
        for pin in [p for p in self.pins if p.agent == agent and hit.intersection(p.block_ids)]:
            self.release_pin(pin)

    def reclaim_pins(self, agent: str | None = None, keep: list[int] = (), swap: bool = False) -> bool:
        """Release the oldest pin (of `agent` only, if given) to make room, one holding none of `keep`
        (the blocks the caller is about to reference) first; False if there is none."""
        pins = [pin for pin in self.pins if agent is None or pin.agent == agent]
        if not pins:
            return False
        keep_ids = set(keep)
        pin = next((p for p in pins if not keep_ids.intersection(p.block_ids)), pins[0])
        self.release_pin(pin, swap)
        return True

    def _swap_out(self, block_id: int, agent: str) -> None:
        block = self.blocks[block_id]
        if block.hash is None or block.hash in self.swapped:
            return
        if not self.free_swap_slots:
            if not self.swapped:
                return
            _, oldest = self.swapped.popitem(last=False)  # the least recently swapped out gives way
            self.free_swap_slots.append(oldest.slot)
        slot = self.free_swap_slots.pop()
        self.swapped[block.hash] = SwapSlot(slot, block.token_ids, agent)
        self.copies.out.append((block_id, slot))

    def hold_cached(self, block_hash: bytes, token_ids: tuple[int, ...], keep: set[int]) -> int | None:
        """A free block, none of `keep` (the prefix it extends), made the cached block of block_hash,
        for KV restored from outside the cache (the disk cache): unreferenced, at the back of the free
        list, so `find_cached_prefix` hits it. None when taking one would leave no free block."""
        target = next((b for b in self.free_block_ids if b not in keep), None)
        if target is None or self.num_free_blocks < 2:
            return None
        block = self.blocks[target]
        if block.hash is not None:
            del self.cached_block_ids[block.hash]
        else:
            self.num_cached_free_blocks += 1
        block.hash, block.token_ids = block_hash, token_ids
        self.cached_block_ids[block_hash] = target
        self.free_block_ids.move_to_end(target)
        return target

    def take_copies(self) -> SwapCopies:
        """The copies queued since the last call, for this step's runner."""
        copies, self.copies = self.copies, SwapCopies()
        self.free_swap_slots += self._slots_in_flight
        self._slots_in_flight = []
        return copies
