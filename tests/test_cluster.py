"""The simulated cluster: DAG release, determinism, scaling limits, bad configs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from policies.api import ScaleAction
from policies.registry import make_router
from sim.cluster import ClusterConfig, PoolConfig, Simulation, cold_start_s, simulate
from traces.schema import make_table
from traces.workflow import make_workload


def small_cfg(**kw) -> ClusterConfig:
    return ClusterConfig(num_gpus=2, pools=(PoolConfig(initial_replicas=2),), **kw)


def test_dependent_calls_wait_for_parents_plus_think_time():
    t = make_table({"request_id": [1, 2, 3], "arrival_s": [0.0, 0.0, 0.0], "input_tokens": [100, 100, 100],
                    "output_tokens": [20, 20, 20], "parents": [[], [1], [1, 2]], "think_s": [0.0, 2.5, 1.0],
                    "job_id": [7, 7, 7]})
    r = simulate(t, small_cfg(), make_router("round_robin")).requests.set_index("request_id")
    assert r.loc[2, "release_s"] == pytest.approx(r.loc[1, "finish_s"] + 2.5)
    assert r.loc[3, "release_s"] == pytest.approx(max(r.loc[1, "finish_s"], r.loc[2, "finish_s"]) + 1.0)
    assert (r["status"] == "ok").all()


def test_same_inputs_give_bit_identical_results():
    table = make_workload("coding-assistant", rate=0.5, duration_s=60, seed=3)
    runs = [simulate(table, ClusterConfig(), make_router("pythia")) for _ in range(2)]
    pd.testing.assert_frame_equal(runs[0].requests, runs[1].requests, check_exact=True)
    pd.testing.assert_frame_equal(runs[0].timeseries, runs[1].timeseries, check_exact=True)


def test_shared_prefix_hits_on_the_same_replica():
    blocks = list(range(64))  # 1024 tokens of shared prefix at 16 tokens per id
    t = make_table({"request_id": [0, 1], "arrival_s": [0.0, 10.0], "input_tokens": [1100, 1100],
                    "output_tokens": [5, 5], "block_hashes": [blocks, blocks]})
    cfg = ClusterConfig(num_gpus=1, pools=(PoolConfig(initial_replicas=1),))
    r = simulate(t, cfg, make_router("round_robin")).requests
    assert r["cached_tokens"].tolist() == [0, 1024]


def test_scaler_is_clamped_to_the_gpus_and_cold_start_delays_service():
    class Greedy:
        def decide(self, obs):
            return ScaleAction({"default": 100})

    table = make_workload("coding-assistant", rate=0.5, duration_s=60, seed=0)
    cfg = ClusterConfig(num_gpus=4, pools=(PoolConfig(initial_replicas=1),), control_interval_s=5.0)
    res = simulate(table, cfg, make_router("round_robin"), Greedy())
    assert res.cluster["gpus_in_use"].max() == 4
    first_ready = res.cluster.loc[res.cluster["ready"] > 1, "t"].min()
    assert first_ready >= 5.0 + cold_start_s(cfg, "default") - cfg.sample_interval_s


def test_router_returning_an_unknown_replica_is_named():
    class Bad:
        def route(self, request, replicas, now):
            return 999

    t = make_table({"request_id": [0], "arrival_s": [0.0], "input_tokens": [10], "output_tokens": [1]})
    with pytest.raises(RuntimeError, match="Bad returned replica 999"):
        simulate(t, small_cfg(), Bad())


def test_impossible_configs_are_refused_clearly():
    t = make_table({"request_id": [0], "arrival_s": [0.0], "input_tokens": [10], "output_tokens": [1]})
    with pytest.raises(ValueError, match="need 3 GPUs"):
        simulate(t, ClusterConfig(num_gpus=2, pools=(PoolConfig(initial_replicas=3),)), make_router("round_robin"))
    with pytest.raises(ValueError, match="does not fit"):
        simulate(t, ClusterConfig(pools=(PoolConfig(model="llama-3.1-70b", initial_replicas=1),)),
                 make_router("round_robin"))
    with pytest.raises(ValueError, match="agent_pools"):
        simulate(t, dataclasses.replace(small_cfg(), agent_pools={"a": "nope"}), make_router("round_robin"))


def test_simulation_can_be_advanced_interval_by_interval():
    table = make_workload("coding-assistant", rate=0.5, duration_s=30, seed=1)
    whole = simulate(table, ClusterConfig(), make_router("round_robin")).requests
    sim = Simulation(table, ClusterConfig(), make_router("round_robin"))
    t = 0.0
    while not sim.run(until=t):
        t += 7.0
    stepped = sim.result().requests
    assert np.array_equal(whole["finish_s"].to_numpy(), stepped["finish_s"].to_numpy())
