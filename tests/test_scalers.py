"""Scalers on hand-built cluster observations."""

from __future__ import annotations

import math
import random

import pytest

import policies.rl  # noqa: F401  (adds "rl": the shipped checkpoint)
from policies.api import ClusterObservation, PoolObservation, ReplicaView
from policies.registry import SCALERS, make_scaler


def replica(rid: int, *, state: str = "ready", running: int = 0, waiting: int = 0, kv: float = 0.0,
            requests: int = 0, tokens: int = 0, pool: str = "default") -> ReplicaView:
    return ReplicaView(replica_id=rid, pool=pool, state=state,  # type: ignore[arg-type]
                       num_running=running, num_waiting=waiting, kv_usage=kv, prefix_cache_queries=0,
                       prefix_cache_hits=0, num_preemptions=0,
                       kv_capacity_tokens=160_000, outstanding_requests=requests, outstanding_tokens=tokens)


def pool_obs(replicas: list[ReplicaView], *, name: str = "default", gpus_per_replica: int = 1,
             pending: int = 0, arrivals: int = 0, arrival_tokens: int = 0, completions: int = 0,
             inflight: dict[str, int] | None = None,
             expected_next: dict[str, int] | None = None) -> PoolObservation:
    return PoolObservation(pool=name, replicas=tuple(replicas), gpus_per_replica=gpus_per_replica,
                           pending=pending,
                           arrivals=arrivals, arrival_tokens=arrival_tokens, completions=completions,
                           p99_latency_s=math.nan, p99_ttft_s=math.nan, slo_violations=0,
                           inflight_by_agent=inflight or {}, expected_next_by_agent=expected_next or {})


def cluster(now: float, *pools: PoolObservation, total_gpus: int = 8,
            interval_s: float = 5.0) -> ClusterObservation:
    """Every listed replica, draining ones included, holds its GPUs."""
    used = sum(len(p.replicas) * p.gpus_per_replica for p in pools)
    return ClusterObservation(now=now, interval_s=interval_s, total_gpus=total_gpus,
                              free_gpus=total_gpus - used, pools={p.pool: p for p in pools})


def uniform(n: int, **kw) -> list[ReplicaView]:
    return [replica(i, **kw) for i in range(n)]


def target(scaler, obs: ClusterObservation, pool: str = "default") -> int | None:
    return scaler.decide(obs).target_replicas.get(pool)


def test_registry_and_unknown_name_lists_known_scalers() -> None:
    assert {"static", "hpa", "kpa", "pythia"} <= set(SCALERS)
    with pytest.raises(KeyError, match="unknown scaler 'nope'.*hpa.*kpa.*pythia.*static"):
        make_scaler("nope")
    with pytest.raises(ValueError, match="metric 'gpu'.*kv_usage"):
        make_scaler("hpa", metric="gpu")


@pytest.mark.parametrize("name", sorted(SCALERS))
def test_every_scaler_stays_between_min_replicas_and_the_free_gpus(name: str) -> None:
    if name == "rl":
        pytest.importorskip("stable_baselines3", reason="the RL scaler needs the 'rl' extra: pip install -e '.[rl]'")
    rng = random.Random(0)
    scaler = make_scaler(name, min_replicas=2)
    for step in range(200):
        gpr = rng.choice([1, 2])
        reps = [replica(i, state=rng.choice(["ready", "ready", "starting", "draining"]), kv=rng.random(),
                        running=rng.randrange(300), waiting=rng.randrange(50), requests=rng.randrange(400),
                        tokens=rng.randrange(10**6)) for i in range(rng.randrange(0, 5))]
        p = pool_obs(reps, gpus_per_replica=gpr, pending=rng.randrange(30), arrivals=rng.randrange(100),
                     arrival_tokens=rng.randrange(10**6), completions=rng.randrange(100),
                     expected_next={"coder": rng.randrange(40)})
        obs = cluster(15.0 * step, p, total_gpus=10)
        got = target(scaler, obs)
        # 15 s apart, every scaler decides every time (HPA syncs every 15 s): a scaler that never decides fails here
        assert got is not None, f"{name} made no decision at t={obs.now}"
        most = p.num_active + obs.free_gpus // gpr  # what the GPUs allow
        assert min(2, most) <= got <= max(most, 2)


