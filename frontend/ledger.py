"""The front end's own records of the calls it released: the ledger behind the observations and results.

A real deployment's router/controller knows three things: the calls it released and where it sent
them, when their tokens came back, and each replica's /metrics. ``Ledger`` keeps the first two and
turns them, with a metrics scrape, into the policy observations and into the per-call results table.
Both backends record through the same ``Ledger`` (inside ``frontend.FrontEnd``), so policies see the same
inputs, and results have one schema, whichever backend ran.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import numpy as np
import pandas as pd

from policies.api import ClusterObservation, PoolObservation, ReplicaState, ReplicaView, RequestInfo


class ReplicaMetrics(NamedTuple):
    """One scrape of a replica's vLLM /metrics (simulated or real); a named tuple because the simulator scrapes
    every replica every second."""

    num_running: int
    num_waiting: int
    kv_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    kv_capacity_tokens: int


@dataclass(slots=True)
class CallRecord:
    """One row of the per-request results table."""

    request_id: int
    job_id: int
    session_id: str
    workflow: str
    agent: str
    pool: str
    input_tokens: int
    output_tokens: int
    slo_s: float
    release_s: float  # released at the front end (arrival, or parents finished + think time)
    routed_s: float = math.nan  # handed to a replica (later than release_s when the pool had no ready replica)
    replica_id: int = -1
    scheduled_s: float = math.nan  # first scheduled by the engine (simulator only; NaN on real vLLM)
    first_token_s: float = math.nan
    finish_s: float = math.nan
    cached_tokens: int = 0  # prompt tokens served from the prefix cache, as the engine reports it
    num_preemptions: int = 0
    status: str = "pending"  # pending -> routed -> ok | failed; or pending -> rejected
    route_overhead_s: float = 0.0  # wall time spent in the policy's route() (real cost of the interface)


RESULT_COLUMNS = [f.name for f in fields(CallRecord)]


@dataclass
class _Interval:
    """What happened in one pool during the current control interval."""

    arrivals: int = 0
    arrival_tokens: int = 0
    completions: int = 0
    slo_violations: int = 0
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)


class Ledger:
    """Ledger of calls and the observations policies get from it."""

    def __init__(self) -> None:
        self.calls: dict[int, CallRecord] = {}
        self._info: dict[int, RequestInfo] = {}
        self._outstanding_req: Counter[int] = Counter()
        self._outstanding_tok: Counter[int] = Counter()
        self._inflight_agent: dict[str, Counter[str]] = defaultdict(Counter)
        self._next_agent: dict[str, Counter[str]] = defaultdict(Counter)
        self._interval: dict[str, _Interval] = defaultdict(_Interval)

    # --- the call lifecycle -------------------------------------------------------------------
    def release(self, info: RequestInfo, output_tokens: int, now: float) -> None:
        self._info[info.request_id] = info
        self.calls[info.request_id] = CallRecord(
            info.request_id, info.job_id, info.session_id, info.workflow, info.agent, info.pool,
            info.input_tokens, output_tokens, info.slo_s, release_s=now)
        w = self._interval[info.pool]
        w.arrivals += 1
        w.arrival_tokens += info.input_tokens + max(info.expected_output_tokens, 0)

    def routed(self, request_id: int, replica_id: int, now: float, overhead_s: float = 0.0) -> None:
        rec, info = self.calls[request_id], self._info[request_id]
        rec.routed_s, rec.replica_id, rec.status, rec.route_overhead_s = now, replica_id, "routed", overhead_s
        self._outstanding_req[replica_id] += 1
        self._outstanding_tok[replica_id] += _load_tokens(info)
        self._inflight_agent[info.pool][info.agent] += 1
        for a in info.next_agents:
            self._next_agent[info.pool][a] += 1

    def unroute(self, request_id: int) -> None:
        """Take back a routing (its replica died): the call is pending again, to be routed anew.

        Unlike a failure followed by a new release, this counts no extra arrival or completion.
        """
        rec = self.calls[request_id]
        if rec.replica_id >= 0:
            self._forget_route(rec.replica_id, self._info[request_id])
        rec.replica_id, rec.routed_s, rec.status = -1, math.nan, "pending"
        rec.first_token_s = math.nan

    def _forget_route(self, replica_id: int, info: RequestInfo) -> None:
        self._outstanding_req[replica_id] -= 1
        self._outstanding_tok[replica_id] -= _load_tokens(info)
        self._inflight_agent[info.pool][info.agent] -= 1
        for a in info.next_agents:
            self._next_agent[info.pool][a] -= 1

    def first_token(self, request_id: int, now: float) -> None:
        self.calls[request_id].first_token_s = now

    def finished(self, request_id: int, now: float, *, cached_tokens: int = 0, num_preemptions: int = 0,
                 scheduled_s: float = math.nan, status: str = "ok") -> None:
        """The call ended: "ok" (served), "failed" (lost on the way) or "rejected" (refused, as vLLM refuses it)."""
        rec, info = self.calls[request_id], self._info.pop(request_id)
        rec.finish_s, rec.cached_tokens, rec.num_preemptions = now, cached_tokens, num_preemptions
        rec.scheduled_s = scheduled_s
        rec.status = status
        failed = status != "ok"
        if math.isnan(rec.first_token_s) and not failed:
            rec.first_token_s = now
        if rec.replica_id >= 0:
            self._forget_route(rec.replica_id, info)
        w = self._interval[info.pool]
        w.completions += 1
        if not failed:
            lat = now - rec.release_s
            w.latencies.append(lat)
            w.ttfts.append(rec.first_token_s - rec.release_s)
            if lat > info.slo_s:  # NaN SLO compares False: no violation
                w.slo_violations += 1

    # --- what policies see ---------------------------------------------------------------------
    def replica_view(self, replica_id: int, pool: str, state: ReplicaState, m: ReplicaMetrics) -> ReplicaView:
        return ReplicaView(replica_id, pool, state, m.num_running, m.num_waiting, m.kv_usage,
                           m.prefix_cache_queries, m.prefix_cache_hits, m.num_preemptions,
                           m.kv_capacity_tokens, self._outstanding_req[replica_id],
                           self._outstanding_tok[replica_id])

    def outstanding(self, replica_id: int) -> tuple[int, int]:
        """Calls routed to ``replica_id`` and not finished, and their prompt + expected output tokens."""
        return self._outstanding_req[replica_id], self._outstanding_tok[replica_id]

    def snapshot(self, now: float, interval_s: float, replicas: list[ReplicaView], pending: dict[str, int],
                 gpus_per_replica: dict[str, int], total_gpus: int, free_gpus: int) -> ClusterObservation:
        """The controller's observation of the interval so far (reading it changes nothing)."""
        pools: dict[str, PoolObservation] = {}
        for pool in sorted(set(gpus_per_replica) | {r.pool for r in replicas}):
            w = self._interval.get(pool) or _Interval()
            pools[pool] = PoolObservation(
                pool=pool,
                replicas=tuple(r for r in replicas if r.pool == pool),
                gpus_per_replica=gpus_per_replica.get(pool, 1),
                pending=pending.get(pool, 0),
                arrivals=w.arrivals, arrival_tokens=w.arrival_tokens, completions=w.completions,
                p99_latency_s=_p99(w.latencies), p99_ttft_s=_p99(w.ttfts), slo_violations=w.slo_violations,
                inflight_by_agent={a: n for a, n in sorted(self._inflight_agent[pool].items()) if n > 0},
                expected_next_by_agent={a: n for a, n in sorted(self._next_agent[pool].items()) if n > 0},
            )
        return ClusterObservation(now, interval_s, total_gpus, free_gpus, pools)

    def close_interval(self) -> None:
        """Start a new control interval: arrivals, completions and latencies are counted afresh."""
        self._interval.clear()

    # --- results ------------------------------------------------------------------------------
    def results(self) -> pd.DataFrame:
        """Per-request results, ordered by request id (one schema for both backends)."""
        calls = [self.calls[k] for k in sorted(self.calls)]
        return pd.DataFrame({name: [getattr(c, name) for c in calls] for name in RESULT_COLUMNS},
                            columns=RESULT_COLUMNS)


def _load_tokens(info: RequestInfo) -> int:
    return info.input_tokens + max(info.expected_output_tokens, 0)


def _p99(values: list[float]) -> float:
    return float(np.percentile(values, 99)) if values else math.nan
