"""The agent mechanisms through the front end (``sim.cluster.simulate`` with a system's hooks), on small hand-made
workloads whose right answer is known, and every registered baseline end to end."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from experiments.common import cluster_config
from frontend.engine_args import EngineArgs
from frontend.metrics import mem_util_cv, summarize_results
from policies.api import CallDone, Hooks, Prefetch, RequestInfo
from policies.continuum import MIN_SAMPLES, ToolTimeTTL
from policies.systems import make_system, system
from sim.cluster import ClusterConfig, PoolConfig, simulate
from traces.schema import make_table
from traces.workflow import make_workload

BASELINES = ("vllm", "production-stack", "sglang", "autellix", "continuum", "thunderagent", "pythia")


class ByJob:
    """Routes each job to a fixed replica (``where[job_id]``)."""

    def __init__(self, where: dict[int, int]):
        self.where = where

    def route(self, request: RequestInfo, replicas, now: float) -> int:
        return self.where[request.job_id]


# --- prefetch ------------------------------------------------------------------------------------------------


S = list(range(500, 564))  # the next agent's static prefix: 64 blocks of 16 tokens


def prefetch_table() -> pd.DataFrame:
    """Job 0: A, then B (prefix S + its own 200 tokens) 5 s after A. Job 1: W, a call with prefix S at time 0."""
    return make_table({
        "request_id": [0, 1, 2], "arrival_s": [0.0, 0.0, 0.0], "input_tokens": [300, 64 * 16 + 200, 64 * 16 + 10],
        "output_tokens": [5, 5, 5], "block_hashes": [list(range(900, 918)), S + list(range(700, 712)), S],
        "parents": [[], [0], []], "think_s": [0.0, 5.0, 0.0], "job_id": [0, 0, 1]})


class WarmS:
    """When A (request 0) ends, warm its replica with S."""

    def prefetch(self, done: CallDone, replicas, now: float) -> list[Prefetch]:
        if done.request.request_id != 0:
            return []
        return [Prefetch(done.replica_id, tuple(S), 16, len(S) * 16)]


def test_a_prefetch_makes_the_next_calls_ttft_equal_a_cached_one():
    cfg = ClusterConfig(num_gpus=2, pools=(PoolConfig(initial_replicas=2),))
    cold = simulate(prefetch_table(), cfg, ByJob({0: 0, 1: 1}))  # W warms the other replica: B misses S
    warm = simulate(prefetch_table(), cfg, ByJob({0: 0, 1: 1}), hooks=Hooks(prefetcher=WarmS()))
    cached = simulate(prefetch_table(), cfg, ByJob({0: 0, 1: 0}))  # W warmed B's replica itself

    def b(res):
        return res.requests.set_index("request_id").loc[1]

    ttft = {k: b(r)["first_token_s"] - b(r)["release_s"] for k, r in (("cold", cold), ("warm", warm),
                                                                          ("cached", cached))}
    assert (b(cold)["cached_tokens"], b(warm)["cached_tokens"], b(cached)["cached_tokens"]) == (0, 1024, 1024)
    assert ttft["warm"] == ttft["cached"] < ttft["cold"]
    assert len(warm.requests) == 3  # the prefetch is not a call of the workload
    p = warm.prefetches
    assert len(p) == 1 and p.loc[0, "replica_id"] == 0 and p.loc[0, "num_tokens"] == 1024
    assert p.loc[0, "cached_tokens"] == 0 and p.loc[0, "finish_s"] < b(warm)["release_s"]
    assert summarize_results(warm)["prefetches"] == 1 and len(cold.prefetches) == 0


def test_a_prefetcher_naming_a_replica_that_is_not_ready_is_refused():
    class Wrong:
        def prefetch(self, done, replicas, now):
            return [Prefetch(7, tuple(S), 16, 1024)]

    cfg = ClusterConfig(num_gpus=2, pools=(PoolConfig(initial_replicas=2),))
    with pytest.raises(RuntimeError, match="prefetcher Wrong named replica 7, which is not one of the ready"):
        simulate(prefetch_table(), cfg, ByJob({0: 0, 1: 1}), hooks=Hooks(prefetcher=Wrong()))


# --- retention -----------------------------------------------------------------------------------------------


P = list(range(100, 200))  # A's context: 100 blocks


def retention_table() -> pd.DataFrame:
    """Job 0: A (context P), then its continuation A' (P + 20 blocks) after a 20 s tool call. During the tool call
    five unique calls (120 blocks each) pass through the 300-block cache and, with LRU, evict P."""
    unique = [list(range(10_000 * (k + 1), 10_000 * (k + 1) + 120)) for k in range(5)]
    return make_table({
        "request_id": [0, 1, 2, 3, 4, 5, 6], "arrival_s": [0.0, 0.0, 3.0, 6.0, 9.0, 12.0, 15.0],
        "input_tokens": [1600, 1920] + [1920] * 5, "output_tokens": [4, 4] + [4] * 5,
        "block_hashes": [P, P + list(range(300, 320))] + unique, "parents": [[], [0]] + [[]] * 5,
        "think_s": [0.0, 20.0] + [0.0] * 5, "job_id": [0, 0, 1, 2, 3, 4, 5]})


class Fixed:
    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s

    def retain_s(self, done: CallDone, now: float) -> float:
        return self.ttl_s if done.request.request_id == 0 else 0.0


def test_retention_pins_a_programs_context_through_its_tool_call_and_reports_the_hits():
    cfg = ClusterConfig(num_gpus=1, pools=(PoolConfig(initial_replicas=1),),
                        engine=EngineArgs(num_gpu_blocks_override=301, max_model_len=4096))
    plain = simulate(retention_table(), cfg, ByJob(dict.fromkeys(range(6), 0)))
    kept = simulate(retention_table(), cfg, ByJob(dict.fromkeys(range(6), 0)), hooks=Hooks(retention=Fixed(60.0)))
    hit = {k: r.requests.set_index("request_id").at[1, "cached_tokens"] for k, r in (("plain", plain), ("kept", kept))}
    assert hit == {"plain": 0, "kept": 1600}
    row = kept.retention.iloc[0]
    assert (row["pins"], row["pins_used"], row["pins_expired"], row["pins_yielded"]) == (1, 1, 0, 0)
    a = kept.requests.set_index("request_id")
    held = a.at[1, "release_s"] - a.at[0, "finish_s"]  # pinned from A's end to A' joining the batch
    assert 100 * held <= row["pinned_block_s"] <= 100 * (held + 1.0)
    s = summarize_results(kept)
    assert (s["pinned_hit_tokens"], summarize_results(plain)["pinned_block_s"]) == (1600, 0.0)
    assert s["prefix_hit_rate"] > summarize_results(plain)["prefix_hit_rate"]


def test_a_retention_policy_returning_a_bad_ttl_is_named():
    cfg = ClusterConfig(num_gpus=1, pools=(PoolConfig(initial_replicas=1),))
    with pytest.raises(ValueError, match=r"retention policy Fixed returned retain_s=nan for request 0"):
        simulate(retention_table(), cfg, ByJob(dict.fromkeys(range(6), 0)), hooks=Hooks(retention=Fixed(float("nan"))))


def continuum_after_tool_calls(ttft_s: float) -> ToolTimeTTL:
    """Continuum's TTL policy after a chain of 101 calls of 20,000 prompt tokens, each released 8 s (its tool call)
    after its parent ended; the first computed its prompt in 1 s, the others waited and took ``ttft_s``."""
    ttl, t = ToolTimeTTL(), 0.0
    for k in range(MIN_SAMPLES + 1):
        first = t + (1.0 if k == 0 else ttft_s)
        info = RequestInfo(k, t, 20_000, (), 16, workflow="w", agent="coder", parents=(k - 1,) if k else ())
        ttl.observe(CallDone(info, 0, "ok", t, first, first + 1.0, 10, 0))
        t = first + 1.0 + 8.0
    return ttl


def test_continuums_ttl_covers_the_tool_time_it_learned_when_that_pays():
    """Pinning through an 8 s tool call pays when recomputing and queueing again would cost more (12 s): the TTL is
    the first candidate past 8 s. It does not when they cost 4 s; a program's last call is never pinned."""
    info = RequestInfo(999, 0.0, 20_000, (), 16, workflow="w", agent="coder")
    done = CallDone(info, 0, "ok", 0.0, 1.0, 2.0, 10, 0)
    ttl = continuum_after_tool_calls(12.0).retain_s(done, 2.0)
    assert 8.0 <= ttl < 8.0 * 1.2  # the candidates are 64 log-spaced durations from 0.1 s to 1 h
    assert continuum_after_tool_calls(4.0).retain_s(done, 2.0) == 0.0
    assert continuum_after_tool_calls(12.0).retain_s(replace(done, program_done=True), 2.0) == 0.0


