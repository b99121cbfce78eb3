"""One results type for both backends: per call, per job, time series, and what went wrong.

The simulator and the real executor return the same ``Results`` with the same columns; tables a backend
has nothing for (a simulated replica never dies, a real server's per-token times are not simulated) are
empty with their columns, so a figure or a metric reads either backend's results alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

# One row per replica per sample (simulator: every sample_interval_s; real: every /metrics scrape).
TIMESERIES_COLUMNS = ["t", "replica_id", "pool", "state", "num_running", "num_waiting", "kv_usage"]
# One row per pool per sample; gpus_in_use counts the whole cluster's GPUs held (a CPU core counts as one).
CLUSTER_COLUMNS = ["t", "pool", "pending", "starting", "ready", "draining", "gpus_in_use"]
# Kinds: replica_died, start_failed, call_failed, call_retried, call_rejected; and unsupported, a notice (once per
# mechanism) that a system asked the backend for something it cannot do (real vLLM cannot pin KV blocks).
FAILURE_COLUMNS = ["t", "kind", "replica_id", "request_id", "detail"]
# Real runs: one row per server (pid -1 when attached).
SERVER_COLUMNS = ["replica_id", "pool", "url", "pid", "placement", "start_s", "ready_s", "stop_s", "state"]
# Real runs: per replica and phase (real.metrics.LATENCY_HISTOGRAMS), the seconds and calls the server itself
# measured during the run (its last scrape minus its first).
ENGINE_COLUMNS = ["replica_id", "phase", "sum_s", "count"]
TOKEN_TIME_COLUMNS = ["request_id", "t"]
# One row per prefetch (a one-token call of a prefix, not a call of the workload): sent at t, done at finish_s
# (NaN: it failed), with the prompt tokens the engine already had (cached_tokens).
PREFETCH_COLUMNS = ["t", "replica_id", "num_tokens", "cached_tokens", "finish_s"]
# Simulator: one row per replica, its KV pins (Engine.pin): how many were made and how each ended (used by the
# program's next call, expired, yielded to memory pressure), pinned blocks x seconds, and the prompt tokens of the
# programs' next calls that hit blocks a pin held (hits the pins may have bought: without them those blocks were
# free, and perhaps still cached).
RETENTION_COLUMNS = ["replica_id", "pins", "pins_used", "pins_expired", "pins_yielded", "pinned_block_s",
                     "pinned_hit_tokens"]


def _empty(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame(columns=columns)


@dataclass
class Results:
    """Everything one run produced. Times are seconds since the run's t=0 (simulated, or wall clock)."""

    requests: pd.DataFrame  # frontend.ledger.RESULT_COLUMNS, one row per call, by request id
    jobs: pd.DataFrame  # job_table(requests)
    timeseries: pd.DataFrame  # TIMESERIES_COLUMNS
    cluster: pd.DataFrame  # CLUSTER_COLUMNS
    config: object  # what ran: a sim.cluster.ClusterConfig, or {pool: real.RealConfig}
    failures: pd.DataFrame = field(default_factory=lambda: _empty(FAILURE_COLUMNS))
    servers: pd.DataFrame = field(default_factory=lambda: _empty(SERVER_COLUMNS))
    engine: pd.DataFrame = field(default_factory=lambda: _empty(ENGINE_COLUMNS))
    token_times: pd.DataFrame = field(default_factory=lambda: _empty(TOKEN_TIME_COLUMNS))
    prefetches: pd.DataFrame = field(default_factory=lambda: _empty(PREFETCH_COLUMNS))
    retention: pd.DataFrame = field(default_factory=lambda: _empty(RETENTION_COLUMNS))

    def summary(self) -> str:
        """Calls ok and failed, replica failures, and the router's decision time per call."""
        r = self.requests
        ms = r.loc[r["replica_id"] >= 0, "route_overhead_s"].to_numpy() * 1e3
        kinds = self.failures["kind"].value_counts().to_dict()
        lines = [f"{int((r['status'] == 'ok').sum())} calls ok, {int((r['status'] == 'failed').sum())} failed, "
                 f"{int((r['status'] == 'rejected').sum())} rejected, "
                 f"{kinds.get('call_retried', 0)} retried; {kinds.get('replica_died', 0)} replica(s) died, "
                 f"{kinds.get('start_failed', 0)} failed to start"]
        if len(ms):
            lines.append(f"route() overhead per call: p50 {np.median(ms):.3f} ms, p99 {np.percentile(ms, 99):.3f} ms, "
                         f"max {ms.max():.3f} ms")
        return "\n".join(lines)


def job_table(requests: pd.DataFrame) -> pd.DataFrame:
    """Per-job completion time: from the release of a job's first call to the finish of its last."""
    jobs = requests[requests["job_id"] >= 0]
    g = jobs.groupby("job_id", sort=True)
    out = pd.DataFrame({
        "start_s": g["release_s"].min(),
        "end_s": g["finish_s"].max(),
        "num_calls": g.size(),
        "failed": g["status"].agg(lambda s: int((s != "ok").sum())),
    })
    out["jct_s"] = out["end_s"] - out["start_s"]
    return out.reset_index()

