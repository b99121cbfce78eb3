"""Bad input is refused at construction, naming the field, the value and the allowed range; a run that cannot make
progress ends with an error saying why; idle time costs no samples; sizes are bounded."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np
import pytest

from frontend.engine_args import EngineArgs
from policies.registry import make_router, make_scaler
from real.config import RealConfig
from sim.cluster import IDLE_SKIP_SAMPLES, STALL_S, ClusterConfig, PoolConfig, StalledError, simulate
from sim.scenario import Scenario
from traces.schema import MAX_ROWS, MAX_TOKENS, WorkloadError, make_table
from traces.workflow import load_workflow, make_workload, scale_workflow

# --- configs: each refused at construction with field, value and range ----------------------------------------------


@pytest.mark.parametrize("make, match", [
    (lambda: ClusterConfig(num_gpus=0), r"ClusterConfig.num_gpus=0 must be in \[1, 65536\]"),
    (lambda: ClusterConfig(num_gpus=2**64), r"num_gpus=18446744073709551616 must be in \[1, 65536\]"),
    (lambda: ClusterConfig(num_gpus=8.0), r"num_gpus=8.0 must be .* \(an integer\)"),
    (lambda: PoolConfig(initial_replicas=-2), r"pool 'default': PoolConfig.initial_replicas=-2 must be in \[0, "),
    (lambda: PoolConfig(tp=0), r"PoolConfig.tp=0 must be in \[1, 65536\]"),
    (lambda: ClusterConfig(pools=(PoolConfig("a", initial_replicas=1), PoolConfig("a", initial_replicas=1))),
     r"pool name\(s\) \['a'\] appear twice"),
    (lambda: ClusterConfig(pools=()), r"ClusterConfig.pools=\(\) must be a non-empty tuple"),
    (lambda: ClusterConfig(agent_pools={"coder": "gpu"}), r"agent_pools maps agents to pool\(s\) \['gpu'\]"),
    (lambda: ClusterConfig(control_interval_s=0), r"ClusterConfig.control_interval_s=0 must be > 0"),
    (lambda: ClusterConfig(sample_interval_s=0.0), r"ClusterConfig.sample_interval_s=0.0 must be > 0"),
    (lambda: ClusterConfig(weight_load_gbps=0), r"ClusterConfig.weight_load_gbps=0 must be > 0"),
    (lambda: ClusterConfig(engine_startup_s=math.nan), r"ClusterConfig.engine_startup_s=nan must be >= 0"),
    (lambda: ClusterConfig(engine_startup_s=math.inf), r"engine_startup_s=inf must be >= 0 \(a finite number\)"),
    (lambda: ClusterConfig(gpu="v100"), r"unknown GPU 'v100'; known GPUs: a100-40gb"),
    (lambda: ClusterConfig(engine_version="vllm-v2"), r"engine_version \(on a100-40gb\)='vllm-v2' must be one of "
                                                      r"vllm-v0, vllm-v1"),
    (lambda: ClusterConfig(num_gpus=4), r"initial replicas need 8 GPUs but the cluster has num_gpus=4"),
    (lambda: EngineArgs(block_size=0), r"EngineArgs.block_size=0 must be in \[1, 2147483647\] \(an integer\)"),
    (lambda: EngineArgs(max_num_seqs=2**63), r"EngineArgs.max_num_seqs=9223372036854775808 must be in"),
    (lambda: EngineArgs(enable_prefix_caching="yes"), r"EngineArgs.enable_prefix_caching='yes' must be True or "
                                                      r"False"),
    (lambda: EngineArgs(gpu_memory_utilization=math.nan), r"gpu_memory_utilization=nan must be in \(0, 1\]"),
    (lambda: EngineArgs(max_model_len=0), r"EngineArgs.max_model_len=0 must be in \[1, "),
    (lambda: EngineArgs(kv_cache_dtype="int4"), r"kv_cache_dtype='int4' must be one of auto, fp8"),
    (lambda: RealConfig(model="m", scrape_interval_s=0), r"RealConfig.scrape_interval_s=0 must be > 0"),
    (lambda: RealConfig(model="m", request_timeout_s=math.inf), r"request_timeout_s=inf must be > 0"),
    (lambda: RealConfig(model="m", num_replicas=-1), r"RealConfig.num_replicas=-1 must be in \[0, "),
    (lambda: RealConfig(model="m", kv_cache_space_gib=0), r"RealConfig.kv_cache_space_gib=0 must be in \[1, "),
    (lambda: RealConfig(model="m", cores=(-1,)), r"RealConfig.cores\[0\]=-1 must be in \[0, "),
    (lambda: RealConfig(model="m", dtype="fp4"), r"RealConfig.dtype='fp4' must be one of auto, half"),
    (lambda: RealConfig(model="", cores=(0,)), r"RealConfig.model='' must be a non-empty string"),
    (lambda: RealConfig(model="m", retry_failed=1), r"RealConfig.retry_failed=1 must be True or False"),
    (lambda: Scenario(system="pythia", rate=0.0), r"Scenario.rate=0.0 must be > 0"),
    (lambda: Scenario(system="pythia", duration_s=math.nan), r"Scenario.duration_s=nan must be > 0"),
    (lambda: Scenario(system="pythia", seed=-1), r"Scenario.seed=-1 must be in \[0, 4294967295\]"),
    (lambda: Scenario(system="pythia", slo_s=-5), r"Scenario.slo_s=-5 must be > 0"),
    (lambda: Scenario(system="pythia", gpus=0), r"Scenario.gpus=0 must be in \[1, 65536\]"),
    (lambda: Scenario(system="pythia", replicas=-2), r"Scenario.replicas=-2 must be in \[0, 65536\]"),
    (lambda: Scenario(system="pythia", replicas=9), r"Scenario.replicas=9: 9 replicas of tp=1 need 9 GPUs"),
    (lambda: Scenario(system="pythia", tp=16), r"Scenario.tp=16: one replica needs 16 GPUs but the cluster has "
                                               r"gpus=8"),
    (lambda: Scenario(system="nope"), r"Scenario.system='nope' must be one of vllm, vllm-hpa, production-stack"),
    (lambda: Scenario(router="pythia", scaler="nope"), r"Scenario.scaler='nope' must be one of static"),
    (lambda: Scenario(system="pythia", workload="nope"), r"Scenario.workload='nope' is not a shipped workflow"),
    (lambda: Scenario(system="pythia", model="llama-9"), r"unknown model 'llama-9'"),
])
def test_a_config_refuses_a_bad_value_naming_field_value_and_range(make, match) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_env_config_refuses_bad_values() -> None:
    pytest.importorskip("gymnasium", reason="the RL environment needs the 'rl' extra")
    from sim.episodes import EnvConfig

    for kw, match in [({"episode_s": math.nan}, r"EnvConfig.episode_s=nan must be >= 5"),
                      ({"initial_replicas": (3, 2)}, r"EnvConfig.initial_replicas=\(3, 2\): low=3 is above high=2"),
                      ({"initial_replicas": (1.5, 2)}, r"EnvConfig.initial_replicas\[0\]=1.5 must be"),
                      ({"trace_rate_scale": (0.0, 1.0)}, r"EnvConfig.trace_rate_scale\[0\]=0.0 must be > 0"),
                      ({"history": 0}, r"EnvConfig.history=0 must be in \[1, 64\]"),
                      ({"router": "nope"}, r"EnvConfig.router='nope' must be one of round_robin"),
                      ({"reward_baseline": "nope"}, r"EnvConfig.reward_baseline='nope' must be one of static"),
                      ({"w_gpu": -0.1}, r"EnvConfig.w_gpu=-0.1 must be >= 0"),
                      ({"trace": "nope"}, r"EnvConfig.trace='nope' must be one of"),
                      ({"workflow": "nope"}, r"EnvConfig.workflow='nope' is neither a shipped workflow")]:
        with pytest.raises(ValueError, match=match):
            EnvConfig(**kw)


# --- runs that cannot make progress end with an error, at once -------------------------------------------------------


def _two_calls(gap_s: float = 1.0):
    return make_table({"request_id": [0, 1], "arrival_s": [0.0, gap_s], "input_tokens": [100, 100],
                       "output_tokens": [10, 10]})


def test_a_pool_that_nothing_can_start_is_refused_at_construction() -> None:
    cfg = ClusterConfig(num_gpus=1, pools=(PoolConfig(initial_replicas=0),))
    with pytest.raises(ValueError, match=r"pool\(s\) \['default'\] have initial_replicas=0 and there is no scaler"):
        simulate(_two_calls(), cfg, make_router("round_robin"))
    with pytest.raises(ValueError, match="num_gpus=0"):
        simulate(_two_calls(), ClusterConfig(num_gpus=0, pools=(PoolConfig(initial_replicas=0),)),
                 make_router("round_robin"), make_scaler("pythia"))


def test_a_scaler_that_never_starts_a_replica_ends_the_run_within_a_second() -> None:
    cfg = ClusterConfig(num_gpus=1, pools=(PoolConfig(initial_replicas=0),))
    t = time.perf_counter()
    with pytest.raises(StalledError, match=rf"pool 'default': 2 call\(s\) wait .* for {STALL_S:.0f} s of simulated "
                                           r"time no replica of the pool was ready or starting: the scaler Static "
                                           r"started none \(1 of 1 GPUs free\)"):
        simulate(_two_calls(), cfg, make_router("round_robin"), make_scaler("static", replicas=0, min_replicas=0))
    assert time.perf_counter() - t < 1.0
    # the same pool with a scaler that starts a replica when calls wait is served
    res = simulate(_two_calls(), cfg, make_router("round_robin"), make_scaler("static", replicas=1))
    assert (res.requests["status"] == "ok").all()


def test_a_scaler_over_an_endless_span_is_refused() -> None:
    cfg = ClusterConfig(num_gpus=1, pools=(PoolConfig(initial_replicas=1),))
    with pytest.raises(ValueError, match=r"arrivals span 1e\+12 s: the scaler would decide every "
                                         r"control_interval_s=5 s, 2e\+11 times"):
        simulate(_two_calls(1e12), cfg, make_router("round_robin"), make_scaler("static"))


@pytest.mark.parametrize("gap_s", [1e6, 1e12])
def test_a_long_idle_gap_costs_no_samples_and_no_time(gap_s: float) -> None:
    cfg = ClusterConfig(num_gpus=1, pools=(PoolConfig(initial_replicas=1),))
    t = time.perf_counter()
    res = simulate(_two_calls(gap_s), cfg, make_router("round_robin"))
    assert time.perf_counter() - t < 1.0
    assert len(res.timeseries) < 100 and (res.requests["status"] == "ok").all()
    lat = (res.requests["finish_s"] - res.requests["release_s"]).to_numpy()
    assert lat[0] == pytest.approx(lat[1], abs=1e-3)  # the same idle replica (times near 1e12 s: 1e-4 s steps)
    assert res.cluster["t"].max() >= gap_s  # sampling resumed after the gap


def test_a_short_idle_gap_is_sampled_every_interval() -> None:
    """Idle spans up to IDLE_SKIP_SAMPLES intervals keep their samples (so row means stay time averages)."""
    gap = IDLE_SKIP_SAMPLES / 2
    res = simulate(_two_calls(gap), ClusterConfig(num_gpus=1, pools=(PoolConfig(initial_replicas=1),)),
                   make_router("round_robin"))
    assert np.array_equal(res.cluster["t"].to_numpy(), np.arange(len(res.cluster), dtype=float))
    assert len(res.cluster) > gap


# --- workflow.yaml: every value that was clamped, wrapped or misread is refused at its line --------------------------

AGENT = """name: probe
agents:
  a:
    system_prompt_tokens: 100
    input_tokens: {input_tokens}
    output_tokens: {output_tokens}
    fan_out: {fan_out}
    calls: {calls}
    slo_s: {slo_s}
