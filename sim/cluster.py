"""A cluster of simulated vLLM replicas on a fixed set of GPUs, driven by a router and a scaler.

This is the simulator's front end: it releases calls (roots at their arrival time, dependent calls
when their parents finished plus think time), routes each one with the policy's ``Router``, runs the
``Scaler`` every control interval, and starts (cold start), drains and stops replicas. It records
everything through ``policies.frontend.FrontEnd``, the same ledger the real executor uses.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pandas as pd
import simpy

from policies.api import ReplicaState, RequestInfo, Router, Scaler
from policies.frontend import FrontEnd, ReplicaMetrics, job_table, request_infos
from sim.costmodel import CostModel, make_cost_model
from sim.engine import EngineConfig, Replica, RequestRecord, SimRequest
from sim.models import load_model, num_gpu_blocks
from traces.schema import validate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolConfig:
    """A group of identical replicas serving one model."""

    name: str = "default"
    model: str = "llama-3.1-8b"
    tp: int = 1
    initial_replicas: int = 8


@dataclass(frozen=True)
class ClusterConfig:
    gpu: str = "a100-40gb"
    num_gpus: int = 8
    pools: tuple[PoolConfig, ...] = (PoolConfig(),)
    agent_pools: dict[str, str] = field(default_factory=dict)  # agent -> pool; others go to pools[0]
    # vLLM engine knobs, with vLLM's names and defaults
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None  # as vLLM's flag: KV blocks per replica instead of from memory
    coalesce_steps: bool = True
    # replica lifecycle: cold start = engine start-up + weights at the load bandwidth (45 s for an 8B model)
    engine_startup_s: float = 29.0
    weight_load_gbps: float = 1.0
    control_interval_s: float = 5.0
    sample_interval_s: float = 1.0

    def pool(self, name: str) -> PoolConfig:
        for p in self.pools:
            if p.name == name:
                return p
        raise KeyError(f"unknown pool '{name}'; pools are {[p.name for p in self.pools]}")


@dataclass
class SimResult:
    requests: pd.DataFrame  # policies.frontend.RESULT_COLUMNS, one row per call
    jobs: pd.DataFrame  # policies.frontend.job_table
    timeseries: pd.DataFrame  # per replica per sample: t, replica_id, pool, state, running, waiting, kv_usage
    cluster: pd.DataFrame  # per sample: t, pool, pending, replicas per state, gpus_in_use
    config: ClusterConfig


@dataclass
class _Slot:
    """One replica and its lifecycle state as the cluster manager tracks it."""

    replica_id: int
    pool: str
    state: ReplicaState | str  # starting | ready | draining | stopped
    engine: Replica


class Cluster:
    def __init__(self, env: simpy.Environment, cfg: ClusterConfig, router: Router, scaler: Scaler | None,
                 front: FrontEnd, on_finish: Callable[[int], None]):
        self.env, self.cfg, self.router, self.scaler, self.front = env, cfg, router, scaler, front
        self._on_call_done = on_finish
        self.slots: dict[int, _Slot] = {}
        self.pending: dict[str, deque[tuple[RequestInfo, SimRequest]]] = {p.name: deque() for p in cfg.pools}
        self._costs: dict[str, CostModel] = {}
        self._engine_cfg: dict[str, EngineConfig] = {}
        self._cold_start: dict[str, float] = {}
        for p in cfg.pools:
            model = load_model(p.model)
            self._costs[p.name] = make_cost_model(cfg.gpu, p.model, p.tp)
            blocks = num_gpu_blocks(cfg.gpu, model, p.tp, block_size=cfg.block_size,
                                    gpu_memory_utilization=cfg.gpu_memory_utilization)
            if cfg.num_gpu_blocks_override is not None:
                blocks = cfg.num_gpu_blocks_override
            self._engine_cfg[p.name] = EngineConfig(
                num_gpu_blocks=blocks, block_size=cfg.block_size, max_num_seqs=cfg.max_num_seqs,
                max_num_batched_tokens=cfg.max_num_batched_tokens,
                enable_prefix_caching=cfg.enable_prefix_caching, coalesce_steps=cfg.coalesce_steps)
            self._cold_start[p.name] = cold_start_s(cfg, p.name)
        if sum(p.initial_replicas * p.tp for p in cfg.pools) > cfg.num_gpus:
            raise ValueError(f"initial replicas need {sum(p.initial_replicas * p.tp for p in cfg.pools)} GPUs but "
                             f"the cluster has num_gpus={cfg.num_gpus}; lower initial_replicas or raise num_gpus")
        self._next_id = 0
        for p in cfg.pools:
            for _ in range(p.initial_replicas):
                self._new_replica(p.name, ready=True)

    # --- replicas --------------------------------------------------------------------------------
    def gpus_in_use(self) -> int:
        return sum(self.cfg.pool(s.pool).tp for s in self.slots.values() if s.state != "stopped")

    def _new_replica(self, pool: str, ready: bool) -> _Slot:
        rid = self._next_id
        self._next_id += 1
        engine = Replica(self.env, rid, self._costs[pool], self._engine_cfg[pool],
                         on_finish=self._finished, on_first_token=self.front.first_token)
        slot = _Slot(rid, pool, "ready" if ready else "starting", engine)
        self.slots[rid] = slot
        if not ready:
            self.env.process(self._cold_start_proc(slot))
        return slot

    def _cold_start_proc(self, slot: _Slot):
        yield self.env.timeout(self._cold_start[slot.pool])
        if slot.state == "starting":
            slot.state = "ready"
            self._flush_pending(slot.pool)

    def _stop_if_idle(self, slot: _Slot) -> None:
        if slot.state == "draining" and slot.engine.num_unfinished() == 0:
            slot.state = "stopped"

    def ready(self, pool: str) -> list[_Slot]:
        return [s for s in self.slots.values() if s.pool == pool and s.state == "ready"]

    def metrics(self, slot: _Slot) -> ReplicaMetrics:
        e = slot.engine
        return ReplicaMetrics(e.num_running, e.num_waiting, e.kv_usage, e.prefix_cache_queries,
                              e.prefix_cache_hits, e.num_preemptions, e.num_gpu_blocks * e.block_size)

    # --- calls -----------------------------------------------------------------------------------
    def submit(self, info: RequestInfo, req: SimRequest) -> None:
        self.front.release(info, req.output_len, self.env.now)
        if self.ready(info.pool):
            self._route(info, req)
        else:
            self.pending[info.pool].append((info, req))

    def _route(self, info: RequestInfo, req: SimRequest) -> None:
        slots = self.ready(info.pool)
        views = [self.front.replica_view(s.replica_id, s.pool, "ready", self.metrics(s)) for s in slots]
        rid = self.router.route(info, views, self.env.now)
        slot = self.slots.get(rid)
        if slot is None or slot.state != "ready" or slot.pool != info.pool:
            raise RuntimeError(f"router {type(self.router).__name__} returned replica {rid}, which is not one of "
                               f"the ready replicas {[s.replica_id for s in slots]} of pool '{info.pool}'")
        self.front.routed(info.request_id, rid, self.env.now)
        slot.engine.add_request(req)

    def _flush_pending(self, pool: str) -> None:
        q = self.pending[pool]
        while q and self.ready(pool):
            self._route(*q.popleft())

    def _finished(self, rec: RequestRecord) -> None:
        self.front.finished(rec.request_id, rec.finish_s, cached_tokens=rec.num_cached_tokens,
                            num_preemptions=rec.num_preemptions, scheduled_s=rec.scheduled_s)
        self._stop_if_idle(self.slots[rec.replica_id])
        self._on_call_done(rec.request_id)

    # --- scaling ---------------------------------------------------------------------------------
    def observe(self):
        views = [self.front.replica_view(s.replica_id, s.pool, s.state, self.metrics(s))  # type: ignore[arg-type]
                 for s in self.slots.values() if s.state != "stopped"]
        return self.front.observe(
            self.env.now, self.cfg.control_interval_s, views, {p: len(q) for p, q in self.pending.items()},
            {p.name: p.tp for p in self.cfg.pools}, self.cfg.num_gpus, self.cfg.num_gpus - self.gpus_in_use())

    def apply(self, target: dict[str, int]) -> None:
        for pool, want in sorted(target.items()):
            tp = self.cfg.pool(pool).tp
            active = [s for s in self.slots.values() if s.pool == pool and s.state in ("starting", "ready")]
            if want > len(active):
                free = (self.cfg.num_gpus - self.gpus_in_use()) // tp
                if want - len(active) > free:
                    log.info("t=%.1f pool %s: scaler asked for %d replicas, only %d more fit on the GPUs; clamped",
                             self.env.now, pool, want, free)
                for _ in range(min(want - len(active), free)):
                    self._new_replica(pool, ready=False)
            elif want < len(active):
                # Drain the least useful first: replicas still starting, then the least loaded ready ones.
                order = sorted(active, key=lambda s: (s.state != "starting", s.engine.num_unfinished(),
                                                      -s.replica_id))
                for s in order[: len(active) - max(want, 0)]:
                    s.state = "draining"
                    self._stop_if_idle(s)


class Simulation:
    """One replay of a workload on a simulated cluster, advanced in steps of simulated time.

    ``simulate`` runs it to the end; the RL environment advances it one control interval at a time and
    plays the scaler itself (``observe`` / ``apply``).
    """

    def __init__(self, table: pd.DataFrame, cfg: ClusterConfig, router: Router, scaler: Scaler | None = None,
                 *, progress: bool = False):
        validate(table, "simulate(table)")
        pools = {p.name for p in cfg.pools}
        unknown = sorted({p for p in cfg.agent_pools.values() if p not in pools})
        if unknown:
            raise ValueError(f"agent_pools names pool(s) {unknown} that are not in the config's pools {sorted(pools)}")
        self.cfg = cfg
        self.env = env = simpy.Environment()
        self.front = FrontEnd()
        infos = [replace(i, pool=cfg.agent_pools.get(i.agent, cfg.pools[0].name)) for i in request_infos(table)]
        reqs = [SimRequest(i.request_id, i.input_tokens, int(o), i.block_hashes, i.hash_block_size)
                for i, o in zip(infos, table["output_tokens"].tolist(), strict=True)]
        self._infos, self._reqs, self._think = infos, reqs, table["think_s"].tolist()
        self._waiting_on = [len(p) for p in table["parents"]]
        self._children: dict[int, list[int]] = {}
        for k, parents in enumerate(table["parents"]):
            for p in parents:
                self._children.setdefault(int(p), []).append(k)
        self.remaining = len(infos)
        self.done = env.event()
        if not infos:
            self.done.succeed()
        self._bar = _progress(len(infos)) if progress else None
        self.cluster = Cluster(env, cfg, router, scaler, self.front, self._call_done)
        self._ts_rows: list[tuple] = []
        self._cl_rows: list[tuple] = []
        env.process(self._arrivals([k for k in range(len(infos)) if self._waiting_on[k] == 0]))
        env.process(self._sampler())
        if scaler is not None:
            env.process(self._controller(scaler))

    def run(self, until: float | None = None) -> bool:
        """Advance to simulated time ``until`` (or to the end); True once every call has finished."""
        if not self.done.triggered and (until is None or until > self.env.now):
            self.env.run(until=self.done if until is None else until)
        if self.done.triggered and self._bar is not None:
            self._bar.close()
        return self.done.triggered

    def result(self) -> SimResult:
        results = self.front.results()
        return SimResult(
            requests=results,
            jobs=job_table(results),
            timeseries=pd.DataFrame(self._ts_rows, columns=["t", "replica_id", "pool", "state", "num_running",
                                                            "num_waiting", "kv_usage"]),
            cluster=pd.DataFrame(self._cl_rows, columns=["t", "pool", "pending", "starting", "ready", "draining",
                                                         "gpus_in_use"]),
            config=self.cfg,
        )

    # --- SimPy processes -------------------------------------------------------------------------
    def _arrivals(self, roots: list[int]):
        for k in roots:
            delay = self._infos[k].arrival_s - self.env.now
            if delay > 0:
                yield self.env.timeout(delay)
            self.cluster.submit(self._infos[k], self._reqs[k])

    def _release_later(self, k: int):
        yield self.env.timeout(self._think[k])
        self.cluster.submit(self._infos[k], self._reqs[k])

    def _call_done(self, request_id: int) -> None:
        self.remaining -= 1
        if self._bar is not None:
            self._bar.update(1)
        for c in self._children.get(request_id, ()):
            self._waiting_on[c] -= 1
            if self._waiting_on[c] == 0:
                self.env.process(self._release_later(c))
        if self.remaining == 0:
            self.done.succeed()

    def _sampler(self):
        cluster, pools = self.cluster, self.cfg.pools
        while True:
            now = self.env.now
            for s in cluster.slots.values():
                if s.state != "stopped":
                    e = s.engine
                    self._ts_rows.append((now, s.replica_id, s.pool, s.state, e.num_running, e.num_waiting,
                                          e.kv_usage))
            for p in pools:
                states = [s.state for s in cluster.slots.values() if s.pool == p.name]
                self._cl_rows.append((now, p.name, len(cluster.pending[p.name]), states.count("starting"),
                                      states.count("ready"), states.count("draining"), cluster.gpus_in_use()))
            yield self.env.timeout(self.cfg.sample_interval_s)

    def _controller(self, scaler: Scaler):
        while True:
            yield self.env.timeout(self.cfg.control_interval_s)
            self.cluster.apply(scaler.decide(self.cluster.observe()).target_replicas)


def simulate(table: pd.DataFrame, cfg: ClusterConfig, router: Router, scaler: Scaler | None = None,
             *, progress: bool = False) -> SimResult:
    """Replay a canonical workload table on a simulated cluster; deterministic for the same inputs."""
    sim = Simulation(table, cfg, router, scaler, progress=progress)
    sim.run()
    return sim.result()


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="req", desc="simulate", mininterval=1.0)


def cold_start_s(cfg: ClusterConfig, pool: str) -> float:
    """Seconds from a scale-up decision until the new replica serves (engine start-up + weight loading)."""
    p = cfg.pool(pool)
    return cfg.engine_startup_s + load_model(p.model).weight_bytes(p.tp) / (cfg.weight_load_gbps * 1e9)
