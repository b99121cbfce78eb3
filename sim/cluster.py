"""A cluster of simulated vLLM replicas on a fixed set of GPUs: the simulator's backend of ``frontend.FrontEnd``.

The front end (release, routing, scaling, sampling, results) is shared with the real executor; what is the
simulator's own is how time passes (SimPy processes: arrivals, think times, cold starts, the control loop,
the sampler) and how a call is served (``sim.engine.Replica``, one vLLM engine per replica on the GPUs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import pandas as pd
import simpy

from frontend.checks import check_bool, check_choice, check_float, check_int, check_name
from frontend.core import LIVE, FrontEnd, PoolSpec, Replica
from frontend.engine_args import EngineArgs
from frontend.ledger import ReplicaMetrics
from frontend.results import PREFETCH_COLUMNS, RETENTION_COLUMNS, Results
from policies.api import NO_HOOKS, Hooks, Prefetch, RequestInfo, Router, Scaler
from sim.costmodel import CostModel, make_cost_model
from sim.engine import Engine, RequestRecord, SimRequest
from sim.hardware import get_gpu
from sim.kvcache import shared_prefix_ids
from sim.models import Model, load_model, num_gpu_blocks

MAX_GPUS = 65536  # the largest cluster a ClusterConfig may name


@dataclass(frozen=True)
class PoolConfig:
    """A group of identical replicas serving one model."""

    name: str = "default"
    model: str = "llama-3.1-8b"
    tp: int = 1
    initial_replicas: int = 8

    def __post_init__(self) -> None:
        check_name("PoolConfig.name", self.name)
        check_name(f"pool '{self.name}': PoolConfig.model", self.model)
        check_int(f"pool '{self.name}': PoolConfig.tp", self.tp, 1, MAX_GPUS)
        check_int(f"pool '{self.name}': PoolConfig.initial_replicas", self.initial_replicas, 0, MAX_GPUS)


@dataclass(frozen=True)
class ClusterConfig:
    gpu: str = "a100-40gb"
    num_gpus: int = 8
    pools: tuple[PoolConfig, ...] = (PoolConfig(),)
    agent_pools: dict[str, str] = field(default_factory=dict)  # agent -> pool; others go to pools[0]
    engine: EngineArgs = EngineArgs()  # every replica's vLLM engine arguments
    engine_version: str | None = None  # engine generation of the cost model: vllm-v1 (default) or vllm-v0 (2023)
    coalesce_steps: bool = True  # advance runs of identical decode steps as one event (same results, faster)
    # replica lifecycle: cold start = engine start-up + weights at the load bandwidth (45 s for an 8B model)
    engine_startup_s: float = 29.0
    weight_load_gbps: float = 1.0
    control_interval_s: float = 5.0
    sample_interval_s: float = 1.0

    def __post_init__(self) -> None:
        check_name("ClusterConfig.gpu", self.gpu)
        gpu = get_gpu(self.gpu)  # an unknown name is refused with the known ones
        check_int("ClusterConfig.num_gpus", self.num_gpus, 1, MAX_GPUS)
        if not isinstance(self.pools, tuple) or not self.pools or \
                not all(isinstance(p, PoolConfig) for p in self.pools):
            raise ValueError(f"ClusterConfig.pools={self.pools!r} must be a non-empty tuple of PoolConfig")
        names = [p.name for p in self.pools]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"ClusterConfig.pools: pool name(s) {twice} appear twice; give each pool its own name")
        if not isinstance(self.agent_pools, dict):
            raise ValueError(f"ClusterConfig.agent_pools={self.agent_pools!r} must be a dict of agent -> pool name")
        unknown = sorted({p for p in self.agent_pools.values() if p not in names})
        if unknown:
            raise ValueError(f"ClusterConfig.agent_pools maps agents to pool(s) {unknown}; the pools are {names}")
        if not isinstance(self.engine, EngineArgs):
            raise ValueError(f"ClusterConfig.engine={self.engine!r} must be an EngineArgs")
        if self.engine_version is not None:
            check_choice(f"ClusterConfig.engine_version (on {self.gpu})", self.engine_version, gpu.engines)
        check_bool("ClusterConfig.coalesce_steps", self.coalesce_steps)
        check_float("ClusterConfig.engine_startup_s", self.engine_startup_s, 0.0)
        for name in ("weight_load_gbps", "control_interval_s", "sample_interval_s"):
            check_float(f"ClusterConfig.{name}", getattr(self, name), 0.0, open_low=True)
        need = sum(p.initial_replicas * p.tp for p in self.pools)
        if need > self.num_gpus:
            raise ValueError(f"initial replicas need {need} GPUs but the cluster has num_gpus={self.num_gpus}; lower "
                             f"initial_replicas or raise num_gpus")

    def pool(self, name: str) -> PoolConfig:
        for p in self.pools:
            if p.name == name:
                return p
        raise KeyError(f"unknown pool '{name}'; pools are {[p.name for p in self.pools]}")


STALL_S = 600.0  # simulated seconds calls may wait with no replica of their pool ready or starting
GATE_STALL_S = 3600.0  # ... or held by a gate while no replica serves anything (ThunderAgent forces a resume at 1800)
IDLE_SKIP_SAMPLES = 1000  # an idle span longer than this many sample intervals is not sampled
MAX_CONTROL_INTERVALS = 10**7  # scaler decisions one run may need (the span of its arrivals / control_interval_s)


class StalledError(RuntimeError):
    """The simulated cluster cannot make progress: calls wait and no replica will ever serve them."""


def check_progress(table: pd.DataFrame, cfg: ClusterConfig, scaler: Scaler | None, controlled: bool) -> None:
    """Refuse, before any work, a run that could never end: a pool without replicas that nothing can start, or
    a scaler that would have to decide more than MAX_CONTROL_INTERVALS times."""
    if scaler is None and not controlled:
        empty = [p.name for p in cfg.pools if p.initial_replicas == 0]
        if empty:
            raise ValueError(f"pool(s) {empty} have initial_replicas=0 and there is no scaler to start a replica, so "
                             "their calls could never be served; give them initial replicas or pass a scaler")
    if scaler is not None and len(table):
        span = float(table["arrival_s"].max())
        if span / cfg.control_interval_s > MAX_CONTROL_INTERVALS:
            raise ValueError(f"the workload's arrivals span {span:.4g} s: the scaler would decide every "
                             f"control_interval_s={cfg.control_interval_s:g} s, {span / cfg.control_interval_s:.3g} "
                             f"times (at most {MAX_CONTROL_INTERVALS:.0e}); raise control_interval_s or shorten the "
                             "workload's idle gaps")


class SimBackend:
    """The simulated replicas behind one ``FrontEnd``: engines on GPUs, cold starts, SimPy time."""

    def __init__(self, env: simpy.Environment, cfg: ClusterConfig):
        self.env, self.cfg = env, cfg
        self.front: FrontEnd  # set by Simulation once the front end exists
        self._costs: dict[str, CostModel] = {}
        self._blocks: dict[str, int] = {}
        self._cold_start: dict[str, float] = {}
        self._before_s: dict[str, float] = {}  # pool -> its API server's time before a call reaches the engine
        self.max_model_len: dict[str, int] = {}
        self._api_calls: dict[int, int] = {}  # replica -> calls in its API server (not yet or no more in the engine)
        # request -> leading block ids other calls share (set by Simulation; a call missing: maybe all of them)
        self.shared_ids: dict[int, int] = {}
        self._quotas: dict[str, dict[str, float]] = {}  # pool -> the scaler's KV quotas per agent
        self._prefetches: dict[int, list] = {}  # prefetch request id (negative) -> its PREFETCH_COLUMNS row
        args = cfg.engine
        for p in cfg.pools:
            model = load_model(p.model)
            sized = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                         kv_cache_dtype=args.kv_cache_dtype)
            self._costs[p.name] = cost = make_cost_model(cfg.gpu, p.model, p.tp, cfg.engine_version, **sized)
            self._blocks[p.name] = args.num_gpu_blocks_override or num_gpu_blocks(
                cfg.gpu, model, p.tp, block_size=args.block_size, gpu_memory_utilization=args.gpu_memory_utilization,
                engine=cfg.engine_version, **sized)
            if cost.api_overhead.before_first_token_s < 0 or cost.api_overhead.after_finish_s < 0:
                raise ValueError(f"pool '{p.name}': the calibration's API overhead {cost.api_overhead} has a negative "
                                 f"term, which a simulated call cannot take back; recalibrate")
            self.max_model_len[p.name] = max_model_len(args, model, self._blocks[p.name], p.name)
            self._cold_start[p.name] = cold_start_s(cfg, p.name)
            self._before_s[p.name] = cost.api_overhead.before_first_token_s

    def start_initial(self) -> None:
        for p in self.cfg.pools:
            for _ in range(p.initial_replicas):
                self._new_replica(p.name, "ready")

    def _new_replica(self, pool: str, state: str) -> Replica:
        front = self.front
        after = self._costs[pool].api_overhead.after_finish_s
        engine = Engine(self.env, len(front.replicas), self._costs[pool], self.cfg.engine, self._blocks[pool],
                        coalesce_steps=self.cfg.coalesce_steps, on_finish=lambda rec: self._finished(rec, after),
                        on_first_token=self._first_token)
        if pool in self._quotas:
            engine.set_quotas(self._quotas[pool])
        return front.add_replica(pool, engine, state)

    def _first_token(self, request_id: int, now: float) -> None:
        if request_id >= 0:  # not a prefetch
            self.front.first_token(request_id, now)

    def _finished(self, rec: RequestRecord, after_finish_s: float) -> None:
        """The engine is done; the client has the last token ``after_finish_s`` later (the API server's part)."""
        if after_finish_s == 0:
            self._report(rec)
        else:
            self._in_api_server(rec.replica_id, after_finish_s, lambda: self._report(rec))

    def _report(self, rec: RequestRecord) -> None:
        if rec.request_id < 0:  # a prefetch: recorded apart from the workload's calls
            row = self._prefetches[rec.request_id]
            row[3], row[4] = rec.num_cached_tokens, self.env.now
            self.front.stop_if_idle(self.front.replicas[rec.replica_id])
            return
        self.front.call_finished(rec.request_id, self.env.now, cached_tokens=rec.num_cached_tokens,
                                 num_preemptions=rec.num_preemptions, scheduled_s=rec.scheduled_s)

    def _in_api_server(self, replica_id: int, delay_s: float, fn: Callable[[], None]) -> None:
        """``fn`` after the API server's ``delay_s``; the call counts as unfinished on the replica meanwhile, so a
        draining replica is not stopped under it."""
        self._api_calls[replica_id] = self._api_calls.get(replica_id, 0) + 1

        def done() -> None:
            self._api_calls[replica_id] -= 1
            fn()

        self.after(delay_s, done)

    def _cold_start_proc(self, rep: Replica):
        yield self.env.timeout(self._cold_start[rep.pool])
        if rep.state == "starting":
            self.front.replica_ready(rep)

    # --- Backend ---------------------------------------------------------------------------------------
    def now(self) -> float:
        return self.env.now

    def after(self, delay_s: float, fn: Callable[[], None]) -> None:
        def wait():
            yield self.env.timeout(delay_s)
            fn()

        self.env.process(wait())

    def start_replica(self, pool: str) -> Replica:
        rep = self._new_replica(pool, "starting")
        self.env.process(self._cold_start_proc(rep))
        return rep

    def startable(self, pool: str) -> int:
        return (self.cfg.num_gpus - self.front.gpus_in_use()) // self.cfg.pool(pool).tp

    def gpus(self) -> tuple[int, int]:
        return self.cfg.num_gpus, self.cfg.num_gpus - self.front.gpus_in_use()

    def send(self, replica: Replica, info: RequestInfo, output_tokens: int, priority: int = 0) -> None:
        """The engine gets the call after the API server's ``before_first_token_s`` (HTTP, tokenization)."""
        self._submit(replica, SimRequest(info.request_id, info.input_tokens, int(output_tokens), info.block_hashes,
                                         info.hash_block_size, self.shared_ids.get(info.request_id), priority,
                                         info.expected_output_tokens, info.agent))

    def _submit(self, replica: Replica, req: SimRequest) -> None:
        before = self._before_s[replica.pool]
        if before == 0:
            replica.handle.add_request(req)
        else:
            self._in_api_server(replica.replica_id, before, lambda: replica.handle.add_request(req))

    def pin(self, replica: Replica, info: RequestInfo, ttl_s: float) -> None:
        replica.handle.pin(SimRequest(info.request_id, info.input_tokens, 1, info.block_hashes, info.hash_block_size,
                                      self.shared_ids.get(info.request_id)), ttl_s)

    def prefetch(self, replica: Replica, prefetch: Prefetch) -> None:
        """A one-token call of the prefix, under a request id of its own below 0 (every block of it shareable)."""
        rid = -1 - len(self._prefetches)
        self._prefetches[rid] = [self.env.now, replica.replica_id, prefetch.num_tokens, 0, math.nan]
        self._submit(replica, SimRequest(rid, prefetch.num_tokens, 1, prefetch.block_hashes, prefetch.hash_block_size,
                                         len(prefetch.block_hashes)))

    def set_quotas(self, pool: str, quotas: Mapping[str, float]) -> None:
        self._quotas[pool] = dict(quotas)
        for r in self.front.replicas.values():
            if r.pool == pool and r.state in LIVE:
                r.handle.set_quotas(self._quotas[pool])

    def metrics(self, replica: Replica) -> ReplicaMetrics:
        e = replica.handle
        return ReplicaMetrics(e.num_running, e.num_waiting, e.kv_usage, e.prefix_cache_queries,
                              e.prefix_cache_hits, e.num_preemptions, e.num_gpu_blocks * e.block_size)

    def num_unfinished(self, replica: Replica) -> int:
        return replica.handle.num_unfinished() + self._api_calls.get(replica.replica_id, 0)

    def stop_replica(self, replica: Replica) -> None:
        """A drained engine holds nothing: its GPUs count as free once its state left LIVE."""

    def tables(self) -> dict[str, pd.DataFrame]:
        """The prefetches and every replica's pins (``frontend.results``)."""
        pins = [(r.replica_id, e.pins["pinned"], e.pins["used"], e.pins["expired"], e.pins["yielded"],
                 e.pinned_block_seconds(), e.pinned_hit_tokens)
                for r in self.front.replicas.values() for e in (r.handle,)]
        return {"prefetches": pd.DataFrame(list(self._prefetches.values()), columns=PREFETCH_COLUMNS),
                "retention": pd.DataFrame(pins, columns=RETENTION_COLUMNS)}


class Simulation:
    """One replay of a workload on a simulated cluster, advanced in steps of simulated time.

    ``simulate`` runs it to the end; the RL environment advances it one control interval at a time and
    plays the scaler itself (``front.snapshot`` / ``front.apply``; pass ``controlled=True`` so calls wait for
    replicas it may start, as they would for a scaler).
    """

    def __init__(self, table: pd.DataFrame, cfg: ClusterConfig, router: Router, scaler: Scaler | None = None,
                 *, progress: bool = False, controlled: bool = False, hooks: Hooks = NO_HOOKS):
        check_progress(table, cfg, scaler, controlled)
        self.cfg = cfg
        self.env = env = simpy.Environment()
        self.backend = SimBackend(env, cfg)
        self.front = front = FrontEnd(
            table, [PoolSpec(p.name, p.tp, self.backend.max_model_len[p.name]) for p in cfg.pools], router, scaler,
            self.backend,
            agent_pools=cfg.agent_pools, control_interval_s=cfg.control_interval_s, source="simulate(table)",
            externally_scaled=controlled, hooks=hooks)
        self.backend.front = front
        self.backend.shared_ids = shared_prefix_ids((i.request_id, i.hash_block_size, i.block_hashes)
                                                    for i in front.graph.infos.values())
        self.backend.start_initial()
        self.done = env.event()
        self._bar = _progress(len(front.graph)) if progress else None
        front.on_call_done = self._call_done
        if front.all_done:
            self.done.succeed()
        env.process(self._arrivals(front.graph.roots))
        env.process(self._sampler())
        if scaler is not None or hooks.gate is not None:
            env.process(self._controller())

    def run(self, until: float | None = None) -> bool:
        """Advance to simulated time ``until`` (or to the end); True once every call has finished."""
        if not self.done.triggered and (until is None or until > self.env.now):
            self.env.run(until=self.done if until is None else until)
        if self.done.triggered and self._bar is not None:
            self._bar.close()
        return self.done.triggered

    def result(self) -> Results:
        return self.front.results(self.cfg, **self.backend.tables())

    def _call_done(self, request_id: int) -> None:
        if self._bar is not None:
            self._bar.update(1)
        if self.front.all_done:
            self.done.succeed()

    # --- SimPy processes -------------------------------------------------------------------------
    def _arrivals(self, roots: list[int]):
        infos = self.front.graph.infos
        for rid in roots:
            delay = infos[rid].arrival_s - self.env.now
            if delay > 0:
                yield self.env.timeout(delay)
            self.front.release(rid)

    def _sampler(self):
        """A sample every ``sample_interval_s``, except across long idle spans. While no call waits or is in a
        replica, nothing changes until the next scheduled event (an arrival, the end of a think time, a control
        interval, a cold start); if that is more than IDLE_SKIP_SAMPLES intervals away, the sampler sleeps until
        the first sample time at or after it, so an idle gap of any length costs one event and no rows. Shorter
        idle spans are sampled as any other, so row means over a run's time series stay time averages wherever
        the cluster was idle less long. Not under an outside controller (``controlled``), which changes
        replicas between events."""
        env, dt = self.env, self.cfg.sample_interval_s
        while True:
            self.front.sample(env.now)
            wait = dt
            if not self.front.externally_scaled and self._idle():
                ahead = env.peek() - env.now
                if ahead == math.inf:
                    raise StalledError(f"{self.front.graph.remaining} call(s) are unfinished, none is waiting or "
                                       "being served, and nothing is scheduled that could release one")
                if ahead > IDLE_SKIP_SAMPLES * dt:
                    wait = math.ceil(ahead / dt) * dt
            yield env.timeout(wait)

    def _idle(self) -> bool:
        front = self.front
        return not any(front.pending.values()) and all(
            self.backend.num_unfinished(r) == 0 for r in front.replicas.values() if r.state in LIVE)

    def _controller(self):
        """The scaler decides, and the gate lets held calls go, every ``control_interval_s``. A pool whose calls wait
        while none of its replicas is ready or starting is stalled; stalled for STALL_S (the scaler starts none, or no
        GPU is free for one), the run cannot make progress and ends with a StalledError instead of running forever.
        So does a run whose gate holds calls while no replica serves anything for GATE_STALL_S."""
        front, stalled, gate_idle_since = self.front, {}, math.inf
        while True:
            yield self.env.timeout(self.cfg.control_interval_s)
            if front.scaler is not None:
                front.control()
            now = self.env.now
            if front.hooks.gate is not None:
                front.tick_gate()
                held = sum(map(len, front.held.values()))
                if not held or not self._idle():
                    gate_idle_since = math.inf
                elif now - min(gate_idle_since, now) >= GATE_STALL_S:
                    raise StalledError(f"the gate {type(front.hooks.gate).__name__} has held {held} call(s) for "
                                       f"{now - gate_idle_since:.0f} s of simulated time while no replica served "
                                       "anything")
                else:
                    gate_idle_since = min(gate_idle_since, now)
            for pool, waiting in front.pending.items():
                if not waiting or any(r.pool == pool and r.state in ("starting", "ready")
                                      for r in front.replicas.values()):
                    stalled.pop(pool, None)
                elif now - stalled.setdefault(pool, now) >= STALL_S:
                    oldest = front.ledger.calls[waiting[0]].release_s
                    total, free = self.backend.gpus()
                    raise StalledError(
                        f"pool '{pool}': {len(waiting)} call(s) wait (the oldest for {now - oldest:.0f} s) and for "
                        f"{now - stalled[pool]:.0f} s of simulated time no replica of the pool was ready or starting: "
                        f"the scaler {type(front.scaler).__name__} started none ({free} of {total} GPUs free). Give "
                        "the pool initial replicas, free GPUs for it, or use a scaler that starts replicas when calls "
                        "wait")


def simulate(table: pd.DataFrame, cfg: ClusterConfig, router: Router, scaler: Scaler | None = None,
             *, progress: bool = False, hooks: Hooks = NO_HOOKS) -> Results:
    """Replay a canonical workload table on a simulated cluster; deterministic for the same inputs. ``hooks``: a
    system's per-call policies (``policies.systems.make_system``)."""
    sim = Simulation(table, cfg, router, scaler, progress=progress, hooks=hooks)
    sim.run()
    return sim.result()


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="req", desc="simulate", mininterval=1.0)


