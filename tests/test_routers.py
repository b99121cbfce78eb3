"""Routers and the router-side prefix index, on hand-built replica views."""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.api import ReplicaView, RequestInfo, Router
from policies.prefix_index import PrefixIndex
from policies.registry import ROUTERS, make_router
from policies.routers import OutstandingWork

BLOCK = 16  # tokens per block id


def view(rid: int, *, tokens: int = 0, requests: int = 0, waiting: int = 0, kv: float = 0.0,
         capacity: int = 160_000, pool: str = "default") -> ReplicaView:
    return ReplicaView(replica_id=rid, pool=pool, state="ready", num_running=requests - waiting,
                       num_waiting=waiting, kv_usage=kv, prefix_cache_queries=0, prefix_cache_hits=0,
                       num_preemptions=0, kv_capacity_tokens=capacity, outstanding_requests=requests,
                       outstanding_tokens=tokens)


def views(n: int, **kw) -> list[ReplicaView]:
    return [view(i, **kw) for i in range(n)]


_ids = iter(range(10**9))


def call(blocks: list[int] | tuple[int, ...], *, agent: str = "", workflow: str = "wf", session: str = "",
         job: int = -1, input_tokens: int | None = None, output: int = 100,
         pool: str = "default") -> RequestInfo:
    blocks = tuple(blocks)
    return RequestInfo(request_id=next(_ids), arrival_s=0.0,
                       input_tokens=len(blocks) * BLOCK if input_tokens is None else input_tokens,
                       block_hashes=blocks, hash_block_size=BLOCK, pool=pool, session_id=session, job_id=job,
                       workflow=workflow, agent=agent, expected_output_tokens=output)


def prompt(prefix_id: int, prefix_blocks: int, suffix_id: int, suffix_blocks: int) -> list[int]:
    """A prompt: a shared prefix (e.g. an agent's system prompt) then a call-specific part."""
    return ([prefix_id * 10**6 + i for i in range(prefix_blocks)]
            + [suffix_id * 10**6 + 500_000 + i for i in range(suffix_blocks)])


def random_calls(rng: random.Random, n: int) -> list[RequestInfo]:
    out = []
    for _ in range(n):
        agent = rng.randrange(6)
        blocks = prompt(agent, rng.randrange(0, 300), rng.randrange(10**5), rng.randrange(0, 50))
        out.append(call(blocks, agent=f"a{agent}", session=rng.choice(["", "s1", "s2", "s3"]),
                        job=rng.randrange(-1, 5), input_tokens=len(blocks) * BLOCK + rng.randrange(16),
                        output=rng.randrange(-1, 500)))
    return out


def random_views(rng: random.Random) -> list[ReplicaView]:
    ids = rng.sample(range(20), rng.randrange(1, 9))
    out = []
    for rid in ids:
        req = rng.randrange(0, 100)
        out.append(view(rid, tokens=rng.randrange(0, 200_000), requests=req,
                        waiting=rng.randrange(0, req + 1), kv=rng.random(),
                        capacity=rng.choice([0, 16_000, 160_000])))
    return out


def run(router: Router, calls: list[RequestInfo], replicas: list[ReplicaView]) -> list[int]:
    return [router.route(c, replicas, 0.0) for c in calls]


# --- every router -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_every_router_returns_a_given_replica_and_is_deterministic(name: str) -> None:
    rng = random.Random(1)
    cases = [(random_calls(rng, 1)[0], random_views(rng)) for _ in range(300)]
    first, second = make_router(name), make_router(name)
    for c, vs in cases:
        a, b = first.route(c, vs, 0.0), second.route(c, vs, 0.0)
        assert a in {v.replica_id for v in vs}
        assert a == b


def test_registry_has_the_issue_routers_and_unknown_name_lists_them() -> None:
    assert {"round_robin", "random", "least_loaded", "power_of_two", "session_affinity", "cache_aware",
            "preble", "pythia"} <= set(ROUTERS)
    with pytest.raises(KeyError, match="unknown router 'nope'.*cache_aware.*pythia"):
        make_router("nope")


