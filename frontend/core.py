"""The front end both backends drive: release, routing, pending calls, scaling, sampling, results.

A real deployment puts a router and a controller in front of its vLLM replicas. ``FrontEnd`` is that
layer, written once: it releases calls (roots at their arrival time, dependents after their parents plus
think time, ``frontend.graph``), routes each one with the ``Router``, holds calls while their pool has no
ready replica, runs the ``Scaler`` every control interval (starting and draining replicas, setting KV quotas),
samples every replica's metrics into the time series, and records everything in one ``Ledger`` and one
``Results``.

A system may add per-call policies (``policies.api.Hooks``): a predictor annotates each released call's hints; a
gate may hold released calls and let them go at a control interval; a prioritizer gives each routed call its vLLM
priority; when a call ends every policy that observes learns of it, then a retention policy may pin its blocks on
its replica for a while and a prefetcher may warm replicas with prefixes (one-token calls that are not the
workload's: ``Results.prefetches``). With no hooks the front end does exactly what it did without them.

A backend only says how time passes and how a call is served (``Backend``): the simulator runs SimPy
engines, the real executor streams HTTP calls to vLLM servers. Both call back into the front end when a
replica is ready, a call finished or failed.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import pandas as pd

from frontend.engine_args import check_quotas
from frontend.graph import CallGraph
from frontend.ledger import Ledger, ReplicaMetrics
from frontend.results import CLUSTER_COLUMNS, FAILURE_COLUMNS, TIMESERIES_COLUMNS, Results, job_table
from policies.api import (
    NO_HOOKS,
    CallDone,
    ClusterObservation,
    Hooks,
    Observer,
    Prefetch,
    RequestInfo,
    Router,
    ScaleAction,
    Scaler,
)

log = logging.getLogger(__name__)

LIVE = ("starting", "ready", "draining")  # states in which a replica holds its GPUs


class Replica:
    """The front end's record of one replica; ``handle`` is the backend's own (an engine, a server)."""

    __slots__ = ("replica_id", "pool", "_state", "handle", "_front")

    def __init__(self, replica_id: int, pool: str, state: str, handle: Any = None, front: FrontEnd | None = None):
        self.replica_id, self.pool, self._state, self.handle, self._front = replica_id, pool, state, handle, front

    @property
    def state(self) -> str:
        """starting | ready | draining | stopped | dead"""
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        self._state = value
        if self._front is not None:
            self._front._replicas_changed()

    def __repr__(self) -> str:
        return f"Replica({self.replica_id}, {self.pool!r}, {self._state!r})"


_METRICS = ("num_running", "num_waiting", "kv_usage", "prefix_cache_queries", "prefix_cache_hits", "num_preemptions",
            "kv_capacity_tokens", "outstanding_requests", "outstanding_tokens")


class _RoutingView:
    """A ready replica as ``Router.route`` sees it: ``policies.api.ReplicaView``'s fields, valid during one decision.

    The metric fields are read (a backend scrape and the ledger's counts) when a router first asks for one during
    the decision, not before: a router that needs only ids (round robin) then costs O(1) per call however many
    replicas the pool has, and one that reads them pays one scrape per replica, as it would for a ReplicaView.
    The front end keeps one per ready replica and forgets the values read after each decision."""

    __slots__ = ("replica_id", "pool", "state", "_rep", "_front") + _METRICS

    def __init__(self, rep: Replica, front: FrontEnd):
        self.replica_id, self.pool, self.state, self._rep, self._front = rep.replica_id, rep.pool, "ready", rep, front

    def __getattr__(self, name: str) -> Any:  # only called for a metric not read yet in this decision
        if name not in _METRICS:
            raise AttributeError(name)
        front = self._front
        (self.num_running, self.num_waiting, self.kv_usage, self.prefix_cache_queries, self.prefix_cache_hits,
         self.num_preemptions, self.kv_capacity_tokens) = front.backend.metrics(self._rep)
        self.outstanding_requests, self.outstanding_tokens = front.ledger.outstanding(self.replica_id)
        front._read_views.append(self)
        return getattr(self, name)

    def forget(self) -> None:
        for field in _METRICS:
            delattr(self, field)


class Backend(Protocol):
    """What differs between the simulator and real vLLM: how time passes and how a call is served."""

    def now(self) -> float: ...

    def after(self, delay_s: float, fn: Callable[[], None]) -> None:
        """Call ``fn`` ``delay_s`` seconds from now."""
        ...

    def start_replica(self, pool: str) -> Replica:
        """A replica of ``pool`` in state "starting" (``FrontEnd.add_replica``, or an idle one reused); the
        backend calls ``FrontEnd.replica_ready`` once it serves."""
        ...

    def startable(self, pool: str) -> int:
        """How many more replicas of ``pool`` could be started now (free GPUs, cores or idle servers)."""
        ...

    def gpus(self) -> tuple[int, int]:
        """(total, free) GPUs of the cluster, as the controller counts them (a CPU core counts as one)."""
        ...

    def send(self, replica: Replica, info: RequestInfo, output_tokens: int, priority: int = 0) -> None:
        """Hand a routed call to ``replica`` (with its vLLM ``priority``); the backend reports back with
        ``FrontEnd.call_finished`` (or ``call_failed``)."""
        ...

    def pin(self, replica: Replica, info: RequestInfo, ttl_s: float) -> None:
        """Keep the cached blocks of the ended call ``info``'s prompt on ``replica`` for ``ttl_s`` seconds."""
        ...

    def prefetch(self, replica: Replica, prefetch: Prefetch) -> None:
        """Send a one-token call of ``prefetch``'s prefix to ``replica`` (not a call of the workload)."""
        ...

    def set_quotas(self, pool: str, quotas: Mapping[str, float]) -> None:
        """Cap each agent's share of the KV blocks on every replica of ``pool`` (``ScaleAction.memory_quotas``)."""
        ...

    def metrics(self, replica: Replica) -> ReplicaMetrics: ...

    def num_unfinished(self, replica: Replica) -> int: ...

    def stop_replica(self, replica: Replica) -> None:
        """``replica`` left service (drained, or died): release what it holds."""
        ...


@dataclass(frozen=True)
class PoolSpec:
    """What the front end needs to know of a pool of identical replicas."""

    name: str
    gpus_per_replica: int
    max_model_len: int  # the replicas' context window: a longer prompt + output is refused, as vLLM's API does


class FrontEnd:
    """Router, controller and ledger in front of one backend's replicas (see the module docstring)."""

    def __init__(self, table: pd.DataFrame, pools: list[PoolSpec], router: Router, scaler: Scaler | None,
                 backend: Backend, *, agent_pools: Mapping[str, str] | None = None, control_interval_s: float,
                 time_policies: bool = False, externally_scaled: bool = False, source: str = "workload",
                 hooks: Hooks = NO_HOOKS):
        names = [p.name for p in pools]
        if len(set(names)) != len(names):
            raise ValueError(f"pools {names}: each pool needs its own name")
        agent_pools = dict(agent_pools or {})
        unknown = sorted({p for p in agent_pools.values() if p not in names})
        if unknown:
            raise ValueError(f"agent_pools names pool(s) {unknown} that are not among the pools {names}")
        self.pools = {p.name: p for p in pools}
        self.graph = CallGraph(table, agent_pools, names[0], source)
        self.router, self.scaler, self.backend, self.hooks = router, scaler, backend, hooks
        self._observers: list[Observer] = []  # each policy object once, in the order of Observer's docstring
        for p in (hooks.predictor, router, scaler, hooks.gate, hooks.prioritizer, hooks.retention, hooks.prefetcher):
            if isinstance(p, Observer) and not any(p is q for q in self._observers):
                self._observers.append(p)
        self._learns = bool(self._observers) or hooks.retention is not None or hooks.prefetcher is not None
        self.control_interval_s = control_interval_s
        self.time_policies = time_policies  # measure route() in wall time (real runs; never in the simulator)
        self.externally_scaled = externally_scaled  # a controller outside (the RL environment) calls apply()
        self.ledger = Ledger()
        self.replicas: dict[int, Replica] = {}
        self.pending: dict[str, deque[int]] = {name: deque() for name in names}
        self.held: dict[str, dict[int, None]] = {name: {} for name in names}  # calls the gate holds, in order
        self._ready: dict[str, tuple[Replica, ...]] = {}  # pool -> its ready replicas (cleared on state changes)
        self._census: tuple[list[Replica], int, dict[str, tuple[int, int, int]]] | None = None  # see census()
        self._views: dict[str, tuple[_RoutingView, ...]] = {}  # pool -> what its router sees of them
        self._read_views: list[_RoutingView] = []  # views whose metrics the last decision read
        self.on_call_done: Callable[[int], None] | None = None  # e.g. a progress bar
        self._ts_rows: list[tuple] = []
        self._cl_rows: list[tuple] = []
        self._failure_rows: list[tuple] = []

    @property
    def all_done(self) -> bool:
        return self.graph.remaining == 0

    # --- replicas --------------------------------------------------------------------------------------
    def add_replica(self, pool: str, handle: Any, state: str) -> Replica:
        rep = Replica(len(self.replicas), pool, state, handle, self)
        self.replicas[rep.replica_id] = rep
        self._replicas_changed()
        return rep

    def _replicas_changed(self) -> None:
        self._ready.clear()
        self._census = None

    def census(self) -> tuple[list[Replica], int, dict[str, tuple[int, int, int]]]:
        """The live replicas, the GPUs they hold, and per pool how many are starting, ready and draining
        (recounted only after a replica changed state)."""
        if self._census is None:
            live = [r for r in self.replicas.values() if r.state in LIVE]
            counts = {name: tuple(sum(r.pool == name and r.state == state for r in live)
                                  for state in ("starting", "ready", "draining")) for name in self.pools}
            self._census = live, sum(self.pools[r.pool].gpus_per_replica for r in live), counts  # type: ignore[assignment]
        return self._census  # type: ignore[return-value]

    def ready(self, pool: str) -> tuple[Replica, ...]:
        """The ready replicas of ``pool``, by replica id."""
        ready = self._ready.get(pool)
        if ready is None:
            ready = tuple(r for r in self.replicas.values() if r.pool == pool and r.state == "ready")
            self._ready[pool] = ready
            self._views[pool] = tuple(_RoutingView(r, self) for r in ready)
        return ready

    def gpus_in_use(self) -> int:
        return self.census()[1]

    def replica_ready(self, rep: Replica) -> None:
        """A starting replica serves from now on: route what waited for its pool."""
        rep.state = "ready"
        q = self.pending[rep.pool]
        while q and self.ready(rep.pool):
            self._route(self.graph.infos[q.popleft()])

    def retire(self, rep: Replica, state: str) -> None:
        """``rep`` leaves service ("stopped" once drained, or "dead")."""
        rep.state = state
        self.backend.stop_replica(rep)

    def stop_if_idle(self, rep: Replica) -> None:
        if rep.state == "draining" and self.backend.num_unfinished(rep) == 0:
            self.retire(rep, "stopped")

    # --- calls -----------------------------------------------------------------------------------------
    def release(self, request_id: int) -> None:
        """The call is released now: route it, hold it for its pool, or fail it if nothing can serve it.
        A call longer than its pool's ``max_model_len`` is refused, as vLLM's API server refuses it."""
        info, out = self.graph.infos[request_id], self.graph.output_tokens[request_id]
        if self.hooks.predictor is not None:
            info = self.graph.infos[request_id] = self.hooks.predictor.annotate(info, self.backend.now())
        self.ledger.release(info, out, self.backend.now())
        limit = self.pools[info.pool].max_model_len
        if info.input_tokens + max(out, 1) > limit:
            self._end(request_id, "rejected", "call_rejected", -1,
                      f"prompt {info.input_tokens} + max_tokens {max(out, 1)} tokens exceed max_model_len={limit} "
                      f"of pool '{info.pool}'")
            return
        self._dispatch(request_id)

    def _dispatch(self, request_id: int) -> None:
        info = self.graph.infos[request_id]
        if self.ready(info.pool):
            gate = self.hooks.gate
            if gate is not None and not gate.admit(info, self._fresh_views(info.pool), self.backend.now()):
                self.held[info.pool][request_id] = None
                return
            self._route(info)
        elif self._can_recover(info.pool):
            self.pending[info.pool].append(request_id)
        else:
            self._give_up(request_id)

    def _can_recover(self, pool: str) -> bool:
        """Whether a replica of ``pool`` may still come up: one is starting, or a scaler may start one."""
        return (self.scaler is not None or self.externally_scaled
                or any(r.pool == pool and r.state == "starting" for r in self.replicas.values()))

    def _fresh_views(self, pool: str) -> tuple[_RoutingView, ...]:
        """What a policy sees of ``pool``'s ready replicas now (the metrics the last decision read are stale)."""
        self.ready(pool)
        for v in self._read_views:
            v.forget()
        self._read_views.clear()
        return self._views[pool]

    def _route(self, info: RequestInfo) -> None:
        now, request_id = self.backend.now(), info.request_id
        views = self._fresh_views(info.pool)
        ready = self.ready(info.pool)
        if self.time_policies:  # scrape before the clock starts: the overhead measured is the policy's alone
            for v in views:
                v.num_running  # noqa: B018
        t = time.perf_counter() if self.time_policies else 0.0
        choice = self.router.route(info, views, now)
        overhead = time.perf_counter() - t if self.time_policies else 0.0
        rep = self.replicas.get(choice)
        if rep is None or rep.state != "ready" or rep.pool != info.pool:
            raise RuntimeError(f"router {type(self.router).__name__} returned replica {choice}, which is not one of "
                               f"the ready replicas {[r.replica_id for r in ready]} of pool '{info.pool}'")
        self.ledger.routed(request_id, choice, now, overhead)
        prioritizer = self.hooks.prioritizer
        if prioritizer is None:
            self.backend.send(rep, info, self.graph.output_tokens[request_id])
        else:
            self.backend.send(rep, info, self.graph.output_tokens[request_id], prioritizer.priority(info, now))

    def first_token(self, request_id: int, now: float) -> None:
        self.ledger.first_token(request_id, now)

    def call_finished(self, request_id: int, now: float, *, cached_tokens: int = 0, num_preemptions: int = 0,
                      scheduled_s: float = float("nan")) -> None:
        """A replica finished the call."""
        self.ledger.finished(request_id, now, cached_tokens=cached_tokens, num_preemptions=num_preemptions,
                             scheduled_s=scheduled_s)
        self.stop_if_idle(self.replicas[self.ledger.calls[request_id].replica_id])
        self._call_done(request_id)

    def call_failed(self, request_id: int, replica_id: int, reason: str, retry: bool) -> None:
        """The call was lost on ``replica_id``: route it again (``retry``), or count it failed."""
        if retry:
            self.failure("call_retried", replica_id, request_id, reason)
            self.ledger.unroute(request_id)  # latency still counts from the first release
            self._dispatch(request_id)
        else:
            self._end(request_id, "failed", "call_failed", replica_id, reason)
        if replica_id in self.replicas:
            self.stop_if_idle(self.replicas[replica_id])

    def recheck_pending(self, pool: str) -> None:
        """After a replica of ``pool`` died or failed to start: fail the calls that nothing can serve now."""
        if not self.ready(pool) and not self._can_recover(pool):
            while self.pending[pool]:
                self._give_up(self.pending[pool].popleft())

    def _give_up(self, request_id: int) -> None:
        self._end(request_id, "failed", "call_failed", -1, "no live replica to serve it and none can be started")

    def _end(self, request_id: int, status: str, kind: str, replica_id: int, detail: str) -> None:
        """The call ends unserved: recorded with ``status``, explained by a failure row of ``kind``."""
        self.ledger.finished(request_id, self.backend.now(), status=status)
        self.failure(kind, replica_id, request_id, detail)
        self._call_done(request_id)

    def _call_done(self, request_id: int) -> None:
        if self._learns:
            self._learn(request_id)
        for child in self.graph.done(request_id):
            self.backend.after(self.graph.think_s[child], lambda c=child: self.release(c))
        if self.on_call_done is not None:
            self.on_call_done(request_id)

    def _learn(self, request_id: int) -> None:
        """Tell the observing policies that the call ended; then, if it was served, ask the retention policy whether
        to pin its blocks and the prefetcher what to warm."""
        rec, info, now = self.ledger.calls[request_id], self.graph.infos[request_id], self.backend.now()
        ok = rec.status == "ok"
        done = CallDone(info, rec.replica_id, rec.status, rec.release_s, rec.first_token_s, rec.finish_s,
                        max(rec.output_tokens, 1) if ok else 0, rec.cached_tokens, self.graph.last_of_job(request_id))
        for policy in self._observers:
            policy.observe(done)
        rep = self.replicas.get(rec.replica_id)
        if not ok or rep is None or rep.state not in ("ready", "draining"):
            return
        retention, prefetcher = self.hooks.retention, self.hooks.prefetcher
        if retention is not None:
            ttl = retention.retain_s(done, now)
            if not ttl >= 0 or ttl == math.inf:
                raise ValueError(f"retention policy {type(retention).__name__} returned retain_s={ttl!r} for request "
                                 f"{request_id}; it must be a finite number of seconds >= 0")
            if ttl > 0:
                self.backend.pin(rep, info, ttl)
        if prefetcher is not None and self.ready(info.pool):
            for p in prefetcher.prefetch(done, self._fresh_views(info.pool), now):
                target = self.replicas.get(p.replica_id)
                if target is None or target.state != "ready" or target.pool != info.pool:
                    raise RuntimeError(f"prefetcher {type(prefetcher).__name__} named replica {p.replica_id}, which "
                                       f"is not one of the ready replicas of pool '{info.pool}'")
                self.backend.prefetch(target, p)

    def failure(self, kind: str, replica_id: int, request_id: int, detail: str) -> None:
        self._failure_rows.append((self.backend.now(), kind, replica_id, request_id, detail))

    # --- control ---------------------------------------------------------------------------------------
    def snapshot(self) -> ClusterObservation:
        """What the scaler sees now (the interval so far); reading it changes nothing."""
        views = [self.ledger.replica_view(r.replica_id, r.pool, r.state, self.backend.metrics(r))  # type: ignore[arg-type]
                 for r in self.replicas.values() if r.state in LIVE]
        total, free = self.backend.gpus()
        return self.ledger.snapshot(
            self.backend.now(), self.control_interval_s, views, {p: len(q) for p, q in self.pending.items()},
            {p.name: p.gpus_per_replica for p in self.pools.values()}, total, free)

    def close_interval(self) -> None:
        """A new control interval starts: arrivals, completions and latencies are counted afresh."""
        self.ledger.close_interval()

    def control(self) -> None:
        """One control interval ends: the scaler decides on it, and a new interval starts."""
        assert self.scaler is not None
        obs = self.snapshot()
        self.close_interval()
        action = self.scaler.decide(obs)
        self.apply(action.target_replicas)
        self.set_quotas(action)

    def set_quotas(self, action: ScaleAction) -> None:
        """The scaler's KV-memory quotas per agent, for every replica of the pools it names."""
        for pool, quotas in sorted(action.memory_quotas.items()):
            if pool not in self.pools:
                raise ValueError(f"scaler {type(self.scaler).__name__} sets memory quotas for pool '{pool}'; the pools "
                                 f"are {sorted(self.pools)}")
            check_quotas(f"scaler {type(self.scaler).__name__}: memory_quotas['{pool}']", quotas)
            self.backend.set_quotas(pool, quotas)

    def tick_gate(self) -> None:
        """The gate's control interval: per pool with ready replicas, route the held calls it lets go."""
        gate = self.hooks.gate
        assert gate is not None
        for pool, held in self.held.items():
            if not self.ready(pool):
                continue
            for request_id in gate.tick(self._fresh_views(pool), self.backend.now()):
                if request_id not in held:
                    raise RuntimeError(f"gate {type(gate).__name__} let request {request_id} go, which it does not "
                                       f"hold in pool '{pool}'")
                del held[request_id]
                self._route(self.graph.infos[request_id])

    def apply(self, target: Mapping[str, int]) -> None:
        """Start or drain replicas toward ``target`` active (starting + ready) replicas per pool."""
        for pool, want in sorted(target.items()):
            if pool not in self.pools:
                raise ValueError(f"scaler {type(self.scaler).__name__} targets pool '{pool}'; the pools are "
                                 f"{sorted(self.pools)}")
            active = [r for r in self.replicas.values() if r.pool == pool and r.state in ("starting", "ready")]
            if want > len(active):
                free = self.backend.startable(pool)
                if want - len(active) > free:
                    log.info("t=%.1f pool %s: scaler asked for %d replicas, only %d more fit; clamped",
                             self.backend.now(), pool, want, free)
                for _ in range(min(want - len(active), free)):
                    self.backend.start_replica(pool)
            elif want < len(active):
                # Drain the least useful first: replicas still starting, then the least loaded ready ones.
                order = sorted(active, key=lambda r: (r.state != "starting", self.backend.num_unfinished(r),
                                                      -r.replica_id))
                for r in order[: len(active) - max(want, 0)]:
                    r.state = "draining"
                    self.stop_if_idle(r)

    # --- results ---------------------------------------------------------------------------------------
    def sample(self, now: float) -> None:
        """One row per live replica and one per pool (the time series)."""
        live, gpus, counts = self.census()
        metrics, rows = self.backend.metrics, self._ts_rows
        for r in live:
            m = metrics(r)
            rows.append((now, r.replica_id, r.pool, r.state, m.num_running, m.num_waiting, m.kv_usage))
        for name, (starting, ready, draining) in counts.items():
            self._cl_rows.append((now, name, len(self.pending[name]) + len(self.held[name]), starting, ready,
                                  draining, gpus))

    def results(self, config: object, **tables: pd.DataFrame) -> Results:
        requests = self.ledger.results()
        return Results(requests=requests, jobs=job_table(requests),
                       timeseries=pd.DataFrame(self._ts_rows, columns=TIMESERIES_COLUMNS),
                       cluster=pd.DataFrame(self._cl_rows, columns=CLUSTER_COLUMNS),
                       failures=pd.DataFrame(self._failure_rows, columns=FAILURE_COLUMNS),
                       config=config, **tables)
