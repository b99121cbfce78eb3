"""Scalers: how many serving replicas each pool should have, decided every control interval.

A scaler sees one ``ClusterObservation`` per control interval and keeps whatever per-pool history it
needs between calls. Its targets count active replicas (starting + ready, as the front end counts them);
every scaler asks for at least ``min_replicas`` and at most what the free GPUs allow (``fit_to_gpus``).
Registered by name in ``policies.registry.SCALERS``; constructor keyword arguments are the configuration.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field

from policies.api import ClusterObservation, PoolObservation, ReplicaView, ScaleAction

log = logging.getLogger(__name__)


def fit_to_gpus(obs: ClusterObservation, wants: dict[str, int], min_replicas: int) -> dict[str, int]:
    """Raise each pool's target to ``min_replicas`` and cap scale-ups by the free GPUs.

    Pools claim free GPUs in name order. Draining replicas still hold their GPUs, so a pool can grow only
    into ``free_gpus``; ``min_replicas`` yields to the GPUs when both cannot hold.
    """
    free = obs.free_gpus
    out: dict[str, int] = {}
    for name in sorted(wants):
        pool = obs.pools[name]
        active, gpr = pool.num_active, pool.gpus_per_replica
        want = max(wants[name], min_replicas)
        if want > active:
            extra = min(want - active, free // gpr)
            if extra < want - active:
                log.debug("t=%.1f pool %s: wants %d replicas, the free GPUs allow %d", obs.now, name, want,
                          active + extra)
            want = active + extra
            free -= extra * gpr
        out[name] = want
    return out


def _ceil(x: float) -> int:
    """Ceiling that ignores float noise: 3.6 / 0.6 is 6, not 7 (Kubernetes works in milli-units)."""
    return math.ceil(round(x, 9))


def _check_min_replicas(min_replicas: int) -> None:
    if min_replicas < 0:
        raise ValueError(f"min_replicas must be >= 0, got {min_replicas}")


def _ready(pool: PoolObservation) -> list[ReplicaView]:
    return [r for r in pool.replicas if r.state == "ready"]


@dataclass
class Static:
    """Keep ``replicas`` replicas per pool (None: keep each pool's current count)."""

    replicas: int | None = None
    min_replicas: int = 1

    def __post_init__(self) -> None:
        _check_min_replicas(self.min_replicas)

    def decide(self, obs: ClusterObservation) -> ScaleAction:
        wants = {name: pool.num_active if self.replicas is None else self.replicas
                 for name, pool in obs.pools.items()}
        return ScaleAction(fit_to_gpus(obs, wants, self.min_replicas))


@dataclass
class HPA:
    """Kubernetes' Horizontal Pod Autoscaler (v2 algorithm and default behavior) on a utilization metric.

    Every ``sync_period_s``: utilization ``metric`` averaged over the ready replicas; if it is within
    ``tolerance`` of ``target`` nothing changes, else the recommendation is ceil(sum / target) (ceil of
    current ready x metric / target), with starting replicas counted at zero utilization before scaling
    up (as Kubernetes does for unready pods) and at most max(2x, +4) replicas per sync (the default
    scale-up policy). Scale-up applies at once; scale-down uses the highest recommendation of the last
    ``scale_down_window_s`` (the stabilization window).

    Metrics: ``kv_usage`` (vllm:kv_cache_usage_perc, the default: what limits how many calls a vLLM
    replica can run) or ``busy`` (num_running / ``max_num_seqs``, the batch slots in use).
    """

    target: float = 0.6
    metric: str = "kv_usage"
    max_num_seqs: int = 256
    tolerance: float = 0.1
    sync_period_s: float = 15.0
    scale_down_window_s: float = 300.0
    min_replicas: int = 1
    _last_sync: float = field(default=-math.inf, init=False, repr=False)
    _recommendations: dict[str, deque[tuple[float, int]]] = field(default_factory=dict, init=False,
                                                                  repr=False)

    METRICS = ("kv_usage", "busy")

    def __post_init__(self) -> None:
        if self.metric not in self.METRICS:
            raise ValueError(f"unknown HPA metric '{self.metric}'; known: {', '.join(self.METRICS)}")
        if self.target <= 0:
            raise ValueError(f"target must be > 0, got {self.target}")
        _check_min_replicas(self.min_replicas)

    def _utilization(self, r: ReplicaView) -> float:
        return r.kv_usage if self.metric == "kv_usage" else r.num_running / self.max_num_seqs

    def decide(self, obs: ClusterObservation) -> ScaleAction:
        if obs.now - self._last_sync < self.sync_period_s:
            return ScaleAction({})
        self._last_sync = obs.now
        wants = {name: self._desired(obs.now, pool) for name, pool in obs.pools.items()}
        return ScaleAction(fit_to_gpus(obs, wants, self.min_replicas))

    def _desired(self, now: float, pool: PoolObservation) -> int:
        current, ready = pool.num_active, _ready(pool)
        if not ready:  # no metrics yet: Kubernetes leaves the scale alone
            return current
        total = sum(self._utilization(r) for r in ready)
        ratio = total / len(ready) / self.target
        rec = current
        if abs(ratio - 1.0) > self.tolerance:
            rec = _ceil(total / self.target)
            diluted = total / (self.target * current) if current else ratio
            if ratio > 1.0 and diluted <= 1.0 + self.tolerance:  # starting replicas will absorb it
                rec = current
            rec = min(rec, max(2 * current, current + 4))
        recs = self._recommendations.setdefault(pool.pool, deque())
        recs.append((now, rec))
        while recs[0][0] < now - self.scale_down_window_s:
            recs.popleft()
        if rec > current:
            return rec
        return min(current, max(r for _, r in recs))


@dataclass
class KPA:
    """Knative's Pod Autoscaler on concurrency (calls in flight per replica).

    Concurrency is the calls routed and unfinished plus those the front end holds for want of a ready
    replica (Knative's activator buffer), sampled once per control interval. Desired replicas =
    ceil(mean concurrency over a window / ``target_concurrency``) with a ``stable_window_s`` and a
    ``panic_window_s`` window. Panic starts when the panic-window desired count reaches
    ``panic_threshold`` x the ready replicas and lasts until a stable window passes without that; in panic
    the count follows the larger of the two windows and never goes down. A step may shed at most
    1 - 1/``max_scale_down_rate`` of the ready replicas. Knative's default target is 100 x 70 %; an LLM
    replica saturates sooner, hence 32.
    """

    target_concurrency: float = 32.0
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0
    max_scale_down_rate: float = 2.0
    min_replicas: int = 1
    _samples: dict[str, deque[tuple[float, int]]] = field(default_factory=dict, init=False, repr=False)
    _panic_since: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _max_panic: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.target_concurrency <= 0:
            raise ValueError(f"target_concurrency must be > 0, got {self.target_concurrency}")
        if not 0 < self.panic_window_s <= self.stable_window_s:
            raise ValueError(f"need 0 < panic_window_s <= stable_window_s, got {self.panic_window_s} and "
                             f"{self.stable_window_s}")
        _check_min_replicas(self.min_replicas)

    def in_panic(self, pool: str) -> bool:
        return pool in self._panic_since

    def decide(self, obs: ClusterObservation) -> ScaleAction:
        wants = {name: self._desired(obs.now, pool) for name, pool in obs.pools.items()}
        return ScaleAction(fit_to_gpus(obs, wants, self.min_replicas))

    def _desired(self, now: float, pool: PoolObservation) -> int:
        name = pool.pool
        samples = self._samples.setdefault(name, deque())
        samples.append((now, pool.pending + sum(r.outstanding_requests for r in pool.replicas
                                                if r.state != "draining")))
        while samples[0][0] <= now - self.stable_window_s:
            samples.popleft()
        stable = sum(c for _, c in samples) / len(samples)
        recent = [c for t, c in samples if t > now - self.panic_window_s]
        panic = sum(recent) / len(recent)
        ready = max(pool.num_ready, 1)
        floor = math.floor(ready / self.max_scale_down_rate)
        want_stable = max(_ceil(stable / self.target_concurrency), floor)
        want_panic = _ceil(panic / self.target_concurrency)
        if want_panic / ready >= self.panic_threshold:
            self._panic_since[name] = now
        elif name in self._panic_since and now - self._panic_since[name] > self.stable_window_s:
            del self._panic_since[name]
            self._max_panic.pop(name, None)
        if name not in self._panic_since:
            return want_stable
        want = max(want_stable, want_panic, self._max_panic.get(name, 0))
        self._max_panic[name] = want
        return want

@dataclass
class PythiaScaler:
    """Pythia's controller: a token budget per pool with workflow look-ahead, up at once, down slowly.

    Per pool, the token rate the pool must sustain over the next interval:
        rate = arrival rate (tokens released per second, smoothed over intervals)
               + (backlog + look-ahead) / ``backlog_s``
        backlog    = calls waiting in the replicas' queues (their share of the outstanding tokens)
                     + calls pending for want of a ready replica x mean call size
        look-ahead = sum over agents of expected_next_by_agent[a] x tokens per call of a
    expected_next_by_agent counts the calls the workflow graph will release when in-flight calls finish,
    attributed to the pool where agent a was last seen in flight; tokens per call come from
    ``agent_tokens`` (workflow.yaml) or the pool's mean call size. Running calls are not counted: the
    arrival rate already pays for them. Replicas needed = ceil(rate / (tokens_per_s x
    ``target_utilization``)), where tokens_per_s, one replica's throughput, starts at
    ``replica_tokens_per_s`` and is re-measured whenever the pool is saturated (calls waiting):
    completions x mean call size / interval / ready replicas (smoothed).

    ``backlog_s`` is short (3 s): a replica takes about 45 s to start, so queued work is paid for at
    once rather than drained slowly by the replicas already there (measured: JCT closer to a static
    full cluster, GPU-seconds still below it).
    Scale-up to the need is immediate, so replicas start before the fan-out the look-ahead sees; scale
    down happens only after the need stayed below (1 - ``scale_down_hysteresis``) x active replicas for
    ``scale_down_window_s``, to the highest need of that window.
    """

    replica_tokens_per_s: float = 8000.0
    target_utilization: float = 0.8
    backlog_s: float = 3.0  # short: a queue waiting for a 45 s cold start costs job latency at once
    agent_tokens: dict[str, float] = field(default_factory=dict)
    scale_down_window_s: float = 60.0
    scale_down_hysteresis: float = 0.2
    min_replicas: int = 1
    _tokens_per_s: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _arrival_rate: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _call_tokens: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _agent_pool: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _low_needs: dict[str, list[int]] = field(default_factory=dict, init=False, repr=False)
    _low_since: dict[str, float] = field(default_factory=dict, init=False, repr=False)

    # Weight of the newest interval in the smoothed arrival rate, mean call size and throughput.
    SMOOTHING = 0.3

    def __post_init__(self) -> None:
        for name in ("replica_tokens_per_s", "target_utilization", "backlog_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.scale_down_hysteresis < 1:
            raise ValueError(f"scale_down_hysteresis must be in [0, 1), got {self.scale_down_hysteresis}")
        _check_min_replicas(self.min_replicas)

    def decide(self, obs: ClusterObservation) -> ScaleAction:
        for name, pool in sorted(obs.pools.items()):
            for agent in pool.inflight_by_agent:
                self._agent_pool[agent] = name
        next_calls: dict[str, dict[str, int]] = {name: {} for name in obs.pools}
        for name, pool in sorted(obs.pools.items()):
            for agent, n in pool.expected_next_by_agent.items():
                dest = self._agent_pool.get(agent, name)
                dest = dest if dest in next_calls else name
                next_calls[dest][agent] = next_calls[dest].get(agent, 0) + n
        return self.decide_ahead(obs, next_calls, self.agent_tokens)

    def decide_ahead(self, obs: ClusterObservation, next_calls: dict[str, dict[str, float]],
                     agent_tokens: dict[str, float]) -> ScaleAction:
        """``decide`` with the look-ahead given: per pool, the calls expected of each agent (a profiler's
        probability x fan-out) and each agent's tokens per call."""
        wants = {name: self._desired(obs, pool, next_calls.get(name, {}), agent_tokens)
                 for name, pool in obs.pools.items()}
        return ScaleAction(fit_to_gpus(obs, wants, self.min_replicas))

    def need(self, pool: str, tokens_per_s: float) -> int:
        """Replicas that sustain ``tokens_per_s`` at the target utilization."""
        capacity = self._tokens_per_s.get(pool, self.replica_tokens_per_s) * self.target_utilization
        return _ceil(tokens_per_s / capacity)

    def _desired(self, obs: ClusterObservation, pool: PoolObservation, next_calls: dict[str, float],
                 agent_tokens: dict[str, float]) -> int:
        name = pool.pool
        arrival_rate, mean_call = self._learn(obs, pool)
        queued = sum(r.outstanding_tokens * min(r.num_waiting / max(r.outstanding_requests, 1), 1.0)
                     for r in pool.replicas if r.state != "draining")
        look_ahead = sum(n * agent_tokens.get(a, mean_call) for a, n in sorted(next_calls.items()))
        backlog = queued + pool.pending * mean_call + look_ahead
        need = self.need(name, arrival_rate + backlog / self.backlog_s)
        current = pool.num_active
        if need >= current * (1.0 - self.scale_down_hysteresis):
            self._low_since.pop(name, None)
            self._low_needs.pop(name, None)
            return max(need, current)
        self._low_since.setdefault(name, obs.now)
        needs = self._low_needs.setdefault(name, [])
        needs.append(need)
        if obs.now - self._low_since[name] < self.scale_down_window_s:
            return current
        del self._low_since[name], self._low_needs[name]
        return max(needs)

    def _learn(self, obs: ClusterObservation, pool: PoolObservation) -> tuple[float, float]:
        """Smooth the arrival rate and mean call size; re-measure the throughput if the pool is saturated."""
        name, a = pool.pool, self.SMOOTHING
        rate = pool.arrival_tokens / obs.interval_s
        self._arrival_rate[name] = a * rate + (1 - a) * self._arrival_rate.get(name, rate)
        if pool.arrivals > 0:
            size = pool.arrival_tokens / pool.arrivals
            self._call_tokens[name] = a * size + (1 - a) * self._call_tokens.get(name, size)
        mean_call = self._call_tokens.get(name, 0.0)
        if pool.queue_depth > 0 and pool.num_ready > 0 and pool.completions > 0 and mean_call > 0:
            measured = pool.completions * mean_call / obs.interval_s / pool.num_ready
            old = self._tokens_per_s.get(name, self.replica_tokens_per_s)
            self._tokens_per_s[name] = a * measured + (1 - a) * old
        return self._arrival_rate[name], mean_call