# --- every registered system, end to end --------------------------------------------------------------------


@pytest.fixture(scope="module")
def agent_workload() -> pd.DataFrame:
    return make_workload("coding-assistant", rate=0.05, duration_s=240, seed=5)


def run_system(name: str, table: pd.DataFrame):
    base = ClusterConfig(num_gpus=2, pools=(PoolConfig(initial_replicas=2),))
    p = make_system(name)
    return simulate(table, cluster_config(system(name), base), p.router, p.scaler, hooks=p.hooks)


@pytest.mark.parametrize("name", BASELINES)
def test_every_baseline_runs_an_agent_workload_end_to_end_deterministically(name, agent_workload):
    a, b = run_system(name, agent_workload), run_system(name, agent_workload)
    assert len(a.requests) == len(agent_workload) and (a.requests["status"] == "ok").all()
    for table in ("requests", "jobs", "timeseries", "cluster", "prefetches", "retention"):
        pd.testing.assert_frame_equal(getattr(a, table), getattr(b, table), check_exact=True)
    s = summarize_results(a)
    assert np.isfinite(s["mean_jct_s"]) and s["gpu_seconds"] > 0


def test_the_baselines_differ_where_their_mechanisms_act(agent_workload):
    """Each baseline's own mechanism is in use: priorities reach the engine, Continuum pins, ThunderAgent's gate
    and the routers send calls elsewhere than round-robin."""
    runs = {n: run_system(n, agent_workload) for n in ("vllm", "production-stack", "continuum", "autellix")}
    assert runs["continuum"].retention["pins"].sum() > 0
    assert runs["vllm"].retention["pins"].sum() == 0
    replicas = {n: r.requests.sort_values("request_id")["replica_id"].tolist() for n, r in runs.items()}
    assert replicas["production-stack"] != replicas["vllm"] and replicas["autellix"] != replicas["vllm"]