def test_seeded_routers_depend_on_the_seed_only() -> None:
    vs = views(8)
    calls = [call([i]) for i in range(60)]
    for name in ("random", "power_of_two"):
        loads = [replace(v, outstanding_tokens=v.replica_id % 3) for v in vs]
        assert run(make_router(name, seed=3), calls, loads) == run(make_router(name, seed=3), calls, loads)
        assert run(make_router(name, seed=3), calls, loads) != run(make_router(name, seed=4), calls, loads)


def test_bad_parameters_are_named() -> None:
    with pytest.raises(ValueError, match="cache_threshold"):
        make_router("cache_aware", cache_threshold=1.5)
    with pytest.raises(ValueError, match="kv_high"):
        make_router("pythia", kv_high=-0.1)
    with pytest.raises(TypeError, match="bogus"):
        make_router("pythia", bogus=1)


# --- load-only routers ------------------------------------------------------------------------------------

def test_round_robin_cycles_over_replica_ids() -> None:
    r = make_router("round_robin")
    vs = [view(7), view(2), view(5)]
    assert run(r, [call([]) for _ in range(7)], vs) == [2, 5, 7, 2, 5, 7, 2]


def test_round_robin_follows_the_replicas_it_is_given() -> None:
    r = make_router("round_robin")
    vs = [view(0), view(1)]
    assert run(r, [call([]) for _ in range(2)], vs) == [0, 1]
    vs.append(view(2))  # the same list, changed in place
    assert run(r, [call([]) for _ in range(3)], vs) == [2, 0, 1]
    ready = (view(4), view(3))  # a tuple: sorted once, reused while it is the same object
    assert run(r, [call([]) for _ in range(3)], ready) == [4, 3, 4]  # type: ignore[arg-type]
    assert r.route(call([]), (view(5),), 0.0) == 5


def test_least_loaded_picks_min_outstanding_tokens() -> None:
    r = make_router("least_loaded")
    vs = [view(0, tokens=500, requests=1), view(1, tokens=90, requests=9), view(2, tokens=300)]
    assert r.route(call([]), vs, 0.0) == 1
    vs[1] = replace(vs[1], outstanding_tokens=300)
    assert r.route(call([]), vs, 0.0) == 2  # tie on tokens: fewer requests


def test_power_of_two_never_picks_the_most_loaded() -> None:
    r = make_router("power_of_two", seed=0)
    vs = [view(i, tokens=100 * i) for i in range(5)]
    picks = run(r, [call([]) for _ in range(200)], vs)
    assert 4 not in picks
    assert len(set(picks)) == 4


def test_session_affinity_is_sticky_and_moves_only_a_leaving_replicas_sessions() -> None:
    r = make_router("session_affinity")
    vs = views(6)
    sessions = [f"s{i}" for i in range(60)]
    home = {s: r.route(call([], session=s), vs, 0.0) for s in sessions}
    assert len(set(home.values())) >= 4
    assert all(r.route(call([], session=s), vs, 0.0) == home[s] for s in sessions)
    without = [v for v in vs if v.replica_id != 0]
    for s in sessions:
        if home[s] != 0:
            assert r.route(call([], session=s), without, 0.0) == home[s]
    assert r.route(call([], job=7), vs, 0.0) == r.route(call([], job=7), vs, 0.0)
    loaded = [view(i, tokens=10 - i) for i in range(3)]
    assert r.route(call([]), loaded, 0.0) == 2  # no session, no job: least loaded


# --- SGLang cache-aware -----------------------------------------------------------------------------------

def test_cache_aware_routes_repeated_prefixes_together_and_new_ones_to_the_smallest_tree() -> None:
    r = make_router("cache_aware")
    vs = views(4)
    a = [r.route(call(prompt(1, 100, i, 10)), vs, 0.0) for i in range(5)]
    assert len(set(a)) == 1
    b = r.route(call(prompt(2, 100, 0, 10)), vs, 0.0)
    assert b != a[0]  # no match above the threshold: the smallest tree, an empty replica
    # a match below cache_threshold (0.3) does not attract: 100 of 400 blocks
    c = r.route(call(prompt(1, 100, 99, 300)), vs, 0.0)
    assert c not in (a[0], b)


