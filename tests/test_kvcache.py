"""KV cache: trace-id -> engine-block hashing, and the block pool's invariants under random use."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from sim.kvcache import NO_HASH, BlockTable, KVCache, extend_block_hashes


@dataclass
class Req:
    request_id: int
    prompt_len: int
    block_hashes: tuple[int, ...]
    hash_block_size: int


def token_content(req: Req, num_tokens: int) -> list[tuple[int, int]]:
    """What each token 'is' according to the trace: (trace id, offset) or (unique to request, position)."""
    covered = min(req.prompt_len, len(req.block_hashes) * req.hash_block_size)
    hbs = req.hash_block_size
    return [(req.block_hashes[t // hbs], t % hbs) if t < covered else (-1 - req.request_id, t)
            for t in range(num_tokens)]


requests = st.builds(
    lambda rid, n, ids, hbs: Req(rid, n, tuple(ids[: -(-n // hbs)]), hbs),
    st.integers(0, 3), st.integers(1, 300), st.lists(st.integers(0, 2), max_size=20),
    st.sampled_from([1, 3, 16, 32, 48, 64, 512]))


@settings(max_examples=300, deadline=None)
@given(a=requests, b=requests, block_size=st.sampled_from([1, 4, 16, 32]), extra=st.integers(0, 40))
def test_block_hashes_equal_exactly_where_the_tokens_are(a: Req, b: Req, block_size: int, extra: int):
    b.hash_block_size = a.hash_block_size  # ids only mean the same within one trace
    b.request_id = a.request_id + 100  # request ids are unique
    b.block_hashes = b.block_hashes[: -(-b.prompt_len // b.hash_block_size)]
    ta, tb = a.prompt_len + extra, b.prompt_len + extra  # generated tokens are request-unique
    ha: list[int] = []
    hb: list[int] = []
    extend_block_hashes(ha, a, block_size, ta // block_size)
    extend_block_hashes(hb, b, block_size, tb // block_size)
    ca, cb = token_content(a, ta), token_content(b, tb)
    for j in range(min(len(ha), len(hb))):
        end = (j + 1) * block_size
        assert (ha[j] == hb[j]) == (ca[:end] == cb[:end]), (j, a, b)
    assert NO_HASH not in ha


@given(req=requests, block_size=st.sampled_from([1, 16, 32]), cuts=st.lists(st.integers(0, 40), max_size=5))
def test_block_hashes_extend_in_pieces_like_in_one_go(req: Req, block_size: int, cuts: list[int]):
    total = (req.prompt_len + 40) // block_size
    whole: list[int] = []
    extend_block_hashes(whole, req, block_size, total)
    pieces: list[int] = []
    for c in sorted(cuts) + [total]:
        extend_block_hashes(pieces, req, block_size, min(c, total))
    assert pieces == whole


def test_mooncake_shaped_prompts_share_exactly_their_common_trace_blocks():
    a = Req(1, 2000, (0, 7, 8, 9), 512)
    b = Req(2, 1800, (0, 7, 5, 6), 512)
    ha, hb = [], []
    extend_block_hashes(ha, a, 16, 2000 // 16)
    extend_block_hashes(hb, b, 16, 1800 // 16)
    common = next(j for j in range(len(hb)) if ha[j] != hb[j])
    assert common == 2 * 512 // 16


# --- the block pool ---------------------------------------------------------------------------------------------


def test_allocate_free_and_lru_reuse_tail_first():
    kv = KVCache(num_gpu_blocks=11, block_size=4)  # 10 usable blocks; block 0 is the null block
    a = BlockTable()
    assert kv.allocate_slots(a, 16)  # 4 blocks
    kv.cache_full_blocks(a, [101, 102, 103, 104], 4)
    ids = list(a.cached)
    b = BlockTable()
    assert kv.allocate_slots(b, 24)  # 6 blocks: the pool is full
    assert kv.num_free_blocks == 0 and kv.usage == 1.0
    assert not kv.allocate_slots(b, 25)  # no room: nothing changes
    assert b.num_blocks == 6
    kv.free_blocks(a)
    assert kv.usage == 0.6  # cached-but-free blocks count as free, as in vLLM
    assert kv.find_longest_cache_hit([101, 102, 103, 104], 15) == ids[:3]  # capped: last token recomputed
    c = BlockTable()
    assert kv.allocate_slots(c, 4)
    assert 104 not in kv.cached and kv.hash_of[ids[3]] == NO_HASH  # the freed table's tail is reused first
    assert kv.find_longest_cache_hit([101, 102, 103, 104], 16) == ids[:3]
    kv.check_invariants()


def test_hit_touches_free_blocks_and_duplicates_stay_findable():
    kv = KVCache(num_gpu_blocks=9, block_size=2)
    a, b = BlockTable(), BlockTable()
    assert kv.allocate_slots(a, 4) and kv.allocate_slots(b, 4)
    kv.cache_full_blocks(a, [1, 2], 2)
    kv.cache_full_blocks(b, [1, 2], 2)  # computed concurrently: same hashes in two block sets
    ids_a, ids_b = list(a.cached), list(b.cached)
    assert kv.find_longest_cache_hit([1, 2], 5) == ids_a
    kv.free_blocks(a)
    hit = kv.find_longest_cache_hit([1, 2], 5)
    before = kv.num_free_blocks
    c = BlockTable()
    assert kv.allocate_slots(c, 5, hit)  # 2 hits taken out of the free queue + 1 new block
    assert c.cached == ids_a and c.num_blocks == 3 and kv.num_free_blocks == before - 3
    assert [kv.ref[x] for x in c.cached] == [1, 1]
    kv.free_blocks(c)
    kv.take_free_blocks(kv.num_free_blocks)  # evicts everything free, including a's copies
    assert kv.find_longest_cache_hit([1, 2], 5) == ids_b  # the duplicate takes over
    kv.check_invariants()


def test_anonymous_blocks_are_runs_not_ids():
    """A request whose blocks carry no hash costs the pool one run, however many blocks it holds."""
    kv = KVCache(num_gpu_blocks=100_001, block_size=16)
    tables = [BlockTable() for _ in range(3)]
    for t in tables:
        assert kv.allocate_slots(t, 16 * 20_000)
    for t in tables:
        kv.free_blocks(t)
    assert len(kv.free) <= 2 and kv.num_free_blocks == 100_000 and not kv.cached
    kv.check_invariants()


def test_a_partly_taken_run_keeps_its_place_at_the_head():
    kv = KVCache(num_gpu_blocks=21, block_size=1)
    a = BlockTable()
    assert kv.allocate_slots(a, 5)
    kv.cache_full_blocks(a, [1, 2, 3, 4, 5], 5)
    kv.free_blocks(a)  # the queue: 15 anonymous blocks, then a's 5 cached ones, tail first
    assert kv.allocate_slots(BlockTable(), 3) and kv.allocate_slots(BlockTable(), 12)  # the run, in two bites
    assert sorted(kv.cached) == [1, 2, 3, 4, 5]
    assert kv.allocate_slots(BlockTable(), 1)  # only now a's blocks, its tail first
    assert sorted(kv.cached) == [1, 2, 3, 4]
    kv.check_invariants()


class NamedPool:
    """Reference: vLLM's BlockPool with every block named (one LRU queue of ids, tables as lists of ids)."""

    def __init__(self, num_gpu_blocks: int, block_size: int, caching: bool):
        self.bs, self.caching = block_size, caching
        self.free = OrderedDict.fromkeys(range(1, num_gpu_blocks))
        self.ref = [0] * num_gpu_blocks
        self.hash_of: list[int | None] = [None] * num_gpu_blocks
        self.cached: dict[int, list[int]] = {}  # hash -> blocks holding it, first found first

    def lookup(self, hashes, max_len):
        hit = []
        for h in hashes[: max_len // self.bs] if self.caching else []:
            if h not in self.cached:
                break
            hit.append(self.cached[h][0])
        return hit

    def allocate(self, table, tokens, hit=()):
        new = max(0, -(-tokens // self.bs) - len(table) - len(hit))
        if new + sum(self.ref[b] == 0 for b in hit) > len(self.free):
            return False
        for b in hit:
            if self.ref[b] == 0:
                del self.free[b]
            self.ref[b] += 1
        table += hit
        for _ in range(new):
            b, _ = self.free.popitem(last=False)
            if self.hash_of[b] is not None:
                self.cached[self.hash_of[b]].remove(b)
                if not self.cached[self.hash_of[b]]:
                    del self.cached[self.hash_of[b]]
                self.hash_of[b] = None
            self.ref[b] = 1
            table.append(b)
        return True

    def register(self, table, hashes, start, end):
        for b, h in zip(table[start:end], hashes[start:end], strict=True) if self.caching else ():
            self.hash_of[b] = h
            self.cached.setdefault(h, []).append(b)

    def release(self, table):
        for b in reversed(table):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None
        table.clear()


@st.composite
def workloads(draw):
    block_size = draw(st.sampled_from([1, 2, 4]))
    num_gpu_blocks = draw(st.integers(2, 30))
    ops = draw(st.lists(st.tuples(st.sampled_from(["admit", "grow", "free", "evict"]), st.integers(0, 3),
                                  st.integers(1, 20), st.integers(0, 3)), max_size=60))
    return block_size, num_gpu_blocks, ops


@settings(max_examples=300, deadline=None)
@given(workload=workloads(), caching=st.booleans())
def test_block_pool_invariants_under_random_use(workload, caching: bool):
    """No block both free and used; used + free = total; ref counts >= 0; hits <= num_tokens - 1; only
    blocks without references lose their cached hash; and every hit, refusal, free count and cached hash is
    what a pool that names every block (``NamedPool``) gives."""
    block_size, num_gpu_blocks, ops = workload
    kv = KVCache(num_gpu_blocks, block_size, caching)
    ref = NamedPool(num_gpu_blocks, block_size, caching)
    prefixes = [[(p << 8) + i for i in range(200)] for p in range(4)]  # 4 families of shared prompts
    live: dict[int, list] = {}  # slot -> [block table, reference table, hashes, tokens, registered]
    for op, slot, n, family in ops:
        protected = {b: kv.hash_of[b] for b in range(num_gpu_blocks) if kv.ref[b] > 0 and kv.hash_of[b] != NO_HASH}
        if op == "admit" and slot not in live:
            hashes = prefixes[family]
            hit = kv.find_longest_cache_hit(hashes, n - 1)
            ref_hit = ref.lookup(hashes, n - 1)
            assert len(hit) == len(ref_hit) and len(hit) * block_size <= n - 1
            assert all(kv.hash_of[b] == hashes[i] for i, b in enumerate(hit))
            table, ref_table = BlockTable(), []
            ok = kv.allocate_slots(table, n, hit)
            assert ok == ref.allocate(ref_table, n, ref_hit)
            if ok:
                assert table.cached == hit
                full = max(len(hit), n // block_size)
                kv.cache_full_blocks(table, hashes, full)
                ref.register(ref_table, hashes, len(hit), full)
                live[slot] = [table, ref_table, hashes, n, full]
        elif op == "grow" and slot in live:
            table, ref_table, hashes, tokens, registered = live[slot]
            held = table.num_blocks
            ok = kv.allocate_slots(table, tokens + n)
            assert ok == ref.allocate(ref_table, tokens + n)
            if ok:
                full = max(registered, (tokens + n) // block_size)
                kv.cache_full_blocks(table, hashes, full)
                ref.register(ref_table, hashes, registered, full)
                live[slot] = [table, ref_table, hashes, tokens + n, full]
            else:
                assert table.num_blocks == held
        elif op == "free" and slot in live:
            table, ref_table, *_ = live.pop(slot)
            kv.free_blocks(table)
            ref.release(ref_table)
        elif op == "evict" and n <= kv.num_free_blocks:
            kv.take_free_blocks(n)
            ref.allocate(evicted := [], n * block_size)  # the same blocks, taken by someone outside
            ref.release(evicted)  # ... and given back anonymous (no hash), at the tail
            kv.free_blocks(_anonymous(n))
        kv.check_invariants()
        assert kv.num_free_blocks == len(ref.free)
        assert kv.cached.keys() == ref.cached.keys()
        for b, h in protected.items():  # eviction only of blocks with zero references
            assert kv.ref[b] == 0 or kv.hash_of[b] == h
        anonymous = sum(v[0].num_blocks - len(v[0].cached) for v in live.values())
        hashed = {b for v in live.values() for b in v[0].cached}
        assert anonymous + len(hashed) == kv.num_usable_blocks - kv.num_free_blocks
    for table, *_ in live.values():
        kv.free_blocks(table)
    kv.check_invariants()
    assert kv.num_free_blocks == num_gpu_blocks - 1 and not any(kv.ref)


def _anonymous(n: int) -> BlockTable:
    t = BlockTable()
    t.num_blocks = n
    return t
