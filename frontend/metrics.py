"""Summary metrics of one run's Results, defined once for every figure, table and command (see the README)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from frontend.results import Results


def _pct(values: pd.Series | np.ndarray, q: float) -> float:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(np.percentile(v, q)) if len(v) else math.nan


def summarize(requests: pd.DataFrame, jobs: pd.DataFrame, timeseries: pd.DataFrame,
              cluster: pd.DataFrame | None = None, *, prefetches: pd.DataFrame | None = None,
              retention: pd.DataFrame | None = None) -> dict[str, float | int]:
    """Per-run summary: throughput, latency percentiles, hit rate, memory-utilization spread, queue, JCT, and with
    the run's prefetch and retention tables their totals. Counts (calls, failures, queue length, preemptions,
    prefetches, tokens) are integers, so tables of summaries write them as such."""
    ok = requests[requests["status"] == "ok"]
    e2e = ok["finish_s"] - ok["release_s"]
    ttft = ok["first_token_s"] - ok["release_s"]
    tpot = (ok["finish_s"] - ok["first_token_s"]) / (ok["output_tokens"] - 1).where(ok["output_tokens"] > 1)
    span = float(ok["finish_s"].max() - requests["release_s"].min()) if len(ok) else math.nan
    slo_ok = (e2e <= ok["slo_s"]) | ok["slo_s"].isna()
    out = {
        "num_requests": len(requests),
        "num_failed": int((requests["status"] != "ok").sum()),
        "throughput_rps": len(ok) / span if span > 0 else math.nan,
        "output_tokens_per_s": float(ok["output_tokens"].sum()) / span if span > 0 else math.nan,
        "mean_latency_s": float(e2e.mean()),
        "p50_latency_s": _pct(e2e, 50), "p90_latency_s": _pct(e2e, 90), "p99_latency_s": _pct(e2e, 99),
        "p50_ttft_s": _pct(ttft, 50), "p99_ttft_s": _pct(ttft, 99),
        "p50_tpot_s": _pct(tpot, 50), "p99_tpot_s": _pct(tpot, 99),
        "prefix_hit_rate": float(ok["cached_tokens"].sum() / max(ok["input_tokens"].sum(), 1)),
        "slo_attainment": float(slo_ok.mean()) if len(ok) else math.nan,
        "mean_jct_s": float(jobs["jct_s"].mean()) if len(jobs) else math.nan,
        "p95_jct_s": _pct(jobs["jct_s"], 95) if len(jobs) else math.nan,
        "mem_util_cv": mem_util_cv(timeseries),
        "max_queue_len": max_queue(timeseries, cluster),
        "preemptions": int(ok["num_preemptions"].sum()),
    }
    if cluster is not None and len(cluster):
        dt = gpus_series(cluster)
        out["gpu_seconds"] = float((dt * np.diff(np.append(dt.index.to_numpy(), dt.index[-1]))).sum())
    if prefetches is not None:
        out["prefetches"] = len(prefetches)
    if retention is not None:
        out["pinned_block_s"] = float(retention["pinned_block_s"].sum())
        out["pinned_hit_tokens"] = int(retention["pinned_hit_tokens"].sum())
    return out


def summarize_results(res: Results) -> dict[str, float | int]:
    """``summarize`` of every table of one run."""
    return summarize(res.requests, res.jobs, res.timeseries, res.cluster, prefetches=res.prefetches,
                     retention=res.retention)


BUSY_KV_USAGE = 0.05


def mem_util_cv(timeseries: pd.DataFrame) -> float:
    """Spread of GPU memory (KV) utilization across GPUs: mean over samples of std/mean across ready replicas.

    Only samples where the replicas' mean KV use is above ``BUSY_KV_USAGE`` are counted (a nearly idle cluster
    has no spread to speak of); NaN when there is none (e.g. 80 GB GPUs whose running calls never use 5 % of
    their KV memory), never 0.0, which would claim a perfectly even cluster.
    """
    ts = timeseries[timeseries["state"] == "ready"]
    if ts.empty:
        return math.nan
    g = ts.groupby("t")["kv_usage"]
    mean, std = g.mean(), g.std(ddof=0)
    busy = mean > BUSY_KV_USAGE
    return float((std[busy] / mean[busy]).mean()) if busy.any() else math.nan


def max_queue(timeseries: pd.DataFrame, cluster: pd.DataFrame | None) -> int:
    """Largest number of calls waiting anywhere (engine waiting queues + front-end pending) at one sample."""
    waiting = queue_series(timeseries, cluster)
    return int(waiting.max()) if len(waiting) else 0


def queue_series(timeseries: pd.DataFrame, cluster: pd.DataFrame | None) -> pd.Series:
    """Calls waiting at each sample time: engine waiting queues plus the front end's pending calls."""
    waiting = timeseries.groupby("t")["num_waiting"].sum()
    if cluster is not None and len(cluster):
        waiting = waiting.add(cluster.groupby("t")["pending"].sum(), fill_value=0)
    return waiting


def gpus_series(cluster: pd.DataFrame) -> pd.Series:
    """GPUs held (by replicas in any state) at each sample time; the cluster table has a row per pool."""
    return cluster.groupby("t")["gpus_in_use"].first()
