"""Pythia as one profiled system: every mechanism switchable off by name; the same object in every role."""

from __future__ import annotations

import pytest

from experiments.common import run_system
from policies.api import CallDone, ReplicaView, RequestInfo
from policies.pythia import MECHANISMS, Pythia
from policies.systems import SYSTEMS, make_system
from sim.cluster import ClusterConfig, PoolConfig
from traces.schema import make_table
from traces.workflow import make_workload


def test_full_pythia_is_one_object_in_every_role():
    p = make_system("pythia")
    hooks = p.hooks
    assert isinstance(p.router, Pythia)
    assert all(x is p.router for x in (p.scaler, hooks.prioritizer, hooks.retention, hooks.prefetcher,
                                       hooks.predictor))
    assert p.engine == {"scheduling_policy": "priority", "admission_policy": "predicted"}


@pytest.mark.parametrize("m", MECHANISMS)
def test_each_mechanism_off_and_alone(m):
    assert f"pythia-no-{m}" in SYSTEMS and f"vllm+{m}" in SYSTEMS
    without, alone = make_system(f"pythia-no-{m}"), make_system(f"vllm+{m}")
    role = {"placement": "router", "priority": "prioritizer", "retention": "retention", "prefetch": "prefetcher"}
    if m in role:
        get = (lambda p: p.router) if m == "placement" else (lambda p: getattr(p.hooks, role[m]))
        assert not isinstance(get(without), Pythia) and isinstance(get(alone), Pythia)
    if m == "admission":
        assert "admission_policy" not in without.engine and alone.engine == {"admission_policy": "predicted"}
    assert isinstance(alone.hooks.predictor, Pythia)  # the profiler always runs


def test_unknown_mechanism_refused():
    with pytest.raises(ValueError, match="unknown mechanism.*'bogus'"):
        Pythia(without=("bogus",))


def test_pythia_run_is_deterministic_and_learns():
    table = make_workload("software-team", rate=0.2, duration_s=60, seed=1)
    cfg = ClusterConfig(num_gpus=2, pools=(PoolConfig(initial_replicas=2),))
    a, b = run_system(table, "pythia", cfg), run_system(table, "pythia", cfg)
    assert a.requests.equals(b.requests)
    assert len(a.requests) == len(table) and (a.requests["status"] == "ok").all()


def loop_table(jobs: int = 30, think_s: float = 30.0):
    """Jobs of three turns of one agent ``a``, each after a ``think_s`` tool call."""
    rows = {"request_id": [], "arrival_s": [], "input_tokens": [], "output_tokens": [], "block_hashes": [],
            "parents": [], "think_s": [], "job_id": [], "agent": []}
    for j in range(jobs):
        for k in range(3):
            rid = 3 * j + k
            rows["request_id"].append(rid)
            rows["arrival_s"].append(float(j))
            rows["input_tokens"].append(16 * (4 + k))
            rows["output_tokens"].append(8)
            rows["block_hashes"].append(list(range(1000 * j, 1000 * j + 4 + k)))
            rows["parents"].append([rid - 1] if k else [])
            rows["think_s"].append(think_s if k else 0.0)
            rows["job_id"].append(j)
            rows["agent"].append("a")
    return make_table({**rows, "workflow": ["loop"] * len(rows["agent"])})


def replica(capacity: int) -> ReplicaView:
    return ReplicaView(replica_id=0, pool="default", state="ready", num_running=0, num_waiting=0, kv_usage=0.0,
                       prefix_cache_queries=0, prefix_cache_hits=0, num_preemptions=0, kv_capacity_tokens=capacity,
                       outstanding_requests=0, outstanding_tokens=0)


def test_retention_pins_only_what_lru_would_lose_and_within_its_budget():
    """A turn is pinned for the learned tool time only when the replica's cache turns over faster than that (so
    LRU would evict the conversation before the next turn), and the pins stay within the memory budget."""
    p = Pythia(retain_budget=0.2)
    p.profiler.fit(loop_table())
    capacity = 10_000
    [rep] = views = [replica(capacity)]

    def turn(rid: int, job: int, now: float) -> CallDone:
        req = p.annotate(RequestInfo(rid, now, 1000, (job,), 16, job_id=job, workflow="loop", agent="a"), now)
        assert p.route(req, views, now) == rep.replica_id
        return CallDone(req, rep.replica_id, "ok", now, now + 0.1, now + 1.0, 8, 0)

    def wrote(tokens: int, now: float) -> None:  # a call that ended on the replica and wrote ``tokens`` new tokens
        req = RequestInfo(10**6 + int(now), now, tokens, (), 16)
        p.observe(CallDone(req, rep.replica_id, "ok", now, now, now, 0, 0))

    done = turn(1, 1, 0.0)
    assert p.retain_s(done, 1.0) == 0.0  # nothing written here yet: LRU keeps the conversation
    wrote(capacity, 1.0)  # turnover 60 s (10,000 tokens per 60 s window) > the 30 s tool time
    assert p.retain_s(done, 1.0) == 0.0
    wrote(20 * capacity, 2.0)  # turnover under 3 s: the conversation would be evicted before its next turn
    ttl = p.retain_s(done, 2.0)
    assert ttl == pytest.approx(30.0)
    # The budget: 2,000 tokens of pins; the first pin holds 1,008, a second one would exceed it.
    assert p.retain_s(turn(2, 2, 2.0), 3.0) == 0.0
    turn(3, 1, 4.0)  # job 1's next turn is released: its pin is over, so another job may pin
    assert p.retain_s(turn(4, 2, 4.0), 5.0) == pytest.approx(30.0)