def max_model_len(args: EngineArgs, model: Model, num_blocks: int, pool: str) -> int:
    """The pool's context window (``args.max_model_len``, else the model's), refused where vLLM refuses to start:
    one call of that length must fit the KV cache, and without chunked prefill, one step."""
    n = args.max_model_len or model.max_position_embeddings
    capacity = (num_blocks - 1) * args.block_size + 1  # block 0 is the null block; the last token needs no KV
    if n > capacity:
        raise ValueError(f"pool '{pool}': max_model_len={n} tokens do not fit its KV cache of {num_blocks} blocks "
                         f"of {args.block_size} tokens (one call may hold at most {capacity}); set "
                         f"EngineArgs.max_model_len <= {capacity}, or give the pool more KV memory (GPU, tp, "
                         f"gpu_memory_utilization)")
    if not args.enable_chunked_prefill and n > args.max_num_batched_tokens:
        raise ValueError(f"pool '{pool}': with chunked prefill off, max_model_len={n} must be <= "
                         f"max_num_batched_tokens={args.max_num_batched_tokens} (a prompt is computed in one step)")
    return n


def cold_start_s(cfg: ClusterConfig, pool: str) -> float:
    """Seconds from a scale-up decision until the new replica serves (engine start-up + weight loading)."""
    p = cfg.pool(pool)
    return cfg.engine_startup_s + load_model(p.model).weight_bytes(p.tp) / (cfg.weight_load_gbps * 1e9)

