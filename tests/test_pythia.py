"""Pythia as one profiled system: every mechanism switchable off by name; the same object in every role."""

from __future__ import annotations

import pytest

from experiments.common import run_system
from policies.pythia import MECHANISMS, Pythia
from policies.systems import SYSTEMS, make_system
from sim.cluster import ClusterConfig, PoolConfig
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
