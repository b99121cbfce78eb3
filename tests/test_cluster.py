"""The simulated cluster: DAG release, determinism, scaling limits, bad configs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from frontend.engine_args import EngineArgs
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
    table = make_workload("coding-assistant-chat", rate=0.5, duration_s=60, seed=3)
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

    table = make_workload("coding-assistant-chat", rate=0.5, duration_s=60, seed=0)
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


def test_a_router_sees_every_replica_as_of_its_own_decision():
    """Views are read when the router asks, once per decision: a decision never sees an earlier one's values."""
    seen = []

    class Fewest:
        def route(self, request, replicas, now):
            seen.append([(r.replica_id, r.outstanding_requests, r.outstanding_tokens) for r in replicas])
            return min(replicas, key=lambda r: (r.outstanding_requests, r.replica_id)).replica_id

    t = make_table({"request_id": [0, 1, 2], "arrival_s": [0.0, 0.0, 0.0], "input_tokens": [100, 200, 300],
                    "output_tokens": [5, 5, 5]})
    simulate(t, small_cfg(), Fewest())
    assert seen == [[(0, 0, 0), (1, 0, 0)], [(0, 1, 100), (1, 0, 0)], [(0, 1, 100), (1, 1, 200)]]


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
    table = make_workload("coding-assistant-chat", rate=0.5, duration_s=30, seed=1)
    whole = simulate(table, ClusterConfig(), make_router("round_robin")).requests
    sim = Simulation(table, ClusterConfig(), make_router("round_robin"))
    t = 0.0
    while not sim.run(until=t):
        t += 7.0
    stepped = sim.result().requests
    assert np.array_equal(whole["finish_s"].to_numpy(), stepped["finish_s"].to_numpy())


def test_a_call_longer_than_max_model_len_is_rejected_and_the_run_goes_on():
    """As vLLM's API refuses it: counted as rejected with a failure row; its dependents are still released."""
    t = make_table({"request_id": [0, 1, 2], "arrival_s": [0.0, 0.0, 0.0], "input_tokens": [100, 2000, 100],
                    "output_tokens": [10, 100, 10], "parents": [[], [], [1]], "job_id": [0, 1, 1]})
    cfg = small_cfg(engine=EngineArgs(max_model_len=2048))
    res = simulate(t, cfg, make_router("round_robin"))
    r = res.requests.set_index("request_id")
    assert list(r["status"]) == ["ok", "rejected", "ok"]
    assert r.loc[2, "release_s"] == r.loc[1, "finish_s"] == 0.0
    assert list(res.failures["kind"]) == ["call_rejected"] and "max_model_len=2048" in res.failures["detail"][0]
    # 2000 + 48 tokens fit exactly
    t2 = t.assign(output_tokens=[10, 48, 10])
    assert (simulate(t2, cfg, make_router("round_robin")).requests["status"] == "ok").all()


def test_a_context_window_the_kv_cache_cannot_hold_is_refused_as_vllm_refuses_to_start():
    t = make_table({"request_id": [0], "arrival_s": [0.0], "input_tokens": [10], "output_tokens": [1]})
    with pytest.raises(ValueError, match="max_model_len=131072 tokens do not fit its KV cache of 1000 blocks"):
        simulate(t, small_cfg(engine=EngineArgs(num_gpu_blocks_override=1000)), make_router("round_robin"))
    ok = small_cfg(engine=EngineArgs(num_gpu_blocks_override=1000, max_model_len=15985))
    assert (simulate(t, ok, make_router("round_robin")).requests["status"] == "ok").all()
    with pytest.raises(ValueError, match="15986 tokens do not fit"):
        simulate(t, small_cfg(engine=EngineArgs(num_gpu_blocks_override=1000, max_model_len=15986)),
                 make_router("round_robin"))