def test_cache_aware_keeps_the_match_while_balanced_and_falls_back_to_least_loaded_when_imbalanced() -> None:
    r = make_router("cache_aware")
    vs = views(3)
    home = r.route(call(prompt(1, 100, 0, 10)), vs, 0.0)
    busy = [view(i, requests=60 if i == home else 0) for i in range(3)]  # diff 60 <= 64: balanced
    assert r.route(call(prompt(1, 100, 1, 10)), busy, 0.0) == home
    busier = [view(i, requests=70 if i == home else 2 + i) for i in range(3)]  # 70 - 2 > 64 and 70 > 1.5 x 2
    expected = min((v for v in busier), key=lambda v: (v.outstanding_requests, v.replica_id)).replica_id
    assert r.route(call(prompt(1, 100, 2, 10)), busier, 0.0) == expected != home


# --- Preble -----------------------------------------------------------------------------------------------

def test_preble_exploits_a_long_match_and_explores_by_load_otherwise() -> None:
    r = make_router("preble")
    vs = views(3)
    home = r.route(call(prompt(1, 100, 0, 10)), vs, 0.0)
    loaded = [view(i, tokens=1000 if i == home else 500) for i in range(3)]
    assert r.route(call(prompt(1, 100, 1, 10)), loaded, 0.0) == home  # match 100 > miss 10 blocks
    # match 100 < miss 300 blocks: explore; home costs 1000 + 300 blocks, others 500 + 400 blocks
    assert r.route(call(prompt(1, 100, 2, 300)), loaded, 0.0) == home
    hot = [view(i, tokens=100_000 if i == home else 0) for i in range(3)]
    assert r.route(call(prompt(1, 100, 3, 10)), hot, 0.0) != home  # above 2x the mean: rebalanced


# --- Pythia -----------------------------------------------------------------------------------------------

def test_pythia_keeps_each_agent_on_one_replica_when_balanced() -> None:
    r = make_router("pythia")
    vs = views(8)
    placed: dict[int, set[int]] = {}
    for i in range(80):
        agent = i % 4
        rid = r.route(call(prompt(agent, 256, i, 20), agent=f"a{agent}", job=i), vs, 0.0)
        placed.setdefault(agent, set()).add(rid)
    assert all(len(s) == 1 for s in placed.values())
    assert len(set.union(*placed.values())) == 4  # each agent's prefix on its own replica


def load_up(r: Router, rid: int, n: int, blocks: int) -> None:
    """Make ``rid`` busy: route it ``n`` calls of ``blocks`` unique blocks (nothing cached)."""
    for _ in range(n):
        assert r.route(call([next(_ids) + 10**9 for _ in range(blocks)]), [view(rid)], 0.0) == rid


def test_pythia_spreads_an_agent_only_when_the_imbalance_outweighs_its_prefix() -> None:
    r = make_router("pythia", stall_weight=0.0, miss_weight=2.0)  # cost: work outstanding + 2 x tokens to prefill
    home = r.route(call(prompt(1, 256, 0, 20), agent="a"), views(4), 0.0)  # work 276 x 16 + 100 = 4516
    load_up(r, home, 1, 150)  # 2500 more: home 7016 + 2 x 320 < others 2 x 4416
    busy = [view(i, requests=2 if i == home else 0) for i in range(4)]
    assert r.route(call(prompt(1, 256, 1, 20), agent="a"), busy, 0.0) == home
    load_up(r, home, 3, 150)  # home's 5 latest calls outstanding: 2500 + 420 + 3 x 2500 > 8832 - 640
    busier = [view(i, requests=5 if i == home else 0) for i in range(4)]
    assert r.route(call(prompt(1, 256, 2, 20), agent="a"), busier, 0.0) != home


def test_pythia_default_miss_weight_holds_a_prefix_that_weight_2_would_give_up() -> None:
    """A miss costs its prefill and a second copy of the prefix in KV memory: the default weighs it 4x.

    Same load as the spreading test above: at weight 2 the agent's call leaves its busier home replica,
    at the default 4 the 4416-token prefill it would redo (x 4) outweighs home's extra queued work.
    """
    for weight, stays in ((2.0, False), (None, True)):
        kw = {} if weight is None else {"miss_weight": weight}
        r = make_router("pythia", stall_weight=0.0, **kw)
        home = r.route(call(prompt(1, 256, 0, 20), agent="a"), views(4), 0.0)
        load_up(r, home, 4, 150)
        busier = [view(i, requests=5 if i == home else 0) for i in range(4)]
        assert (r.route(call(prompt(1, 256, 2, 20), agent="a"), busier, 0.0) == home) is stays


