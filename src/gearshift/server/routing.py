"""Which replica gets a request: cache-aware routing (SGLang's policy) or round-robin, in plain Python.

Each replica's engine keeps a prefix cache (`prefix_cache.py`): a request whose prompt continues
what a replica last computed (the next turn of a chat, the same long system prompt) reads only
what is new there, and everything on any other replica. So the router remembers, per replica,
which token sequences it sent there (a radix tree over token ids, as SGLang's cache-aware router
keeps over text), and sends a request to the replica holding the longest matching prefix when
that match covers enough of the prompt (`cache_threshold`, SGLang's 0.5). Otherwise, or when the
load is too uneven (SGLang's two balance thresholds, both must be exceeded: max - min load >
`balance_abs_threshold` and max > min * `balance_rel_threshold`), it goes to the least loaded
replica, ties to the one holding the least (the most room to cache something new).

The tree is only a model of the replicas' caches, learnt from routing: a prompt is recorded when
it is routed, the prompt and its answer when the answer is complete (the engine's slot then holds
both, and a chat's next turn starts with them). It is bounded (`max_tree_tokens` token entries
across all replicas; least recently used first out) and may be lost at any time: a new router
starts empty and relearns from traffic, and a replica that dies or leaves takes its entries with
it (its successor starts with an empty cache anyway). A wrong guess costs speed, never
correctness: every replica computes whatever it does not hold.

Nothing here knows about Ray: `cluster.py` calls `Router.choose` from Ray Serve's request
router with the live replicas and their queue lengths.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import GearshiftError

POLICIES = ("cache-aware", "round-robin")


@dataclass
class RoutingConfig:
    policy: str = "cache-aware"
    cache_threshold: float = 0.5  # SGLang's: the share of the prompt a replica must hold to get it
    balance_abs_threshold: int = 2  # SGLang's is 32, for GPU servers batching hundreds; here 1/4 of 8 slots
    balance_rel_threshold: float = 1.0001  # SGLang's
    max_tree_tokens: int = 1 << 22  # token entries kept across all replicas (~4M: tens of MB of Python objects)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise GearshiftError(f"routing policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if not 0 <= self.cache_threshold <= 1:
            raise GearshiftError(f"cache_threshold must be from 0 to 1, got {self.cache_threshold}")
        if self.balance_abs_threshold < 0 or self.balance_rel_threshold < 1:
            raise GearshiftError("balance_abs_threshold must be >= 0 and balance_rel_threshold >= 1")
        if self.max_tree_tokens < 1:
            raise GearshiftError("max_tree_tokens must be positive")


class _Node:
    __slots__ = ("key", "children", "parent", "tenants")

    def __init__(self, key: tuple[int, ...], parent: "_Node | None"):
        self.key = key  # the edge's tokens, from the parent to this node
        self.children: dict[int, _Node] = {}  # by first token
        self.parent = parent
        self.tenants: dict[str, float] = {}  # replica -> when it last routed through here


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case, compared in C
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixTree:
    """A radix tree over token ids; each node knows which replicas (tenants) hold its path.

    A tenant that holds a node holds all its ancestors (a cache holds prefixes), so a longest
    match is a walk from the root. Size is counted in token entries (an edge's length times its
    tenants); past `max_tokens`, the least recently used (node, tenant) pairs go first, deepest
    first among equals, down to 90% of the bound."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.root = _Node((), None)
        self.size = 0
        self.held: dict[str, int] = {}  # token entries per tenant

    def insert(self, tokens: Sequence[int], tenant: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        node, rest = self.root, tuple(tokens)
        while rest:
            child = node.children.get(rest[0])
            if child is None:
                child = _Node(rest, node)
                node.children[rest[0]] = child
            else:
                n = _common(child.key, rest)
                if n < len(child.key):  # split the edge: child keeps its tail under a new middle node
                    middle = _Node(child.key[:n], node)
                    middle.tenants = dict(child.tenants)
                    node.children[rest[0]] = middle
                    child.key, child.parent = child.key[n:], middle
                    middle.children[child.key[0]] = child  # entries are unchanged: one edge became two
                    child = middle
            if tenant not in child.tenants:
                self.size += len(child.key)
                self.held[tenant] = self.held.get(tenant, 0) + len(child.key)
            child.tenants[tenant] = now
            node, rest = child, rest[len(child.key) :]
        if self.size > self.max_tokens:
            self.evict(int(self.max_tokens * 0.9))

    def match(self, tokens: Sequence[int], tenants: Iterable[str]) -> tuple[int, set[str]]:
        """The longest prefix of `tokens` that any of `tenants` holds, and which of them hold it."""
        allowed = set(tenants)
        node, rest, matched, holders = self.root, tuple(tokens), 0, set()
        while rest:
            child = node.children.get(rest[0])
            if child is None:
                break
            here = allowed.intersection(child.tenants)
            if not here:
                break
            n = _common(child.key, rest)
            matched, holders = matched + n, here
            if n < len(child.key):
                break
            node, rest = child, rest[n:]
        return matched, holders

    def remove_tenant(self, tenant: str) -> None:
        stack = [self.root]
        while stack:
            node = stack.pop()
            for key, child in list(node.children.items()):
                if tenant in child.tenants:
                    del child.tenants[tenant]
                    self.size -= len(child.key)
                    stack.append(child)
                    if not child.tenants:  # nobody holds it, so nobody holds anything below it either
                        del node.children[key]
        self.held.pop(tenant, None)

    def evict(self, target: int) -> None:
        pairs = []
        stack = [(self.root, 0)]
        while stack:
            node, depth = stack.pop()
            for child in node.children.values():
                pairs += [(t, -depth - 1, id(child), child, tenant) for tenant, t in child.tenants.items()]
                stack.append((child, depth + 1))
        pairs.sort(key=lambda p: p[:3])  # oldest first; deepest first among equals (a path shares one time)
        for _, _, _, node, tenant in pairs:
            if self.size <= target:
                break
            if any(tenant in c.tenants for c in node.children.values()):
                continue  # still a prefix of something newer this tenant holds
            del node.tenants[tenant]
            self.size -= len(node.key)
            self.held[tenant] -= len(node.key)
            if not node.tenants:
                del node.parent.children[node.key[0]]


@dataclass
class Decision:
    order: list[str]  # replicas, most preferred first
    reason: str  # "cache" (longest prefix), "load" (least loaded), "balance" (load too uneven), "round-robin"
    matched: int = 0  # prompt tokens the first choice is thought to hold


class Router:
    """The policy and its state; thread-safe (Ray Serve calls it from its router loop, the front
    from its own when an answer completes)."""

    def __init__(self, config: RoutingConfig | None = None):
        self.config = config or RoutingConfig()
        self.tree = PrefixTree(self.config.max_tree_tokens)
        self.lock = threading.Lock()
        self.counter = itertools.count()
        self.decisions: dict[str, int] = {}  # by reason, counted when a request is routed
        # requests in flight per replica, kept by the front that shares this router (cluster.RayBackend):
        # exact and current, where a CPU-bound replica's answer to a queue-length probe can come late
        self.in_flight: collections.Counter[str] = collections.Counter()

    def choose(self, tokens: Sequence[int], loads: dict[str, int]) -> Decision:
        """Order the replicas in `loads` (replica -> requests in flight) for a prompt."""
        if not loads:
            raise ValueError("no replicas to choose from")
        ids = sorted(loads)
        by_load = sorted(ids, key=lambda r: loads[r])
        with self.lock:
            if self.config.policy == "round-robin":
                k = next(self.counter) % len(ids)
                return Decision(ids[k:] + ids[:k], "round-robin")
            lo, hi = loads[by_load[0]], loads[by_load[-1]]
            c = self.config
            if hi - lo > c.balance_abs_threshold and hi > lo * c.balance_rel_threshold:
                return Decision(by_load, "balance")
            matched, holders = self.tree.match(tokens, ids) if tokens else (0, set())
            if holders and matched >= c.cache_threshold * len(tokens):
                first = min(holders, key=lambda r: (loads[r], r))
                return Decision([first] + [r for r in by_load if r != first], "cache", matched)
            # least loaded; among equals the one holding least (room to cache), then in rotation
            k = next(self.counter)
            least = [r for r in by_load if loads[r] == lo]
            least.sort(key=lambda r: self.tree.held.get(r, 0))
            fewest = [r for r in least if self.tree.held.get(r, 0) == self.tree.held.get(least[0], 0)]
            first = fewest[k % len(fewest)]
            return Decision([first] + [r for r in by_load if r != first], "load")

    def routed(self, tokens: Sequence[int], replica: str, reason: str | None = None) -> None:
        """A request went to `replica`: its prompt will be in that replica's cache."""
        with self.lock:
            if reason:
                self.decisions[reason] = self.decisions.get(reason, 0) + 1
            if tokens and self.config.policy == "cache-aware":
                self.tree.insert(tokens, replica)

    learn = routed  # a finished answer: prompt + generated tokens are in the replica's cache

    def forget(self, replica: str) -> None:
        """A replica died or left: what it held is gone."""
        with self.lock:
            self.tree.remove_tenant(replica)

    def retain(self, replicas: Iterable[str]) -> None:
        """Keep only these replicas' entries (Ray Serve's current replica set)."""
        keep = set(replicas)
        with self.lock:
            gone = [r for r in self.tree.held if r not in keep]
        for r in gone:
            self.forget(r)


_shared: dict[str, Router] = {}
_shared_lock = threading.Lock()


def shared_router(key: str, config: RoutingConfig) -> Router:
    """The one Router of this process for `key` (a deployment): Ray Serve's request router, which
    Serve builds inside the front's handle, and the front itself share it. It lives here, in a
    module that is only ever imported (code Ray ships by value gets its own copy of globals)."""
    with _shared_lock:
        if key not in _shared:
            _shared[key] = Router(config)
        return _shared[key]
