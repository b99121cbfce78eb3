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
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence


class _Node:
    __slots__ = ("block", "parent", "children", "tenants")

    def __init__(self, block: int, parent: _Node | None):
        self.block = block
        self.parent = parent
        self.children: dict[int, _Node] = {}
        self.tenants: set[int] = set()


class PrefixIndex:
    """Which leading blocks of a prompt each replica holds, by the router's own records, with LRU bounds."""

    def __init__(self) -> None:
        self._root = _Node(-1, None)
        self._lru: dict[int, OrderedDict[_Node, None]] = {}  # tenant -> its nodes, least recent first

    def match(self, blocks: Sequence[int], replica_ids: Iterable[int]) -> dict[int, int]:
        """Number of leading ``blocks`` held by each of ``replica_ids`` (0 for replicas holding none)."""
        path: list[_Node] = []
        node = self._root
        for b in blocks:
            child = node.children.get(b)
            if child is None:
                break
            path.append(child)
            node = child
        out: dict[int, int] = {}
        for r in replica_ids:
            # Tenant sets shrink along a path, so the deepest node holding r is found by bisection.
            lo, hi = 0, len(path)
            while lo < hi:
                mid = (lo + hi) // 2
                if r in path[mid].tenants:
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
        path: list[_Node] = []
        node = self._root
        for b in blocks:
            child = node.children.get(b)
            if child is None:
                child = node.children[b] = _Node(b, node)
            path.append(child)
            node = child
        for n in reversed(path):  # leaf first: ancestors end up more recent than descendants
            if replica_id in n.tenants:
                lru.move_to_end(n)
            else:
                n.tenants.add(replica_id)
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
        for r in [r for r in self._lru if r not in keep]:
            for n in self._lru.pop(r):
                self._remove_tenant(n, r)

    def _remove_tenant(self, node: _Node, replica_id: int) -> None:
        node.tenants.discard(replica_id)
        # A node nobody holds has no held descendants (tenant sets shrink along paths): prune it upwards.
        while node.parent is not None and not node.tenants and not node.children:
            del node.parent.children[node.block]
            node = node.parent