def test_static_keeps_n_and_clamps_to_gpus() -> None:
    s = make_scaler("static", replicas=3)
    assert target(s, cluster(0, pool_obs(uniform(5)))) == 3
    assert target(s, cluster(0, pool_obs(uniform(1)), total_gpus=2)) == 2  # one free GPU
    assert target(make_scaler("static"), cluster(0, pool_obs(uniform(4)))) == 4


# --- HPA --------------------------------------------------------------------------------------------------

def test_hpa_scales_up_above_tolerance_only() -> None:
    hpa = make_scaler("hpa", target=0.6)
    assert target(hpa, cluster(0, pool_obs(uniform(4, kv=0.9)), total_gpus=16)) == 6  # ceil(4 x 0.9 / 0.6)
    hpa = make_scaler("hpa", target=0.6)
    assert target(hpa, cluster(0, pool_obs(uniform(4, kv=0.65)), total_gpus=16)) == 4  # within 10 %


def test_hpa_busy_metric_and_scale_up_rate_limit() -> None:
    hpa = make_scaler("hpa", metric="busy", max_num_seqs=100, target=0.1)
    # 10 wanted, at most max(2x, +4) per sync
    assert target(hpa, cluster(0, pool_obs(uniform(1, running=100)), total_gpus=64)) == 5
    hpa = make_scaler("hpa", metric="busy", max_num_seqs=100, target=0.5)
    assert target(hpa, cluster(0, pool_obs(uniform(4, running=80)), total_gpus=64)) == 7  # ceil(3.2 / 0.5)


def test_hpa_counts_starting_replicas_as_idle_before_scaling_up() -> None:
    hpa = make_scaler("hpa", target=0.6)
    reps = uniform(2, kv=0.945) + [replica(2, state="starting")]  # ready alone: 4; with it: 1.89 / 1.8 < 1.1
    assert target(hpa, cluster(0, pool_obs(reps))) == 3
    assert target(make_scaler("hpa", target=0.6), cluster(0, pool_obs(uniform(2, kv=0.945)))) == 4


def test_hpa_respects_the_sync_period() -> None:
    hpa = make_scaler("hpa", target=0.6)
    hot = pool_obs(uniform(2, kv=1.0))
    assert target(hpa, cluster(0, hot)) == 4
    assert target(hpa, cluster(5, hot)) is None
    assert target(hpa, cluster(10, hot)) is None
    assert target(hpa, cluster(15, hot)) == 4


def test_hpa_waits_the_stabilization_window_before_scaling_down() -> None:
    hpa = make_scaler("hpa", target=0.6)
    assert target(hpa, cluster(0, pool_obs(uniform(6, kv=0.6)))) == 6
    idle = pool_obs(uniform(6, kv=0.1))
    got = {t: target(hpa, cluster(t, idle)) for t in range(15, 331, 15)}
    assert all(got[t] == 6 for t in got if t < 300)
    assert got[300] == 6  # the t=0 recommendation is still inside [0, 300]
    assert got[315] == 1  # ceil(0.6 / 0.6)


# --- KPA --------------------------------------------------------------------------------------------------

def test_kpa_follows_the_stable_window_without_panic() -> None:
    kpa = make_scaler("kpa", target_concurrency=10)
    assert target(kpa, cluster(0, pool_obs(uniform(4, requests=10)))) == 4
    assert target(kpa, cluster(5, pool_obs(uniform(4, requests=15)))) == 5  # mean 50 / 10
    assert not kpa.in_panic("default")


def test_kpa_panics_on_a_burst_and_does_not_scale_down_in_panic() -> None:
    kpa = make_scaler("kpa", target_concurrency=10)
    for t in range(0, 60, 10):
        assert target(kpa, cluster(t, pool_obs(uniform(2, requests=5)))) == 1
    burst = pool_obs(uniform(2, requests=30), pending=10)  # 70 in flight: 7 replicas >= 2 x 2 ready
    assert target(kpa, cluster(60, burst)) == 7
    assert kpa.in_panic("default")
    calm = pool_obs(uniform(7, requests=1))
    assert target(kpa, cluster(65, calm)) == 7  # no scale-down in panic
    assert target(kpa, cluster(120, calm)) == 7  # panic lasts a stable window after the last over-threshold
    assert target(kpa, cluster(125, calm)) < 7
    assert not kpa.in_panic("default")


def test_kpa_sheds_at_most_half_the_ready_replicas_per_step() -> None:
    kpa = make_scaler("kpa", target_concurrency=10)
    assert target(kpa, cluster(0, pool_obs(uniform(8)))) == 4


