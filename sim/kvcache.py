"""Paged KV cache with vLLM v1 automatic prefix caching (``BlockPool`` + ``KVCacheManager``, one group).

What is reproduced, with vLLM's names:

- ``num_gpu_blocks`` blocks of ``block_size`` tokens. Block 0 is vLLM's *null block* and is never
  handed out, so ``num_gpu_blocks - 1`` blocks hold tokens (``usage`` divides by that, as vLLM does).
- Free blocks sit in one LRU queue (``free``, head = next to reuse). Freed blocks go to the tail, a
  request's blocks in *reverse* order so its tail is evicted before its prefix. A free block that
  still carries a hash stays findable until it is reused; reusing it evicts the hash.
- Only full blocks are cached, each under a hash chained on its parent's (``extend_block_hashes``).
  Cache lookups take the longest run of cached blocks from the start of the prompt, capped so that
  at least the last token is recomputed (``max_cache_hit_length = num_tokens - 1``).
- A hit "touches" its blocks: ref count + 1, and out of the free queue if it was there.
- Two blocks may carry the same hash (two requests computed the same prefix at once); lookups return
  the first one, as in vLLM's ``BlockHashToBlockMap``.

Trace block ids to engine blocks: a workload row gives one id per ``hash_block_size`` tokens of the
prompt (512 for Mooncake, 64 for Claude Code, 16 for generated workflows); equal ids at equal
positions mean equal tokens. Engine block ``j`` covers tokens ``[j*block_size, (j+1)*block_size)``;
its content key is the trace id(s) covering those tokens, and tokens past the ids (or all tokens when
a row has none, and every generated token) are unique to the request. So two prompts hit each other
exactly where their trace ids agree, for any ``block_size`` and ``hash_block_size``.

Generated tokens are cached under request-unique keys only: no *other* request can ever hit them,
because the real executor builds every prompt from the trace ids, never from generated text. A
request preempted by recompute does re-hit its own generated blocks, as in vLLM.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from itertools import compress, count, islice, repeat
from typing import Protocol

import numpy as np

NO_HASH = -1  # CPython's hash() never returns -1, so it cannot collide with a real block hash


class PromptTokens(Protocol):
    """What the hash chain needs to know about a request's tokens (``sim.engine.SimRequest`` has it)."""

    request_id: int
    prompt_len: int
    block_hashes: Sequence[int]
    hash_block_size: int


