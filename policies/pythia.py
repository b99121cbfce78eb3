"""Pythia as the paper describes it: one profiler (``policies.profiler``) whose predictions drive every mechanism.

One ``Pythia`` object plays every role of the system (predictor, router, scaler, prioritizer, retention,
prefetcher), so all of them read the same learned model of the workflow; ``policies.systems`` registers it and
``MECHANISMS`` names what can be switched off for the ablation (``without=("priority",)``):

- ``placement``: cache-aware placement by predicted work: a call goes to the replica that caches the most of its
  prompt (its job's conversation, its role's static prefix) if that covers ``cache_threshold`` of it and the
  replica is not saturated (``max_waiting`` calls waiting, or KV use above ``kv_high``); else to
  the replica with the least predicted work: the tokens the jobs placed there are still expected to run (the
  profiler's remaining work after each job's latest call), plus the prompt tokens it would have to prefill;
- ``priority``: vLLM priority scheduling, the calls of jobs with the least predicted remaining work first
  (log2 buckets of the tokens the profiler expects the job to still run after this call), with aging: a job
  gains one level per ``aging_s`` since its first call, so long jobs are not starved;
- ``retention``: after a call whose role is likely followed (probability >= ``follow_probability``), pin its
  KV blocks for the ``retain_quantile`` of that role's learned tool time (at most ``max_retain_s``), so the
  continuation finds its context, but only while its replica's KV use (as last seen) is below ``retain_below``:
  pins on a full replica make running calls wait and push the router to spread jobs, losing their caches;
- ``prefetch``: when a call ends, warm its replica with the static prefix of each role predicted to follow it
  (probability >= ``follow_probability``) that the replica does not hold yet, by the front end's records;
- ``admission``: the engine admits a waiting call only when its prompt + predicted output fit (the profiler's
  bound is the hint the engine reads; ``EngineArgs.admission_policy="predicted"``);
- ``quotas``: per-agent KV quotas per pool, ``quota_headroom`` x each agent's share of the predicted KV need of
  the calls in flight (prompt + output bound), at least ``min_quota``;
- ``scaling``: ``policies.scalers.PythiaScaler`` with the profiler's look-ahead: for every call in flight,
  P(role b follows) x b's fan-out calls of b's mean tokens, so replicas start before a predicted fan-out.

A system without a mechanism leaves its role out (``policies.systems``): the object is the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from policies.api import (
    CallDone,
    ClusterObservation,
    Prefetch,
    ReplicaView,
    RequestInfo,
    ScaleAction,
    program_of,
)
from policies.profiler import Profiler
from policies.routers import RoutedPrefixes
from policies.scalers import PythiaScaler

MECHANISMS = ("placement", "priority", "retention", "prefetch", "admission", "quotas", "scaling")


@dataclass
class Pythia:
    """Profiler + mechanisms as one policy object (see the module)."""

    without: tuple[str, ...] = ()
    quantile: float = 0.9  # the profiler's output bound
    aging_s: float = 300.0
    follow_probability: float = 0.5
    retain_quantile: float = 0.9
    max_retain_s: float = 120.0
    quota_headroom: float = 2.0
    min_quota: float = 0.3
    retain_below: float = 0.5
    cache_threshold: float = 0.3
    kv_high: float = 0.9
    max_waiting: int = 8
    # PythiaScaler's keyword arguments. Scaling down drops the conversations cached on the drained replicas, so
    # Pythia scales down only to 30 % utilization, after 5 minutes low (notes/pythia-readme.md).
    scaler: dict = field(default_factory=lambda: {"target_utilization": 0.3, "scale_down_window_s": 300.0})
    min_replicas: int = 1  # the scaler's (as every scaler takes it)
    profiler: Profiler = field(init=False)
    _routed: RoutedPrefixes = field(default_factory=RoutedPrefixes, init=False, repr=False)
    _home: dict[str, tuple[int, float]] = field(default_factory=dict, init=False, repr=False)  # job -> replica, work
    _work: dict[int, float] = field(default_factory=dict, init=False, repr=False)  # replica -> predicted work
    _kv_usage: dict[int, float] = field(default_factory=dict, init=False, repr=False)  # replica -> as last seen
    _scaler: PythiaScaler = field(init=False, repr=False)
    _prefixes: RoutedPrefixes = field(default_factory=RoutedPrefixes, init=False, repr=False)
    _inflight: dict[int, RequestInfo] = field(default_factory=dict, init=False, repr=False)
    _job_start: dict[str, float] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        unknown = [m for m in self.without if m not in MECHANISMS]
        if unknown:
            raise ValueError(f"Pythia(without={self.without}): unknown mechanism(s) {unknown}; known: "
                             f"{', '.join(MECHANISMS)}")
        if self.max_waiting < 1:
            raise ValueError(f"Pythia.max_waiting must be >= 1, got {self.max_waiting}")
        for name in ("follow_probability", "retain_quantile", "min_quota", "cache_threshold", "kv_high",
                     "retain_below"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"Pythia.{name} must be in (0, 1], got {getattr(self, name)}")
        for name in ("aging_s", "max_retain_s", "quota_headroom"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Pythia.{name} must be > 0, got {getattr(self, name)}")
        self.profiler = Profiler(quantile=self.quantile)
        self._scaler = PythiaScaler(**{"min_replicas": self.min_replicas, **self.scaler})

    # --- predictor -------------------------------------------------------------------------------------------
    def annotate(self, request: RequestInfo, now: float) -> RequestInfo:
        request = self.profiler.annotate(request, now)
        self._inflight[request.request_id] = request
        self._job_start.setdefault(program_of(request), now)
        return request

    def observe(self, done: CallDone) -> None:
        self.profiler.observe(done)
        self._inflight.pop(done.request.request_id, None)
        if done.program_done:
            key = program_of(done.request)
            self._job_start.pop(key, None)
            home = self._home.pop(key, None)
            if home is not None:
                self._work[home[0]] -= home[1]

    # --- placement ---------------------------------------------------------------------------------------------
    def route(self, request: RequestInfo, replicas: Sequence[ReplicaView], now: float) -> int:
        matched = self._routed.matched_tokens(request, replicas)
        best = max(replicas, key=lambda r: (matched[r.replica_id], -self._work.get(r.replica_id, 0.0), -r.replica_id))
        saturated = best.num_waiting >= self.max_waiting or best.kv_usage > self.kv_high
        if matched[best.replica_id] >= self.cache_threshold * request.input_tokens and not saturated:
            chosen = best
        else:
            chosen = min(replicas, key=lambda r: (self._work.get(r.replica_id, 0.0) + request.input_tokens
                                                  - matched[r.replica_id], r.replica_id))
        self._routed.record(request, chosen)
        self._place(request, chosen.replica_id)
        self._kv_usage[chosen.replica_id] = chosen.kv_usage
        return chosen.replica_id

    def _place(self, request: RequestInfo, replica_id: int) -> None:
        """Move the request's job (its predicted remaining work) to ``replica_id``'s account."""
        key = program_of(request)
        old = self._home.pop(key, None)
        if old is not None:
            self._work[old[0]] -= old[1]
        _, tokens = self.profiler.remaining(request.workflow, self.profiler.role_of(request),
                                            self.profiler.position(request))
        work = request.input_tokens + max(request.expected_output_tokens, 0) + (0.0 if math.isnan(tokens) else tokens)
        self._home[key] = (replica_id, work)
        self._work[replica_id] = self._work.get(replica_id, 0.0) + work

    # --- priority ----------------------------------------------------------------------------------------------
    def priority(self, request: RequestInfo, now: float) -> int:
        """log2 of the job's predicted remaining tokens, minus one level per ``aging_s`` of the job's age."""
        role = self.profiler.role_of(request)
        _, tokens = self.profiler.remaining(request.workflow, role, self.profiler.position(request))
        level = 0 if math.isnan(tokens) else int(tokens).bit_length()
        age = now - self._job_start.get(program_of(request), now)
        return level - int(age // self.aging_s)

    # --- retention ---------------------------------------------------------------------------------------------
    def _followers(self, request: RequestInfo):
        role = self.profiler.role_of(request)
        nxt = self.profiler.next_roles(request.workflow, role, self.profiler.position(request))
        return [n for n in nxt if n.probability >= self.follow_probability]

    def retain_s(self, done: CallDone, now: float) -> float:
        if done.program_done or self._kv_usage.get(done.replica_id, 0.0) >= self.retain_below or \
                not self._followers(done.request):
            return 0.0
        t = self.profiler.tool_time(done.request.workflow, self.profiler.role_of(done.request), self.retain_quantile)
        return 0.0 if math.isnan(t) else min(t, self.max_retain_s)

    # --- prefetch ----------------------------------------------------------------------------------------------
    def prefetch(self, done: CallDone, replicas: Sequence[ReplicaView], now: float) -> list[Prefetch]:
        here = next((r for r in replicas if r.replica_id == done.replica_id), None)
        if here is None:
            return []
        self._prefixes.matched_tokens(done.request, replicas)  # forget replicas that left
        self._prefixes.record(done.request, here)
        out = []
        for n in self._followers(done.request) if not done.program_done else []:
            blocks, size = self.profiler.static_prefix(done.request.workflow, n.role)
            if not blocks:
                continue
            prefix = RequestInfo(-1, now, len(blocks) * size, blocks, size, pool=done.request.pool)
            if self._prefixes.matched_tokens(prefix, replicas)[here.replica_id] < prefix.input_tokens:
                self._prefixes.record(prefix, here)
                out.append(Prefetch(here.replica_id, blocks, size, prefix.input_tokens))
        return out

    # --- scaling and quotas ------------------------------------------------------------------------------------
    def decide(self, obs: ClusterObservation) -> ScaleAction:
        next_calls: dict[str, dict[str, float]] = {name: {} for name in obs.pools}
        tokens: dict[str, float] = {}
        need: dict[str, dict[str, float]] = {name: {} for name in obs.pools}
        for req in self._inflight.values():
            if req.pool not in obs.pools:
                continue
            role = self.profiler.role_of(req)
            n = need[req.pool]
            n[req.agent] = n.get(req.agent, 0.0) + req.input_tokens + max(req.expected_output_tokens, 0)
            for nxt in self.profiler.next_roles(req.workflow, role, self.profiler.position(req)):
                calls = next_calls[req.pool]
                calls[nxt.role] = calls.get(nxt.role, 0.0) + nxt.probability * nxt.fan_out
                t = self.profiler.mean_call_tokens(req.workflow, nxt.role)
                if not math.isnan(t):
                    tokens[nxt.role] = t
        target = {}
        if "scaling" not in self.without:
            target = self._scaler.decide_ahead(obs, next_calls, tokens).target_replicas
        quotas = {} if "quotas" in self.without else {pool: q for pool, n in need.items() if (q := self._quotas(n))}
        return ScaleAction(target, quotas)

    def _quotas(self, need: dict[str, float]) -> dict[str, float]:
        total = sum(need.values())
        if len([a for a in need if a]) < 2 or total <= 0:
            return {}
        return {a: min(1.0, max(self.min_quota, self.quota_headroom * v / total))
                for a, v in sorted(need.items()) if a}