def test_hooks_that_do_nothing_change_nothing(agent_workload):
    """Every hook called and declining (priority 0 under FCFS, no pin, no prefetch, hints kept, every call admitted)
    gives the tables of a run without hooks, bit for bit: the front end's hooks cost nothing when unused."""

    class Inert:
        def __init__(self):
            self.calls = 0

        def priority(self, request, now):
            self.calls += 1
            return 0

        def retain_s(self, done, now):
            self.calls += 1
            return 0.0

        def prefetch(self, done, replicas, now):
            self.calls += 1
            return []

        def annotate(self, request, now):
            self.calls += 1
            return request

        def observe(self, done):
            self.calls += 1

        def admit(self, request, replicas, now):
            return True

        def tick(self, replicas, now):
            return []

    inert = Inert()
    hooks = Hooks(prioritizer=inert, retention=inert, prefetcher=inert, predictor=inert, gate=inert)
    cfg = ClusterConfig(num_gpus=2, pools=(PoolConfig(initial_replicas=2),))
    plain = simulate(agent_workload, cfg, make_system("sglang").router)
    hooked = simulate(agent_workload, cfg, make_system("sglang").router, hooks=hooks)
    assert inert.calls >= 5 * len(agent_workload)
    for table in ("requests", "jobs", "timeseries", "cluster"):
        pd.testing.assert_frame_equal(getattr(plain, table), getattr(hooked, table), check_exact=True)


def test_memory_spread_is_nan_not_zero_when_the_cluster_never_uses_its_kv():
    """0.0 would claim a perfectly even cluster; a cluster whose calls never use 5 % of KV has no spread to
    measure. A busy one's spread is the mean over its samples of std/mean across ready replicas."""
    def ts(usages):
        return pd.DataFrame([{"t": t, "replica_id": r, "state": "ready", "kv_usage": u}
                             for t, row in enumerate(usages) for r, u in enumerate(row)])

    assert math.isnan(mem_util_cv(ts([[0.01, 0.03], [0.02, 0.04]])))
    assert mem_util_cv(ts([[0.2, 0.6], [0.01, 0.01]])) == pytest.approx(0.5)  # only the busy sample counts