def extend_block_hashes(hashes: list[int], req: PromptTokens, block_size: int, num_blocks: int) -> None:
    """Append the hashes of engine blocks ``len(hashes) .. num_blocks - 1`` of ``req``'s token stream.

    Equal hashes mean equal tokens from the start of the prompt through the block. Two forms:

    - When ``block_size`` divides ``hash_block_size``, a block inside the trace ids is named by the
      chain over the trace ids so far, ``T_t = hash((T_{t-1}, id_t))``, mixed with its offset in trace
      block ``t`` (vectorized: a 12k-token Mooncake prompt is 24 Python hashes, not 750).
    - Otherwise, and for blocks that reach past the trace ids, ``hash((parent_hash, key))`` where
      ``key`` is the trace id when the block lies in one trace block, else ``(ids covering it,
      (request_id,) if it reaches past them)``.

    Chains are seeded with ``hash_block_size``, so ids of traces with different block sizes never
    meet. Only ints and tuples of ints are hashed: their hash is the same in every Python process.
    """
    start = len(hashes)
    if start >= num_blocks:
        return
    ids, hbs, bs = req.block_hashes, req.hash_block_size, block_size
    covered = min(req.prompt_len, len(ids) * hbs)  # tokens whose content the trace ids name
    if hbs % bs == 0 and start < covered // bs:
        end = min(num_blocks, covered // bs)
        hashes += _trace_aligned_hashes(ids, hbs, hbs // bs, start, end)
        start = end
    h = hashes[-1] if hashes else hbs
    unique = (req.request_id,)
    for j in range(start, num_blocks):
        a, b = j * bs, (j + 1) * bs
        first, last = a // hbs, (min(b, covered) - 1) // hbs
        if b <= covered and first == last:
            key: object = ids[first]
        else:
            key = (tuple(ids[first:last + 1]) if a < covered else (), unique if b > covered else ())
        h = hash((h, key))
        hashes.append(h)


def _trace_aligned_hashes(ids: Sequence[int], seed: int, per: int, start: int, end: int) -> list[int]:
    """Hashes of engine blocks ``start .. end - 1``, ``per`` of them to a trace block."""
    chain = []
    h = seed
    for t in range((end - 1) // per + 1):
        h = hash((h, ids[t]))
        chain.append(h)
    j = np.arange(start, end, dtype=np.uint64)
    x = np.asarray(chain, dtype=np.int64).view(np.uint64)[j // np.uint64(per)]
    x = _splitmix64(x + (j % np.uint64(per) + np.uint64(1)) * _GOLDEN).view(np.int64)
    x[x == NO_HASH] = -2  # keep the sentinel free, as CPython's hash() does
    return x.tolist()


_GOLDEN, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer on uint64 (wrapping): a bijection that spreads nearby inputs apart."""
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


class KVCache:
    """The KV block pool of one replica (vLLM v1 ``BlockPool`` + the parts of ``KVCacheManager`` we need).

    A request's block table is a plain ``list[int]`` owned by the caller; the pool only counts
    references. All methods are O(blocks touched).
    """

    def __init__(self, num_gpu_blocks: int, block_size: int = 16, enable_caching: bool = True):
        if num_gpu_blocks < 2:
            raise ValueError(f"num_gpu_blocks={num_gpu_blocks}: need at least 2 (block 0 is vLLM's null block)")
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1")
        self.num_gpu_blocks = num_gpu_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.num_usable_blocks = num_gpu_blocks - 1
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_gpu_blocks))
        self.ref = [0] * num_gpu_blocks
        self.hash_of = [NO_HASH] * num_gpu_blocks
        self.cached: dict[int, int] = {}  # block hash -> first block holding it
        self._dups: dict[int, list[int]] = {}  # block hash -> further blocks holding it (rare)
        self._watched: set[int] = set()
        self.watch_evicted = False  # one of the watched blocks lost its hash since watch()

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """vllm:kv_cache_usage_perc: cached-but-free blocks count as free."""
        return 1.0 - len(self.free) / self.num_usable_blocks

    def find_longest_cache_hit(self, block_hashes: Sequence[int], max_cache_hit_length: int) -> list[int]:
        """Blocks of the longest cached prefix, at most ``max_cache_hit_length // block_size`` of them."""
        if not self.enable_caching:
            return []
        get, hit = self.cached.get, []
        m, i, step = max_cache_hit_length // self.block_size, 0, 16
        while i < m:  # growing slices: a miss early in a long prompt costs a few look-ups, not all of them
            part = list(map(get, block_hashes[i:min(i + step, m)]))
            if None in part:
                return hit + part[: part.index(None)]
            hit += part
            i, step = i + step, 2 * step
        return hit

    def watch(self, blocks: Sequence[int]) -> None:
        """Watch a lookup result: ``watch_evicted`` turns True as soon as one of ``blocks`` is evicted, so a
        caller can reuse the lookup until then (the engine does this for its blocked waiting head)."""
        self._watched = set(blocks)
        self.watch_evicted = False

    def first_watched_in_free_queue(self, limit: int) -> int:
        """Position of the first watched block among the next ``limit`` blocks to be taken, else ``limit``."""
        flags = map(self._watched.__contains__, islice(self.free, limit))
        return next(compress(count(), flags), limit)

    def num_blocks_to_allocate(self, num_blocks_held: int, num_tokens: int, computed: Sequence[int] = ()) -> int:
        """Free-queue blocks ``allocate_slots`` would take: new blocks plus hits that sit in the free queue."""
        new = max(0, -(-num_tokens // self.block_size) - num_blocks_held - len(computed))
        return new + list(map(self.ref.__getitem__, computed)).count(0) if computed else new

    def allocate_slots(self, blocks: list[int], num_tokens: int, computed: Sequence[int] = ()) -> bool:
        """Grow the block table ``blocks`` to hold ``num_tokens`` tokens, first appending the cache hits
        ``computed``. Returns False, changing nothing, when the free queue is too short."""
        if self.num_blocks_to_allocate(len(blocks), num_tokens, computed) > len(self.free):
            return False
        ref, free = self.ref, self.free
        for b in computed:
            if ref[b] == 0:
                del free[b]
            ref[b] += 1
        blocks.extend(computed)
        blocks.extend(self.take_free_blocks(-(-num_tokens // self.block_size) - len(blocks)))
        return True

    def take_free_blocks(self, n: int) -> list[int]:
        """Take ``n`` blocks from the free queue's head (least recently used first), evicting their hashes.

        Bulk operations (C-level ``map``) because this runs for every block of every prompt."""
        free, hash_of = self.free, self.hash_of
        taken = list(islice(free, n))
        _consume(map(free.__delitem__, taken))
        _consume(map(self.ref.__setitem__, taken, repeat(1)))
        hashes = list(map(hash_of.__getitem__, taken))
        if hashes.count(NO_HASH) == n:
            return taken
        if self._watched and not self._watched.isdisjoint(taken):
            self.watch_evicted = True
        if self._dups:
            for b in taken:
                if hash_of[b] != NO_HASH:
                    self._evict(b)
        else:  # every hash names exactly one block
            _consume(map(self.cached.__delitem__, [h for h in hashes if h != NO_HASH]))
            _consume(map(hash_of.__setitem__, taken, repeat(NO_HASH)))
        return taken

    def cache_full_blocks(self, blocks: Sequence[int], block_hashes: Sequence[int], num_cached: int,
                          num_full: int) -> None:
        """Register blocks ``num_cached .. num_full - 1`` of a block table under their hashes."""
        if not self.enable_caching or num_full <= num_cached:
            return
        cached, new_blocks, new_hashes = self.cached, blocks[num_cached:num_full], block_hashes[num_cached:num_full]
        _consume(map(self.hash_of.__setitem__, new_blocks, new_hashes))
        if cached.keys().isdisjoint(new_hashes):
            cached.update(zip(new_hashes, new_blocks, strict=True))
            return
        for b, h in zip(new_blocks, new_hashes, strict=True):
            if h in cached:
                self._dups.setdefault(h, []).append(b)
            else:
                cached[h] = b

    def free_blocks(self, blocks: Sequence[int]) -> None:
        """Release a request's blocks, tail first, so its tail is evicted before its prefix."""
        ref = self.ref
        tail_first = blocks[::-1]
        refs = list(map(ref.__getitem__, tail_first))
        last_ref = list(compress(tail_first, map((1).__eq__, refs)))
        for b in compress(tail_first, map((1).__lt__, refs)):  # shared with another request: stays used
            ref[b] -= 1
        _consume(map(ref.__setitem__, last_ref, repeat(0)))
        self.free.update(zip(last_ref, repeat(None)))

    def _evict(self, b: int) -> None:
        h = self.hash_of[b]
        self.hash_of[b] = NO_HASH
        dups = self._dups.get(h)
        if self.cached[h] == b:
            if dups:
                self.cached[h] = dups.pop(0)
            else:
                del self.cached[h]
        else:
            assert dups is not None
            dups.remove(b)
        if dups is not None and not dups:
            del self._dups[h]

    def check_invariants(self) -> None:
        """Raise AssertionError if the pool is inconsistent (used by the property tests)."""
        ref, free = self.ref, self.free
        assert 0 not in free and ref[0] == 0, "the null block was handed out"
        assert all(r >= 0 for r in ref), "negative reference count"
        used = {b for b in range(1, self.num_gpu_blocks) if ref[b] > 0}
        assert not used & free.keys(), "a block is both free and used"
        assert len(used) + len(free) == self.num_usable_blocks, "used + free != total"
        for h, b in self.cached.items():
            assert self.hash_of[b] == h, "cached block lost its hash"
        for h, bs in self._dups.items():
            assert bs and h in self.cached and all(self.hash_of[b] == h for b in bs), "duplicate index broken"
        n_hashed = sum(1 for h in self.hash_of if h != NO_HASH)
        assert n_hashed == len(self.cached) + sum(len(v) for v in self._dups.values()), "hash index incomplete"


def _consume(it: Iterable[object]) -> None:
    """Run an iterator for its side effects at C speed."""
    deque(it, maxlen=0)
