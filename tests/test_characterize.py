"""Characterization: hand-checked small cases, and the numbers ../shared/traces/README.md states."""

from __future__ import annotations

import numpy as np
import pytest

from traces.characterize import (
    burstiness,
    cached_tokens_cdf,
    characterize,
    dependency_stats,
    length_stats,
    prefix_hit_bound,
    prefix_hits,
)
from traces.loaders import load_trace
from traces.schema import make_table


def _table(blocks, parents=None, sessions=None, arrivals=None, size=4):
    n = len(blocks)
    return make_table({"request_id": range(n), "arrival_s": arrivals if arrivals is not None else np.arange(n) * 1.0,
                       "input_tokens": [max(len(b) * size, 1) for b in blocks], "output_tokens": [1] * n,
                       "block_hashes": blocks, "hash_block_size": size, "parents": parents or [[] for _ in blocks],
                       "session_id": sessions or [""] * n, "job_id": [0] * n}, "test")


def test_prefix_hits_are_chained():
    # row 2 has block 2 at position 1 like rows 0 and 1, but after a different first block: no hit there
    df = _table([[1, 2, 3], [1, 2, 4, 5], [9, 2, 3], [1, 2, 4, 6], []])
    assert prefix_hits(df).tolist() == [0, 8, 0, 12, 0]
    assert prefix_hit_bound(df) == pytest.approx(20 / (12 + 16 + 12 + 16 + 1))
    partial = make_table({"request_id": [0, 1], "arrival_s": [0.0, 1.0], "input_tokens": [10, 6],
                          "output_tokens": [1, 1], "block_hashes": [[7, 8, 9], [7, 8]], "hash_block_size": 4})
    assert prefix_hits(partial).tolist() == [0, 6]  # capped at the input length


def test_within_session_gives_each_session_its_own_cache():
    df = _table([[1, 2], [1, 2], [1, 2, 3]], sessions=["a", "b", "a"])
    assert prefix_hits(df).tolist() == [0, 8, 8]
    assert prefix_hits(df, within_session=True).tolist() == [0, 0, 8]


def test_cdf_burstiness_and_dependencies():
    df = _table([[1], [1], [2], [1, 5]], parents=[[], [0], [0], [1, 2]], arrivals=[0.0, 1.0, 1.0, 2.0])
    values, prob = cached_tokens_cdf(df)
    assert values.tolist() == [0, 0, 4, 4] and prob.tolist() == [0.25, 0.5, 0.75, 1.0]
    share, _ = cached_tokens_cdf(df, fraction=True)
    assert share.tolist() == [0, 0, 0.5, 1.0]
    dep = dependency_stats(df)
    assert dep["job_depth"]["max"] == 3 and dep["roots"] == 1 and dep["jobs"] == 1
    assert dep["fan_out"] == {"calls_with_children": 3, "mean": 1.33, "max": 2, "calls_with_2plus": 1}
    regular = _table([[]] * 120, arrivals=np.arange(120) * 0.5)
    b = burstiness(regular)
    assert b["interarrival_cv"] == 0 and b["mean_rate_rps"] == pytest.approx(2.0, rel=0.01)
    assert b["per_10s"]["max_over_mean"] == 1.0 and b["per_60s"]["max"] == 120
    lengths = length_stats(regular)
    assert lengths["input_tokens"]["p50"] == 1 and lengths["output_tokens"]["max"] == 1
    assert lengths["input_over_output"] == 1.0
    assert characterize(df)["calls_with_no_hit"] == 0.5


@pytest.mark.parametrize("name,hit", [("mooncake-conversation", 0.374), ("mooncake-synthetic", 0.651)])
def test_mooncake_matches_readme(name, hit):
    c = characterize(load_trace(name, context_limit_tokens=None))  # the README describes the files as recorded
    assert c["prefix_hit_bound"] == pytest.approx(hit, abs=0.0005)
    assert c["input_tokens"]["p50"] == {"mooncake-conversation": 6909, "mooncake-synthetic": 11587}[name]
    if name == "mooncake-conversation":
        b = c["burstiness"]
        assert (b["per_10s"]["mean"], b["per_10s"]["max"], b["per_10s"]["max_over_mean"]) == (33.99, 67, 1.97)
        assert (b["per_60s"]["max_over_mean"], b["per_60s"]["cv"]) == (1.21, 0.12)
        assert b["input_tokens_per_10s"] == {"max_over_mean": 2.19, "cv": 0.34}
    else:
        assert c["burstiness"]["interarrival_cv"] == pytest.approx(1.01, abs=0.005)


def test_azure_burstiness_matches_readme():
    code = burstiness(load_trace("azure-code"))
    assert code["interarrival_cv"] == pytest.approx(13.2, abs=0.05)
    assert code["mean_rate_rps"] == pytest.approx(2.57, abs=0.005)
    assert (code["per_1s"]["max"], code["per_1s"]["max_over_mean"], code["per_1s"]["cv"]) == (67, 26.1, 2.27)
    assert (code["per_10s"]["max"], code["per_10s"]["cv"]) == (327, 1.67)
    assert (code["per_60s"]["max"], code["per_60s"]["max_over_mean"], code["per_60s"]["cv"]) == (632, 4.16, 1.03)
    assert code["input_tokens_per_10s"]["max_over_mean"] == pytest.approx(13.4, abs=0.05)
    conv = burstiness(load_trace("azure-conv"))
    assert conv["interarrival_cv"] == 1.09 and conv["per_60s"]["max"] == 507
    assert conv["per_60s"]["max_over_mean"] == 1.54 and conv["per_10s"]["max_over_mean"] == 1.78


def test_claude_code_v8_within_session_hit_matches_readme():
    df = load_trace("claude-code-v8", context_limit_tokens=None)  # as recorded, no window
    assert len(df) == 49334
    assert prefix_hit_bound(df, within_session=True) == pytest.approx(0.963, abs=0.0005)
    assert float(np.percentile(df["input_tokens"], 50)) == pytest.approx(103659, abs=1)
    assert (df["input_tokens"] > 100_000).mean() == pytest.approx(0.52, abs=0.005)


def test_claude_code_v6_as_recorded_matches_readme():
    """The README's v6 figures are for the set as recorded (stream/non-stream copies included)."""
    df = load_trace("claude-code-v6-raw", context_limit_tokens=None)
    assert len(df) == 51216 and df.attrs["merged_duplicates"] == 0
    assert prefix_hit_bound(df, within_session=True) == pytest.approx(0.975, abs=0.0005)
