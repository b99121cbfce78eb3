"""A what-if scenario as data: the cluster and workload it builds, and its refusals."""

from __future__ import annotations

import pandas as pd
import pytest

from frontend.engine_args import EngineArgs
from sim.scenario import Scenario, simulate_scenario, summarize_scenario


def test_a_scenario_builds_its_cluster_and_runs_deterministically():
    s = Scenario(workload="coding-assistant-chat", rate=0.5, duration_s=30, gpu="a100-80gb", gpus=4, tp=2,
                 system="pythia", engine=EngineArgs(max_num_seqs=64), slo_s=30.0)
    c = s.cluster()
    assert (c.gpu, c.num_gpus, c.pools[0].tp, c.pools[0].initial_replicas, c.engine.max_num_seqs) == (
        "a100-80gb", 4, 2, 2, 64)
    assert (s.table()["slo_s"] == 30.0).all()
    a, b = simulate_scenario(s), simulate_scenario(s)
    pd.testing.assert_frame_equal(a.requests, b.requests, check_exact=True)
    row = summarize_scenario(s.with_(system=None, router="round_robin", replicas=1))
    assert row["num_requests"] == len(s.table()) and row["num_failed"] == 0


def test_a_scenario_names_one_way_to_pick_its_policies():
    with pytest.raises(ValueError, match="exactly one of system"):
        Scenario(system="pythia", router="round_robin")
    with pytest.raises(ValueError, match="exactly one of system"):
        Scenario()
    with pytest.raises(ValueError, match="brings its own scaler"):
        Scenario(system="vllm", scaler="hpa")