def test_pythia_spreads_a_burst_of_one_agent_as_replicas_fill() -> None:
    """Work piles up with every call routed; a burst must not pile onto the replica of the agent's prefix."""
    r = make_router("pythia")
    outstanding = dict.fromkeys(range(4), 0)
    for i in range(40):
        rid = r.route(call(prompt(1, 64, i, 64), agent="a", output=400),
                      [view(k, requests=n, waiting=n // 2) for k, n in outstanding.items()], 0.0)
        outstanding[rid] += 1
    assert min(outstanding.values()) >= 5


def test_pythia_keeps_a_conversation_where_its_history_is_unless_overloaded() -> None:
    r = make_router("pythia", stall_weight=0.0, miss_weight=2.0)
    turn1 = prompt(1, 50, 7, 500)
    home = r.route(call(turn1, session="s", job=3), views(4), 0.0)  # work 550 x 16 + 100 = 8900
    turn2 = turn1 + [9_999_000 + i for i in range(20)]
    busier = [view(i, requests=1 if i == home else 0) for i in range(4)]  # 8900 + 2 x 320 < 2 x 9120
    assert r.route(call(turn2, session="s", job=3), busier, 0.0) == home
    load_up(r, home, 3, 400)
    overloaded = [view(i, requests=5 if i == home else 0) for i in range(4)]
    assert r.route(call(turn2 + [1], session="s", job=3), overloaded, 0.0) != home


def test_pythia_weighs_a_partial_hit_against_stalling_a_crowded_replica() -> None:
    r = make_router("pythia")
    home = r.route(call(prompt(3, 100, 0, 10), output=0), views(2), 0.0)  # work 1760
    # the other replica caches nothing: 2 x 3200; home caches half the prompt: 1760 + 2 x 1600 x stall
    calm = [view(i, requests=1 if i == home else 0) for i in range(2)]  # stall 1.05: 5120 < 6400
    assert r.route(call(prompt(3, 100, 1, 100)), calm, 0.0) == home
    crowded = [view(i, requests=60 if i == home else 0, waiting=30 if i == home else 0) for i in range(2)]
    assert r.route(call(prompt(3, 100, 2, 100)), crowded, 0.0) != home  # stall 1 + 0.05 x 60 = 4


def test_pythia_avoids_a_replica_whose_kv_cache_would_overflow() -> None:
    r = make_router("pythia")
    home = r.route(call(prompt(5, 100, 0, 10)), views(2), 0.0)
    full = [view(i, kv=0.99 if i == home else 0.2) for i in range(2)]
    assert r.route(call(prompt(5, 100, 1, 10)), full, 0.0) != home  # the hit does not pay for a preemption
    assert r.route(call(prompt(5, 100, 2, 10)), views(2, kv=0.2), 0.0) == home


def test_pythia_confines_long_context_calls_to_a_small_subset() -> None:
    r = make_router("pythia", long_context_tokens=16384, long_context_max_share=0.5)
    vs = views(8)
    rng = random.Random(0)
    long_picks, short_picks = set(), set()
    for i in range(400):
        if i % 25 == 0:  # long calls: 1/25 of the calls, ~1/4 of the tokens, all different prompts
            long_picks.add(r.route(call(prompt(100 + i, 1200, i, 10), output=10), vs, 0.0))
        else:
            short_picks.add(r.route(call(prompt(rng.randrange(50), 200, i, 10), output=10), vs, 0.0))
    assert 1 <= len(long_picks) <= 4
    assert len(short_picks) == 8


def test_pythia_sends_all_calls_of_a_long_context_agent_to_the_long_subset() -> None:
    r = make_router("pythia", long_context_tokens=10_000)
    outstanding = dict.fromkeys(range(6), 0)
    short_picks = set()
    for i in range(30):  # the agent averages > 10k tokens, though every third call is short
        short = i % 3 == 2
        blocks = prompt(1, 300, i, 10) if short else prompt(1, 300, i, 900)
        views_now = [view(k, requests=n) for k, n in outstanding.items()]
        rid = r.route(call(blocks, agent="reader"), views_now, 0.0)
        outstanding[rid] += 1
        if short:
            short_picks.add(rid)
    assert 1 <= len([n for n in outstanding.values() if n]) <= 3
    assert short_picks <= {k for k, n in outstanding.items() if n}


# --- the prefix index -------------------------------------------------------------------------------------

def test_prefix_index_matches_leading_runs_only() -> None:
    idx = PrefixIndex()
    idx.insert(0, [1, 2, 3, 4], capacity_blocks=100)
    idx.insert(1, [1, 2, 9], capacity_blocks=100)
    assert idx.match([1, 2, 3, 4, 5], [0, 1, 2]) == {0: 4, 1: 2, 2: 0}
    assert idx.match([2, 3, 4], [0, 1]) == {0: 0, 1: 0}  # same ids at other positions do not match
    assert idx.match([], [0]) == {0: 0}


def test_prefix_index_evicts_least_recent_leaves_within_capacity() -> None:
    idx = PrefixIndex()
    idx.insert(0, [1, 2, 3], capacity_blocks=5)
    idx.insert(0, [7, 8], capacity_blocks=5)
    idx.insert(0, [1, 2], capacity_blocks=5)  # touch: [1, 2] now more recent than [7, 8]
    idx.insert(0, [1, 2, 5], capacity_blocks=5)  # one over: evicts the least recent leaf, 3
    assert idx.size(0) == 5
    assert idx.match([1, 2, 3], [0]) == {0: 2}
    idx.insert(0, [6, 6], capacity_blocks=5)  # evicts 8, then 7
    assert idx.match([7, 8], [0]) == {0: 0}
    assert idx.match([1, 2, 5], [0]) == {0: 3}
    idx.retain([1])
    assert idx.size(0) == 0 and idx.match([1, 2, 5], [0]) == {0: 0}


class _ModelIndex:
    """The same LRU policy on whole prefixes (tuples), for checking the trie against."""

    def __init__(self) -> None:
        self.lru: dict[int, OrderedDict[tuple[int, ...], None]] = {}

    def insert(self, rid: int, blocks: list[int], cap: int) -> None:
        lru = self.lru.setdefault(rid, OrderedDict())
        for k in range(len(blocks), 0, -1):
            lru[tuple(blocks[:k])] = None
            lru.move_to_end(tuple(blocks[:k]))
        while len(lru) > cap:
            lru.popitem(last=False)

    def match(self, blocks: list[int], rid: int) -> int:
        held = self.lru.get(rid, {})
        k = 0
        while k < len(blocks) and tuple(blocks[: k + 1]) in held:
            k += 1
        return k


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.lists(st.integers(0, 3), max_size=6), st.integers(0, 8)),
                max_size=40))
def test_prefix_index_agrees_with_a_model_of_prefix_lru(ops: list[tuple[int, list[int], int]]) -> None:
    idx, model = PrefixIndex(), _ModelIndex()
    for rid, blocks, cap in ops:
        idx.insert(rid, blocks, cap)
        model.insert(rid, blocks, cap)
        assert idx.size(rid) == len(model.lru[rid]) <= cap
        for probe in ([0, 1, 2, 3], blocks, [3, 3, 3]):
            assert idx.match(probe, [0, 1, 2]) == {r: model.match(probe, r) for r in (0, 1, 2)}


def test_outstanding_work_sums_the_latest_outstanding_calls() -> None:
    w = OutstandingWork()
    for work in (5, 7, 11):
        w.add(0, work)
    assert [w.of(view(0, requests=n)) for n in (0, 1, 2, 3, 9)] == [0, 11, 18, 23, 23]
    assert w.of(view(1, requests=4)) == 0
    for _ in range(3 * OutstandingWork.HISTORY):  # trimming old calls keeps the recent sums exact
        w.add(0, 1)
    assert w.of(view(0, requests=10)) == 10