# --- Pythia -----------------------------------------------------------------------------------------------

def queued(tokens_per_replica: int, n: int = 2, **kw) -> PoolObservation:
    """A pool whose replicas each hold one waiting call of ``tokens_per_replica`` tokens (the backlog)."""
    return pool_obs(uniform(n, tokens=tokens_per_replica, requests=1, waiting=1), **kw)


def pythia(**kw):
    return make_scaler("pythia", replica_tokens_per_s=1000, target_utilization=1.0, backlog_s=10, **kw)


def test_pythia_sizes_the_pool_by_arrival_rate_and_backlog() -> None:
    s = pythia()
    arriving = pool_obs(uniform(2), arrivals=10, arrival_tokens=20_000)  # 4000 tokens/s
    assert target(s, cluster(0, arriving)) == 4
    s = pythia()
    assert target(s, cluster(0, queued(15_000, n=2))) == 3  # 30k tokens waiting, cleared within 10 s
    s = pythia()
    running = pool_obs(uniform(2, tokens=15_000, requests=3))  # paid for by the arrival rate
    assert target(s, cluster(0, running)) == 2


def test_pythia_scales_ahead_when_the_workflow_announces_a_fan_out() -> None:
    s = pythia(agent_tokens={"coder": 5000})
    assert target(s, cluster(0, pool_obs(uniform(2), arrivals=4, arrival_tokens=8000))) == 2  # 1600 tokens/s
    fan_out = pool_obs(uniform(2), arrivals=4, arrival_tokens=8000, inflight={"planner": 2},
                       expected_next={"coder": 6})
    assert target(s, cluster(5, fan_out)) == 5  # 1600 + 6 x 5000 / 10 s


def test_pythia_attributes_look_ahead_to_the_pool_serving_the_next_agent() -> None:
    s = pythia(agent_tokens={"coder": 10_000})
    small = pool_obs([replica(0, pool="small")], name="small", inflight={"planner": 1},
                     expected_next={"coder": 3})
    big = pool_obs([replica(1, pool="big")], name="big", inflight={"coder": 1})
    action = s.decide(cluster(0, small, big))
    assert action.target_replicas == {"big": 3, "small": 1}


def test_pythia_scales_down_slowly_with_hysteresis() -> None:
    s = pythia(scale_down_window_s=60, scale_down_hysteresis=0.2)
    assert target(s, cluster(0, queued(10_000, n=6), total_gpus=8)) == 6
    assert target(s, cluster(5, queued(7_000, n=6), total_gpus=8)) == 6  # need 5 >= 0.8 x 6: in the band
    low = queued(2_000, n=6)  # need ceil(12k / 10 s / 1000) = 2
    got = [target(s, cluster(t, low, total_gpus=8)) for t in range(10, 80, 5)]
    assert got[:12] == [6] * 12  # t = 10 .. 65: below the band for less than 60 s
    assert got[12] == 2  # t = 70: 60 s below the band


def test_pythia_learns_the_replica_throughput_when_saturated() -> None:
    busy = pool_obs(uniform(2, tokens=20_000, requests=8, waiting=4), arrivals=10, arrival_tokens=10_000,
                    completions=50)
    s = pythia()
    # 2000 tokens/s arriving + 20k waiting / 10 s = 4000 tokens/s: 4 replicas at the prior 1000 tokens/s;
    # measured 50 calls x 1000 tokens / 5 s / 2 replicas = 5000, smoothed 0.3 x 5000 + 0.7 x 1000 = 2200
    assert target(s, cluster(0, busy, total_gpus=16)) == 2
    assert s.need("default", 4000) == 2
    calm = pool_obs(uniform(2, tokens=20_000, requests=8), arrivals=10, arrival_tokens=10_000, completions=50)
    s = pythia()
    s.decide(cluster(0, calm, total_gpus=16))
    assert s.need("default", 4000) == 4  # not saturated: nothing learned


def test_pythia_clamps_to_the_gpus_and_min_replicas() -> None:
    s = pythia(min_replicas=2)
    heavy = pool_obs(uniform(3, tokens=10**6, requests=1, waiting=1), gpus_per_replica=2)
    assert target(s, cluster(0, heavy, total_gpus=8)) == 4  # 2 free GPUs: one more 2-GPU replica
    idle = make_scaler("pythia", min_replicas=2, scale_down_window_s=0)
    assert target(idle, cluster(0, pool_obs(uniform(3)))) == 2
