"""A router-side radix index of prompt prefixes per replica, as sglang-router and llm-d keep one.

A router cannot see a replica's KV cache; it remembers what it sent where. Prompts are sequences of
block ids (``RequestInfo.block_hashes``) with chained semantics: block i of a prompt can be cached only
if blocks 0..i are, so one trie over block ids, shared by all replicas, answers "how many leading
blocks of this prompt did I send to replica r" for every r in one walk. Each trie node lists the
replicas (tenants) that hold it; a replica's share of the trie is bounded by its KV capacity and
evicted least-recently-used first, the way vLLM evicts its free cached blocks.

Invariant that makes eviction cheap: every touch of a node also touches all its ancestors, after it, so
for any tenant an ancestor is always more recent than its descendants. The least recently used node of
a tenant is therefore a leaf for that tenant, and evicting it never leaves a gap in a cached prefix.

Nodes are integer ids into flat lists, and each node's tenants one integer bit mask, not objects that point
at each other: a trie of a cluster's worth of prompts holds ~10^5 nodes, and as objects with parent links
they kept Python's cyclic garbage collector walking all of them, stalling a routing decision now and then
(``benchmarks/policy_overhead.py`` measures it). Dicts of ints are not tracked by the collector at all.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

ROOT = 0


class PrefixIndex:
    """Which leading blocks of a prompt each replica holds, by the router's own records, with LRU bounds."""

    def __init__(self) -> None:
        # node id -> its block id, parent, children (block -> node) and tenants (bit r: replica r holds it)
        self._block: list[int] = [-1]
        self._parent: list[int] = [-1]
        self._children: list[dict[int, int]] = [{}]
        self._tenants: list[int] = [0]
        self._free: list[int] = []  # ids of pruned nodes, for reuse
        self._lru: dict[int, OrderedDict[int, None]] = {}  # tenant -> its nodes, least recent first
        self._walked: tuple[Sequence[int], list[int]] | None = None  # match()'s prompt and path, until the trie changes

    def _path(self, blocks: Sequence[int]) -> list[int]:
        """Nodes of the longest run of ``blocks`` in the trie, from the root's child down."""
        children, path, node = self._children, [], ROOT
        for b in blocks:
            node = children[node].get(b, -1)
            if node < 0:
                break
            path.append(node)
        return path

    def match(self, blocks: Sequence[int], replica_ids: Iterable[int]) -> dict[int, int]:
        """Number of leading ``blocks`` held by each of ``replica_ids`` (0 for replicas holding none)."""
        path = self._path(blocks)
        self._walked = (blocks, path)  # a router records the prompt it just matched: insert() reuses the walk
        masks = [self._tenants[n] for n in path]
        out: dict[int, int] = {}
        for r in replica_ids:
            # Tenant sets shrink along a path, so the deepest node holding r is found by bisection.
            lo, hi = 0, len(masks)
            while lo < hi:
                mid = (lo + hi) // 2
                if masks[mid] >> r & 1:
                    lo = mid + 1
                else:
                    hi = mid
            out[r] = lo
        return out

    def insert(self, replica_id: int, blocks: Sequence[int], capacity_blocks: int) -> None:
        """Record that ``replica_id`` now holds ``blocks``; evict its least recent blocks beyond capacity."""
        if capacity_blocks < 0:
            raise ValueError(f"capacity_blocks must be >= 0, got {capacity_blocks}")
        lru = self._lru.setdefault(replica_id, OrderedDict())
        walked, self._walked = self._walked, None
        same = walked is not None and walked[0] is blocks and type(blocks) is tuple  # a list may have changed
        path = list(walked[1]) if same else self._path(blocks)  # type: ignore[index]
        for b in blocks[len(path):]:
            path.append(self._new_node(b, path[-1] if path else ROOT))
        tenants, bit = self._tenants, 1 << replica_id
        for n in reversed(path):  # leaf first: ancestors end up more recent than descendants
            if tenants[n] & bit:
                lru.move_to_end(n)
            else:
                tenants[n] |= bit
                lru[n] = None
        while len(lru) > capacity_blocks:
            victim, _ = lru.popitem(last=False)
            self._remove_tenant(victim, replica_id)

    def size(self, replica_id: int) -> int:
        """Blocks the index believes ``replica_id`` holds (its share of the trie)."""
        lru = self._lru.get(replica_id)
        return len(lru) if lru is not None else 0

    def retain(self, replica_ids: Iterable[int]) -> None:
        """Forget every replica not in ``replica_ids``: one that left the pool took its cache with it."""
        keep = set(replica_ids)
        self._walked = None
        for r in [r for r in self._lru if r not in keep]:
            for n in self._lru.pop(r):
                self._remove_tenant(n, r)

    def _new_node(self, block: int, parent: int) -> int:
        if self._free:
            n = self._free.pop()
            self._block[n], self._parent[n], self._tenants[n] = block, parent, 0
        else:
            n = len(self._block)
            self._block.append(block)
            self._parent.append(parent)
            self._children.append({})
            self._tenants.append(0)
        self._children[parent][block] = n
        return n

    def _remove_tenant(self, node: int, replica_id: int) -> None:
        tenants, children, parent = self._tenants, self._children, self._parent
        tenants[node] &= ~(1 << replica_id)
        # A node nobody holds has no held descendants (tenant sets shrink along paths): prune it upwards.
        while node != ROOT and not tenants[node] and not children[node]:
            up = parent[node]
            del children[up][self._block[node]]
            self._free.append(node)
            node = up
