"""Which replica gets a request: prefix-hash affinity under a load bound, as SGLang's router and Ray
Serve's prefix-aware router do. Pure Python over plain data; the router (serve/router.py) feeds it.

A replica's prefix cache holds the KV of prompts it has computed, so a request whose prompt starts
like one a replica served recently is cheapest there. The router does not load the model, so it
cannot hash tokens as the kernel does (kernel/memory.py); like SGLang's router it works on the text
instead: the prompt, as the messages render before the chat template, is cut into chunks of
CHUNK_CHARS characters (about one 16-token KV block), each chunk's identity a hash chained over all
chunks before it and salted with the caller's API key, the kernel's salt too (one key's prefixes
never hit another key's cache). Each replica keeps an LRU set of the chunk hashes it was sent: an
approximation of its cache, which forgets what the replica's own LRU may have evicted first.

Choice, for each request:
1. A replica is *eligible* when it is healthy and its in-flight requests, with this one, stay within
   BALANCE_FACTOR x the mean + BALANCE_SLACK: a replica that holds every prefix must not take every
   request. The least-loaded healthy replica is always eligible.
2. The agent's replica (metadata.agent / X-Agent / user, per key) if it is eligible: an agent's turns
   share their whole history, and a replica may keep the agent's blocks pinned (kernel agents).
3. Else the eligible replica with the longest matching prefix, if any matches.
4. Else (a new prefix) the least loaded, then the one sent fewest requests: new prefixes spread.
`RoundRobin` is the baseline the benchmarks compare against.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

CHUNK_CHARS = 64  # about 16 tokens of English text: one KV block of the default block size
BALANCE_FACTOR = 1.25
BALANCE_SLACK = 1.0
PREFIXES_PER_REPLICA = 200_000  # chunk hashes remembered per replica (32 bytes each)
AGENTS_REMEMBERED = 100_000


@dataclass
class RouteKey:
    """What the router knows of a request: its prompt text, the caller's salt and its agent."""

    text: str
    salt: str = ""  # a hash of the caller's API key ("" for an open server)
    agent: str | None = None

    def chunk_hashes(self) -> list[bytes]:
        """The chained hashes of the prompt's full CHUNK_CHARS-character chunks (a partial last chunk
        is not a reusable block in the kernel either)."""
        hashes, parent = [], hashlib.sha256(self.salt.encode()).digest()
        for start in range(0, len(self.text) - CHUNK_CHARS + 1, CHUNK_CHARS):
            parent = hashlib.sha256(parent + self.text[start : start + CHUNK_CHARS].encode()).digest()
            hashes.append(parent)
        return hashes


@dataclass
class ReplicaLoad:
    """One replica as the policy sees it."""

    healthy: bool = False
    in_flight: int = 0  # requests sent to it and not yet finished
    routed: int = 0  # requests sent to it since start
    prefixes: OrderedDict[bytes, None] = field(default_factory=OrderedDict)  # LRU chunk hashes

    def match(self, hashes: list[bytes]) -> int:
        """Leading chunks this replica has seen: chained hashes make a match a whole prefix."""
        matched = 0
        for h in hashes:
            if h not in self.prefixes:
                break
            matched += 1
        return matched

    def remember(self, hashes: list[bytes]) -> None:
        for h in hashes:
            self.prefixes[h] = None
            self.prefixes.move_to_end(h)
        while len(self.prefixes) > PREFIXES_PER_REPLICA:
            self.prefixes.popitem(last=False)

    def forget(self) -> None:
        """The replica restarted: its cache is empty."""
        self.prefixes.clear()


class NoReplica(Exception):
    """No replica is healthy."""


class PrefixAffinity:
    """The cache-aware policy (see the module's docstring)."""

    name = "prefix"

    def __init__(self, replicas: list[ReplicaLoad]):
        self.replicas = replicas
        self.agents: OrderedDict[tuple[str, str], int] = OrderedDict()  # (salt, agent) -> replica

    def choose(self, key: RouteKey, exclude: frozenset[int] = frozenset()) -> int:
        """The replica for `key`, noted as holding its prefix; NoReplica when none is healthy. `exclude`:
        replicas that already failed this request."""
        healthy = [i for i, r in enumerate(self.replicas) if r.healthy and i not in exclude]
        if not healthy:
            raise NoReplica
        total = sum(self.replicas[i].in_flight for i in healthy)
        bound = BALANCE_FACTOR * (total + 1) / len(healthy) + BALANCE_SLACK
        eligible = [i for i in healthy if self.replicas[i].in_flight + 1 <= bound]
        hashes = key.chunk_hashes()
        agent = (key.salt, key.agent) if key.agent else None
        chosen = self.agents.get(agent) if agent else None
        if chosen not in eligible:
            matches = {i: self.replicas[i].match(hashes) for i in eligible}
            best = max(matches.values())
            candidates = [i for i in eligible if matches[i] == best] if best else eligible
            chosen = min(candidates, key=lambda i: (self.replicas[i].in_flight, self.replicas[i].routed, i))
        self.replicas[chosen].remember(hashes)
        if agent:
            self.agents[agent] = chosen
            self.agents.move_to_end(agent)
            if len(self.agents) > AGENTS_REMEMBERED:
                self.agents.popitem(last=False)
        return chosen


class RoundRobin:
    """Each healthy replica in turn, blind to prefixes: the baseline."""

    name = "round-robin"

    def __init__(self, replicas: list[ReplicaLoad]):
        self.replicas = replicas
        self.next = 0

    def choose(self, key: RouteKey, exclude: frozenset[int] = frozenset()) -> int:
        n = len(self.replicas)
        for step in range(n):
            i = (self.next + step) % n
            if self.replicas[i].healthy and i not in exclude:
                self.next = i + 1
                return i
        raise NoReplica


POLICIES = {policy.name: policy for policy in (PrefixAffinity, RoundRobin)}
