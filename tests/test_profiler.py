"""Pythia's profiler: it learns a known automaton, output bounds and tool times, offline and online."""

from __future__ import annotations

import math

import numpy as np
import pytest

from policies.api import CallDone, Hooks, RequestInfo
from policies.profiler import Profiler, bucket, report
from policies.routers import RoundRobin
from sim.cluster import ClusterConfig, PoolConfig, simulate
from traces.workflow import generate, parse_workflow

# a -> b (skipped 70 % of the time; 3 copies when it runs) and a -> c (always); tool time 5 s before b and c.
KNOWN = {
    "name": "known", "hash_block_size": 16,
    "agents": {
        "a": {"system_prompt_tokens": 256, "input_tokens": 64,
              "output_tokens": {"dist": "uniform", "low": 1, "high": 100}},
        "b": {"system_prompt_tokens": 128, "input_tokens": 32, "output_tokens": 20, "depends_on": ["a"],
              "fan_out": 3, "probability": 0.3, "tool_time_s": 5},
        "c": {"system_prompt_tokens": 64, "input_tokens": 32, "output_tokens": 10, "depends_on": ["a"],
              "tool_time_s": 5},
    },
}
N_JOBS = 2000


@pytest.fixture(scope="module")
def known_table():
    return generate(parse_workflow(KNOWN), "poisson:1", num_jobs=N_JOBS, seed=3)


def test_learns_known_automaton_offline(known_table):
    prof = Profiler().fit(known_table)
    nxt = {n.role: n for n in prof.next_roles("known", "a", 0)}
    assert set(nxt) == {"b", "c"}
    sigma = math.sqrt(0.3 * 0.7 / N_JOBS)
    assert abs(nxt["b"].probability - 0.3) < 4 * sigma
    assert nxt["c"].probability == 1.0
    assert nxt["b"].fan_out == 3.0 and nxt["c"].fan_out == 1.0
    assert prof.next_roles("known", "c", bucket(1)) == []  # c ends the job
    assert prof.tool_time("known", "a", 0.5) == 5.0
    # Output bound: the p90 of U{1..100} (within sampling error of the last `window` outputs).
    assert 85 <= prof.output_bound("known", "a") <= 95
    assert prof.output_bound("known", "b") == 20
    # Static prefix: each role's system prompt (whole blocks).
    blocks, size = prof.static_prefix("known", "a")
    assert size == 16 and len(blocks) == 256 // 16
    assert len(prof.static_prefix("known", "c")[0]) == 64 // 16
    # Remaining work after a: c, plus 3 b's 30 % of the time.
    calls, _ = prof.remaining("known", "a", 0)
    assert abs(calls - (1 + 0.3 * 3)) < 4 * 3 * sigma


def test_learns_online_from_simulated_completions(known_table):
    """The same automaton, learned only from what the front end tells the predictor while it serves the jobs."""
    table = known_table[known_table["job_id"] < 600]
    prof = Profiler()
    cfg = ClusterConfig(num_gpus=1, pools=(PoolConfig(initial_replicas=1),))
    simulate(table, cfg, RoundRobin(), None, hooks=Hooks(predictor=prof))
    nxt = {n.role: n for n in prof.next_roles("known", "a", 0)}
    assert abs(nxt["b"].probability - 0.3) < 4 * math.sqrt(0.21 / 600)
    assert nxt["b"].fan_out == 3.0
    # The tool time is measured from the parent's end to the child's release: 5 s of think time.
    assert prof.tool_time("known", "a", 0.5) == pytest.approx(5.0, abs=1e-6)
    assert 85 <= prof.output_bound("known", "a") <= 95


def test_annotate_keeps_hints_until_learned_then_fills_them():
    prof = Profiler(min_samples=3)
    req = RequestInfo(0, 0.0, 100, (1, 2, 3), 16, job_id=0, workflow="w", agent="x", expected_output_tokens=7,
                      next_agents=("y",))
    assert prof.annotate(req, 0.0) == req
    for i, out in enumerate((10, 20, 30, 40)):
        r = RequestInfo(i + 1, 0.0, 100, (1, 2, 3), 16, job_id=i + 1, workflow="w", agent="x")
        prof.annotate(r, 0.0)
        prof.observe(CallDone(r, 0, "ok", 0.0, 0.1, 0.2, out, 0, program_done=True))
    assert prof.annotate(req, 1.0).expected_output_tokens == math.ceil(np.quantile([10, 20, 30, 40], 0.9))


def test_bounds_from_a_trace():
    """Fitted on half the Claude Code sessions, the p90 bound covers about 90 % of the other half's outputs."""
    from traces.workflow import make_workload

    table = make_workload("claude-code-v8", seed=0)
    r = report(table)
    assert r["roles"] == 4  # main and three sub-agent types, from the trace's agent field
    assert 0.85 <= r["output_bound_coverage"] <= 0.95
    assert 0.85 <= r["tool_time_p90_coverage"] <= 0.95
    assert r["next_agent_accuracy"] > 0.9
    assert report(table) == r  # deterministic


def test_prefix_clustering_without_agent_names(known_table):
    table = known_table.assign(agent="")
    prof = Profiler().fit(table)
    assert len(prof.roles("known")) == 3  # one role per system prompt


@pytest.mark.parametrize("field,value", [("quantile", 0.0), ("quantile", 1.5), ("window", 0), ("prefix_share", 2.0)])
def test_bad_parameters_refused(field, value):
    with pytest.raises(ValueError, match=field):
        Profiler(**{field: value})
