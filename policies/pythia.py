"""Pythia as the paper describes it: one profiler (``policies.profiler``) whose predictions drive every mechanism.

One ``Pythia`` object plays every role of the system (predictor, router, scaler, prioritizer, retention,
prefetcher), so all of them read the same learned model of the workflow; ``policies.systems`` registers it and
``MECHANISMS`` names what can be switched off for the ablation (``without=("priority",)``):

- ``placement``: sglang-router's cache_aware rule (``policies.routers.CacheAware``, its defaults): a call goes to
  the replica that caches the most of its prompt (its job's conversation, its role's static prefix) if that
  covers ``cache_threshold`` of it, else to the replica holding the fewest routed tokens, and to the least loaded
  one when the pool is out of balance. Placing new jobs by the profiler's predicted remaining work instead lost
  to it once KV memory was short (the README's ablation): that prediction is the profiler's weakest;
- ``priority``: vLLM priority scheduling, the calls of jobs with the least predicted remaining work first
  (log2 buckets of the tokens the profiler expects the job to still run after this call), with aging: a job
  gains one level per ``aging_s`` since its first call, so long jobs are not starved. The aging must be fast
  (about one tool call per level): the remaining-work prediction is the profiler's weakest, a call's delay lies
  on its job's critical path once per remaining call, and a held-back job loses its cached conversation, so
  slow aging (5 minutes a level) made mean JCT worse under KV pressure, not better (the README's what-if);
- ``retention``: after a call whose role is likely followed (probability >= ``follow_probability``), pin its
  KV blocks for the ``retain_quantile`` of that role's learned tool time (at most ``max_retain_s``), so the
  continuation finds its context; but only where LRU eviction would lose it first (the tool time exceeds the
  replica's cache turnover) and within a budget of the replica's memory: every pinned block is memory the
  running calls and the other jobs' cached conversations cannot use;
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
from collections import deque
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
from policies.routers import CacheAware, RoutedPrefixes
from policies.scalers import PythiaScaler

MECHANISMS = ("placement", "priority", "retention", "prefetch", "admission", "quotas", "scaling")


@dataclass
class Pythia:
    """Profiler + mechanisms as one policy object (see the module)."""

    without: tuple[str, ...] = ()
    quantile: float = 0.9  # the profiler's output bound
    aging_s: float = 30.0
    follow_probability: float = 0.5
    retain_quantile: float = 0.9
    max_retain_s: float = 120.0
    quota_headroom: float = 2.0
    min_quota: float = 0.3
    retain_budget: float = 0.2
    turnover_window_s: float = 60.0
    cache_threshold: float = 0.3  # placement: sglang-router's cache_aware defaults
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    # PythiaScaler's keyword arguments. Scaling down drops the conversations cached on the drained replicas, so
    # Pythia scales down only to 30 % utilization, after 5 minutes low.
    scaler: dict = field(default_factory=lambda: {"target_utilization": 0.3, "scale_down_window_s": 300.0})
    min_replicas: int = 1  # the scaler's (as every scaler takes it)
    profiler: Profiler = field(init=False)
    _placement: CacheAware = field(init=False, repr=False)
    _capacity: dict[int, int] = field(default_factory=dict, init=False, repr=False)  # replica -> KV tokens
    _pins: dict[int, dict[str, tuple[int, float]]] = field(default_factory=dict, init=False, repr=False)
    _pinned_on: dict[str, int] = field(default_factory=dict, init=False, repr=False)  # job -> replica it pins
    _written: dict[int, deque] = field(default_factory=dict, init=False, repr=False)  # replica -> (end, new tokens)
    _scaler: PythiaScaler = field(init=False, repr=False)
    _prefixes: RoutedPrefixes = field(default_factory=RoutedPrefixes, init=False, repr=False)
    _inflight: dict[int, RequestInfo] = field(default_factory=dict, init=False, repr=False)
    _job_start: dict[str, float] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        unknown = [m for m in self.without if m not in MECHANISMS]
        if unknown:
            raise ValueError(f"Pythia(without={self.without}): unknown mechanism(s) {unknown}; known: "
                             f"{', '.join(MECHANISMS)}")
        for name in ("follow_probability", "retain_quantile", "min_quota", "cache_threshold", "retain_budget"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"Pythia.{name} must be in (0, 1], got {getattr(self, name)}")
        for name in ("aging_s", "max_retain_s", "quota_headroom", "turnover_window_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Pythia.{name} must be > 0, got {getattr(self, name)}")
        self.profiler = Profiler(quantile=self.quantile)
        self._placement = CacheAware(self.cache_threshold, self.balance_abs_threshold, self.balance_rel_threshold)
        self._scaler = PythiaScaler(**{"min_replicas": self.min_replicas, **self.scaler})

    # --- predictor -------------------------------------------------------------------------------------------
    def annotate(self, request: RequestInfo, now: float) -> RequestInfo:
        request = self.profiler.annotate(request, now)
        self._inflight[request.request_id] = request
        pinned = self._pinned_on.pop(program_of(request), None)
        if pinned is not None:
            self._pins[pinned].pop(program_of(request), None)
        self._job_start.setdefault(program_of(request), now)
        return request

    def observe(self, done: CallDone) -> None:
        self.profiler.observe(done)
        if done.replica_id >= 0 and done.status == "ok":
            written = self._written.setdefault(done.replica_id, deque())
            written.append((done.finish_s, done.request.input_tokens - done.cached_tokens + done.output_tokens))
            while written[0][0] < done.finish_s - self.turnover_window_s:
                written.popleft()
        self._inflight.pop(done.request.request_id, None)
        if done.program_done:
            key = program_of(done.request)
            self._job_start.pop(key, None)

    # --- placement ---------------------------------------------------------------------------------------------
    def route(self, request: RequestInfo, replicas: Sequence[ReplicaView], now: float) -> int:
        chosen = self._placement.route(request, replicas, now)
        self._capacity[chosen] = next(r.kv_capacity_tokens for r in replicas if r.replica_id == chosen)
        return chosen

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
        """Pin for the role's predicted tool time, but only a conversation LRU would lose before it returns: one
        whose predicted tool time exceeds its replica's cache turnover (KV capacity / new tokens written per
        second, from the calls that ended there in the last ``turnover_window_s``); and only while this object's
        own pins on the replica stay within ``retain_budget`` of its KV capacity."""
        role = self.profiler.role_of(done.request)
        if done.program_done or role not in {n.role for n in self._followers(done.request)}:
            return 0.0  # only the role's own next turn reads this conversation; another role has its own prompt
        t = self.profiler.tool_time(done.request.workflow, role, self.retain_quantile)
        capacity = self._capacity.get(done.replica_id, 0)
        written = self._written.get(done.replica_id)
        rate = sum(n for _, n in written) / self.turnover_window_s if written else 0.0
        if math.isnan(t) or rate <= 0.0 or t < capacity / rate:
            return 0.0
        pins = self._pins.setdefault(done.replica_id, {})
        for job in [j for j, (_, until) in pins.items() if until <= now]:
            del pins[job]
        tokens = done.request.input_tokens + done.output_tokens
        if sum(n for n, _ in pins.values()) + tokens > self.retain_budget * capacity:
            return 0.0
        ttl = min(t, self.max_retain_s)
        job = program_of(done.request)
        pins[job] = (tokens, now + ttl)
        self._pinned_on[job] = done.replica_id
        return ttl

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