"""
GOOD = {"input_tokens": "10", "output_tokens": "10", "fan_out": "1", "calls": "1", "slo_s": "5"}


@pytest.mark.parametrize("field, value, line, match", [
    ("input_tokens", "-50", 5, r"agents.a.input_tokens: -50 is outside the allowed \[1, 16777216\] tokens"),
    ("output_tokens", "0", 6, r"agents.a.output_tokens: 0 is outside the allowed \[1, 16777216\] tokens"),
    ("fan_out", "0", 7, r"agents.a.fan_out: 0 is outside the allowed \[1, 1024\] copies"),
    ("calls", "-3", 8, r"agents.a.calls: -3 is outside the allowed \[1, 10000\] calls"),
    ("slo_s", "-5", 9, r"agents.a.slo_s: Input should be greater than 0"),
    ("input_tokens", str(2**64), 5, r"agents.a.input_tokens: 1.84467e\+19 is outside the allowed"),
    ("input_tokens", "{dist: uniform, low: 10, high: 5}", 5,
     r"agents.a.input_tokens: low=10.0 is greater than high=5.0"),
    ("input_tokens", ".nan", 5, r"agents.a.input_tokens.value: Input should be a finite number"),
    ("input_tokens", "1e12", 5, r"agents.a.input_tokens: 1000000000000 is outside the allowed \[1, 16777216\] tokens"),
    ("input_tokens", "'1e3'", 5, r"agents.a.input_tokens: '1e3' is text; write a number"),
    ("fan_out", "1e9", 7, r"agents.a.fan_out: 1000000000 is outside the allowed \[1, 1024\] copies"),
    ("output_tokens", "{dist: lognormal, mean: 100, cv: 1}", 6,
     r"agents.a.output_tokens: a lognormal distribution draws values in \[0, inf\], beyond the allowed \[1, 16777216\] "
     r"tokens; bound it with min and max"),
    ("calls", "{dist: uniform, low: 0.5, high: 3}", 8,
     r"agents.a.calls: a uniform distribution draws values in \[0.5, 3\]"),
])
def test_a_workflow_value_out_of_range_is_refused_at_its_line(tmp_path, field, value, line, match) -> None:
    path = tmp_path / "probe.yaml"
    path.write_text(AGENT.format(**{**GOOD, field: value}))
    with pytest.raises(WorkloadError, match=rf"probe\.yaml:{line}: {match}"):
        load_workflow(path)


def test_the_probe_workflow_itself_loads(tmp_path) -> None:
    path = tmp_path / "probe.yaml"
    path.write_text(AGENT.format(**GOOD))
    assert load_workflow(path).agents["a"].input_tokens.value == 10


def test_a_duplicate_yaml_key_is_refused_naming_both_lines(tmp_path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(AGENT.format(**GOOD).replace("    calls: 1\n", "    calls: 1\n    input_tokens: 20\n"))
    with pytest.raises(WorkloadError, match=r"dup\.yaml:9: not valid YAML: duplicate key 'input_tokens' \(first at "
                                            r"line 5\)"):
        load_workflow(path)


def test_sizes_are_bounded_before_they_run_out_of_memory(tmp_path) -> None:
    with pytest.raises(WorkloadError, match=rf"poisson:1e\+09: .* a workload may have at most {MAX_ROWS} rows"):
        make_workload("coding-assistant-chat", rate=1e9, duration_s=10)
    with pytest.raises(WorkloadError, match=r"n=1000000000 is about 1e\+09 arrivals"):
        make_workload("coding-assistant-chat", num_jobs=10**9)
    big = AGENT.format(**{**GOOD, "fan_out": "1000", "calls": "200"})
    (tmp_path / "big.yaml").write_text(big)
    with pytest.raises(WorkloadError, match=r"workflow 'probe', job probe-0: agent 'a' would make call 100001; a job "
                                            r"may have at most 100000 calls"):
        make_workload(str(tmp_path / "big.yaml"), num_jobs=1)


def test_a_workflow_scaled_below_one_token_keeps_one_token() -> None:
    """Scaling is a transformation of valid sizes: sizes scaled below 1 token are 1 (min: 1), stated in the result,
    which is validated like a loaded workflow (so a scale-up past the size bound is refused)."""
    wf = load_workflow("software-team-chat")
    tiny = scale_workflow(wf, input_scale=1e-4, output_scale=1e-4)
    assert all(spec.output_tokens.bounds()[0] == 1 for spec in tiny.agents.values())
    with pytest.raises(WorkloadError, match=r"scale_workflow\('software-team-chat', 1e\+06, 1\).*outside|beyond"):
        scale_workflow(wf, input_scale=1e6)


# --- workload tables ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("column, values, match", [
    ("input_tokens", [100, 0], r"row 1: input_tokens=0 must be in \[1, 16777216\]"),
    ("input_tokens", [100, MAX_TOKENS + 1], r"row 1: input_tokens=16777217 must be in \[1, 16777216\]"),
    ("output_tokens", [-1, 10], r"row 0: output_tokens=-1 must be in \[0, 16777216\]"),
    ("output_tokens", [10, 2**64], r"column 'output_tokens' .* row 1: output_tokens=18446744073709551616 is not an "
                                   r"integer in \[-2\^63, 2\^63\)"),
    ("output_tokens", [10, 1e19], r"row 1: output_tokens=.*1e\+19 is not an integer in"),
    ("request_id", [-1, 0], r"row 0: request_id=-1 must be in \[0, "),
    ("slo_s", [5.0, -5.0], r"row 1: slo_s=-5.0 must be a finite number > 0 \(or NaN: no objective\)"),
])
def test_a_table_value_out_of_range_is_refused_naming_row_and_column(column, values, match) -> None:
    rows = {"request_id": [0, 1], "arrival_s": [0.0, 1.0], "input_tokens": [100, 100], "output_tokens": [10, 10],
            column: values}
    with pytest.raises(WorkloadError, match=match):
        make_table(rows, "probe")


def test_configs_still_build_from_their_defaults_and_replace() -> None:
    cfg = ClusterConfig()
    assert replace(cfg, num_gpus=16).num_gpus == 16
    assert Scenario(system="sglang").cluster() == cfg  # a system with vLLM's own engine arguments
    assert Scenario(system="pythia").cluster() == replace(cfg, engine=replace(
        cfg.engine, scheduling_policy="priority", admission_policy="predicted"))
    assert EngineArgs() == replace(EngineArgs(), block_size=16)
