"""Paged KV cache with vLLM v1 automatic prefix caching (``BlockPool`` + ``KVCacheManager``, one group).

What is reproduced, with vLLM's names:

- ``num_gpu_blocks`` blocks of ``block_size`` tokens. Block 0 is vLLM's *null block* and is never
  handed out, so ``num_gpu_blocks - 1`` blocks hold tokens (``usage`` divides by that, as vLLM does).
- Free blocks sit in one LRU queue (``free``, head = next to reuse). Freed blocks go to the tail, a
  request's blocks in *reverse* order so its tail is evicted before its prefix. A free block that
  still carries a hash stays findable until it is reused; reusing it evicts the hash.
- Only a block that carries a hash has an identity here. A block without one is interchangeable with
  any other (nothing can hit it), so the pool counts such *anonymous* blocks instead of naming them: a
  request's table is its leading hashed blocks plus a count, and the free queue holds anonymous blocks
  as runs. Work is per hashed block and per run, never per anonymous block, and a request whose prompt
  shares nothing costs O(1) per allocation however long it is.
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

Generated tokens, and prompt tokens past the trace ids, are cached under request-unique keys only: no
*other* request can ever hit them, because the real executor builds every prompt from the trace ids,
never from generated text. A request preempted by recompute does re-hit its own blocks, as in vLLM.
Since only the request itself can look such a block up, and only after a preemption, the engine
registers them when it preempts (``sim.engine``) rather than as they fill: the same hits, without
hashing every block of every request.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from itertools import compress, count, islice, repeat
from typing import Protocol

import numpy as np

from traces.shared import GOLDEN, splitmix64

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
      chain over the trace ids so far (``_trace_aligned_hashes``), mixed with its offset in trace
      block ``t``, all in numpy: a 12k-token Mooncake prompt costs a few array operations, not 750 hashes.
    - Otherwise, and for blocks that reach past the trace ids, ``hash((parent_hash, key))`` where
      ``key`` is the trace id when the block lies in one trace block, else ``(ids covering it,
      (request_id,) if it reaches past them)``.

    Chains are seeded with ``hash_block_size``, so ids of traces with different block sizes never
    meet. Only ints and tuples of ints are hashed: their hash is the same in every Python process. Hash
    values are compared for equality only; nothing depends on what they are.
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


def shared_prefix_ids(prompts: Iterable[tuple[int, int, Sequence[int]]]) -> dict[int, int]:
    """For each prompt ``(request_id, hash_block_size, trace ids)`` of a workload, how many of its leading ids some
    other prompt (with the same ``hash_block_size``) starts with too. Blocks past them can be hit by no other
    request, only by the request itself after a preemption, so the engine need not register them before then.

    Sorted lexicographically, a prompt's longest common prefix with any other is the one with a neighbour."""
    keyed = sorted((hbs, tuple(ids), rid) for rid, hbs, ids in prompts if len(ids))
    out = {}
    for i, (hbs, ids, rid) in enumerate(keyed):
        out[rid] = max((_common_prefix(ids, keyed[j][1]) for j in (i - 1, i + 1)
                        if 0 <= j < len(keyed) and keyed[j][0] == hbs), default=0)
    return out


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Length of the common prefix (bisection over slice comparisons, which run in C)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _trace_aligned_hashes(ids: Sequence[int], seed: int, per: int, start: int, end: int) -> list[int]:
    """Hashes of engine blocks ``start .. end - 1``, ``per`` of them to a trace block.

    The chain over the trace ids is a running sum (mod 2**64) of terms that mix each id with its position and the
    seed, ``T_t = sum_{i <= t} splitmix(hash(id_i) ^ splitmix(i * golden + seed))``: equal for two prompts exactly
    when their ids agree up to ``t`` (but for a 2**-64 chance), and computed for a whole prompt at once."""
    n = (end - 1) // per + 1
    x = np.fromiter(map(hash, ids[:n]), np.int64, n).view(np.uint64)
    keys = splitmix64(np.arange(n, dtype=np.uint64) * GOLDEN + np.uint64(seed))
    chain = np.cumsum(splitmix64(x ^ keys), dtype=np.uint64)
    j = np.arange(start, end, dtype=np.uint64)
    x = chain[j // np.uint64(per)]
    x = splitmix64(x + (j % np.uint64(per) + np.uint64(1)) * GOLDEN).view(np.int64)
    x[x == NO_HASH] = -2  # keep the sentinel free, as CPython's hash() does
    return x.tolist()


class BlockTable:
    """The KV blocks one request holds (its entry of vLLM's ``req_to_blocks``): ``num_blocks`` in all, of which
    the leading ``len(cached)`` carry a prefix-cache hash (their pool ids, in table order); the rest are
    anonymous. Hashed blocks always lead: a request hits or registers blocks from the start of its tokens."""

    __slots__ = ("cached", "num_blocks")

    def __init__(self) -> None:
        self.cached: list[int] = []
        self.num_blocks = 0


class KVCache:
    """The KV block pool of one replica (vLLM v1 ``BlockPool`` + the parts of ``KVCacheManager`` we need).

    Hashed blocks have ids 1 .. num_gpu_blocks - 1 (``ref``, ``hash_of``); an id returns to the spare ids when
    its block loses its hash. ``free`` is the LRU free queue, head first: a positive key is one cached-but-free
    block, a negative key a run of ``free[key]`` anonymous blocks. All methods are O(hashed blocks + runs
    touched).
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
        self.free: OrderedDict[int, int] = OrderedDict({-1: self.num_usable_blocks})
        self.num_free_blocks = self.num_usable_blocks
        self._next_run = -2  # key of the next anonymous run
        self.ref = [0] * num_gpu_blocks
        self.hash_of = [NO_HASH] * num_gpu_blocks
        self._spare = list(range(num_gpu_blocks - 1, 0, -1))  # ids of no hashed block (pop() gives the lowest)
        self.cached: dict[int, int] = {}  # block hash -> first block holding it
        self._dups: dict[int, list[int]] = {}  # block hash -> further blocks holding it (rare)
        self._watched: set[int] = set()
        self.watch_evicted = False  # one of the watched blocks lost its hash since watch()

    @property
    def usage(self) -> float:
        """vllm:kv_cache_usage_perc: cached-but-free blocks count as free."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def find_longest_cache_hit(self, block_hashes: Sequence[int], max_cache_hit_length: int) -> list[int]:
        """Blocks of the longest cached prefix, at most ``max_cache_hit_length // block_size`` of them."""
        if not self.enable_caching:
            return []
        get, hit = self.cached.get, []
        m, i, step = min(max_cache_hit_length // self.block_size, len(block_hashes)), 0, 16
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
        pos, watched = 0, self._watched
        for key, n in self.free.items():
            if pos >= limit:
                break
            if key in watched:
                return pos
            pos += n
        return limit

    def num_blocks_to_allocate(self, num_blocks_held: int, num_tokens: int, computed: Sequence[int] = ()) -> int:
        """Free-queue blocks ``allocate_slots`` would take: new blocks plus hits that sit in the free queue."""
        new = max(0, -(-num_tokens // self.block_size) - num_blocks_held - len(computed))
        return new + list(map(self.ref.__getitem__, computed)).count(0) if computed else new

    def allocate_slots(self, table: BlockTable, num_tokens: int, computed: Sequence[int] = ()) -> bool:
        """Grow ``table`` to hold ``num_tokens`` tokens, first appending the cache hits ``computed`` (an empty
        table only). Returns False, changing nothing, when the free queue is too short."""
        need = -(-num_tokens // self.block_size) - table.num_blocks - len(computed)
        if computed:
            ref = self.ref
            refs = list(map(ref.__getitem__, computed))
            if max(need, 0) + refs.count(0) > self.num_free_blocks:
                return False
            touched = list(compress(computed, map((0).__eq__, refs)))  # cached but free: out of the free queue
            _consume(map(self.free.__delitem__, touched))
            self.num_free_blocks -= len(touched)
            _consume(map(ref.__setitem__, computed, map((1).__add__, refs)))
            table.cached += computed
            table.num_blocks += len(computed)
        elif need > self.num_free_blocks:
            return False
        if need > 0:
            self.take_free_blocks(need)
            table.num_blocks += need
        return True

    def take_free_blocks(self, n: int) -> None:
        """Take ``n`` blocks from the free queue's head (least recently used first); they lose their hashes
        and become anonymous blocks of whoever takes them."""
        if n > self.num_free_blocks:
            raise ValueError(f"take_free_blocks({n}): only {self.num_free_blocks} blocks are free")
        self.num_free_blocks -= n
        free = self.free
        while n:
            key = next(iter(free))
            if key < 0:  # a run of anonymous blocks
                run = free[key]
                if run > n:
                    free[key] = run - n
                    return
                del free[key]
                n -= run
                continue
            head = list(islice(free, n))  # cached-but-free blocks up to the next run: evicted in bulk
            m = next(compress(count(), map((0).__gt__, head)), len(head))
            del head[m:]
            self._evict(head)
            n -= m

    def _evict(self, blocks: list[int]) -> None:
        """Cached-but-free ``blocks`` leave the free queue and lose their hashes."""
        free, hash_of, cached = self.free, self.hash_of, self.cached
        _consume(map(free.__delitem__, blocks))
        if self._watched and not self._watched.isdisjoint(blocks):
            self.watch_evicted = True
        if self._dups:
            for b in blocks:
                h = hash_of[b]
                dups = self._dups.get(h)
                if cached[h] == b:
                    if dups:
                        cached[h] = dups.pop(0)
                    else:
                        del cached[h]
                else:
                    assert dups is not None
                    dups.remove(b)
                if dups is not None and not dups:
                    del self._dups[h]
        else:  # every hash names exactly one block
            _consume(map(cached.__delitem__, map(hash_of.__getitem__, blocks)))
        _consume(map(hash_of.__setitem__, blocks, repeat(NO_HASH)))
        self._spare += blocks

    def cache_full_blocks(self, table: BlockTable, block_hashes: Sequence[int], num_full: int) -> None:
        """Register blocks ``len(table.cached) .. num_full - 1`` of ``table`` under their hashes."""
        start = len(table.cached)
        m = num_full - start
        if not self.enable_caching or m <= 0:
            return
        spare = self._spare
        ids = spare[-m:][::-1]
        del spare[-m:]
        hashes = block_hashes[start:num_full]
        _consume(map(self.hash_of.__setitem__, ids, hashes))
        _consume(map(self.ref.__setitem__, ids, repeat(1)))
        table.cached += ids
        cached = self.cached
        if cached.keys().isdisjoint(hashes):
            cached.update(zip(hashes, ids, strict=True))
            return
        for b, h in zip(ids, hashes, strict=True):
            if h in cached:
                self._dups.setdefault(h, []).append(b)
            else:
                cached[h] = b

    def free_blocks(self, table: BlockTable) -> None:
        """Release a request's blocks, tail first, so its tail is evicted before its prefix; empties ``table``."""
        free, ref = self.free, self.ref
        anon = table.num_blocks - len(table.cached)
        if anon:
            last = next(reversed(free)) if free else 0
            if last < 0:  # the queue ends in a run: the two are one
                free[last] += anon
            else:
                free[self._next_run] = anon
                self._next_run -= 1
        tail_first = table.cached[::-1]
        refs = list(map(ref.__getitem__, tail_first))
        last_ref = list(compress(tail_first, map((1).__eq__, refs)))
        for b in compress(tail_first, map((1).__lt__, refs)):  # shared with another request: stays used
            ref[b] -= 1
        _consume(map(ref.__setitem__, last_ref, repeat(0)))
        free.update(zip(last_ref, repeat(1)))
        self.num_free_blocks += anon + len(last_ref)
        table.cached = []
        table.num_blocks = 0

    def check_invariants(self) -> None:
        """Raise AssertionError if the pool is inconsistent (used by the property tests)."""
        ref, free, hash_of = self.ref, self.free, self.hash_of
        assert ref[0] == 0 and hash_of[0] == NO_HASH and 0 not in free, "the null block was handed out"
        assert all(r >= 0 for r in ref), "negative reference count"
        assert sum(free.values()) == self.num_free_blocks, "free count does not match the free queue"
        assert all(n >= 1 for k, n in free.items() if k < 0) and all(n == 1 for k, n in free.items() if k > 0)
        spare = set(self._spare)
        assert len(spare) == len(self._spare) and 0 not in spare, "spare ids repeat"
        hashed = {b for b in range(1, self.num_gpu_blocks) if hash_of[b] != NO_HASH}
        assert not spare & hashed and len(spare) + len(hashed) == self.num_usable_blocks, "ids lost or shared"
        assert all(ref[b] == 0 for b in spare), "a spare id is referenced"
        free_hashed = {k for k in free if k > 0}
        assert free_hashed <= hashed and all(ref[b] == 0 for b in free_hashed), "a free block is used"
        assert all(ref[b] > 0 for b in hashed - free_hashed), "a used hashed block is unreferenced"
        assert len(hashed - free_hashed) <= self.num_usable_blocks - self.num_free_blocks, "used + free > total"
        for h, b in self.cached.items():
            assert hash_of[b] == h, "cached block lost its hash"
        for h, bs in self._dups.items():
            assert bs and h in self.cached and all(hash_of[b] == h for b in bs), "duplicate index broken"
        assert len(hashed) == len(self.cached) + sum(len(v) for v in self._dups.values()), "hash index incomplete"


def _consume(it: Iterable[object]) -> None:
    """Run an iterator for its side effects at C speed."""
    deque(it, maxlen=0)
