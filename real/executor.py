"""Replay a canonical workload on real vLLM servers, in wall-clock time, with the simulator's policies.

This is the real twin of ``sim.cluster``: calls are released at their arrival time (dependent calls
when their parents finished, plus think time), each is routed by the same ``Router`` object, the same
``Scaler`` runs every control interval (starting and draining real servers), and everything is
recorded through ``policies.frontend.FrontEnd``, so the results have the simulator's schema. Replica
state comes from each server's ``/metrics``, scraped every ``scrape_interval_s``.

Several pools (``execute(table, [cfg_a, cfg_b], ..., agent_pools={"linter": "b"})``): each ``RealConfig`` is
one pool of replicas (its own model, engine knobs and devices), calls go to their agent's pool as in the
simulator's ``ClusterConfig.agent_pools`` (others to the first pool), and the scaler's targets name pools.

A replica that dies mid-run (its process exits, or its /health stops answering after a call or a
scrape failed) is taken out of routing; its in-flight calls are marked failed, or re-routed when
``retry_failed`` is set. Every such event is a row of ``RealResult.failures``: nothing is lost silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import aiohttp
import numpy as np
import pandas as pd

from policies.api import ClusterObservation, RequestInfo, Router, Scaler
from policies.frontend import FrontEnd, ReplicaMetrics, job_table, request_infos
from real.client import CallError, fetch_text, stream_completion
from real.config import RealConfig, pools_of
from real.launcher import Launcher, Server, ServerStartError, probe, stop_server
from real.metrics import latency_sums, replica_metrics
from real.tokens import prompt_token_ids
from traces.schema import WorkloadError, validate

log = logging.getLogger(__name__)

TIMESERIES_COLUMNS = ["t", "replica_id", "pool", "state", "num_running", "num_waiting", "kv_usage"]
CLUSTER_COLUMNS = ["t", "pool", "pending", "starting", "ready", "draining", "gpus_in_use"]
FAILURE_COLUMNS = ["t", "kind", "replica_id", "request_id", "detail"]
ENGINE_COLUMNS = ["replica_id", "phase", "sum_s", "count"]
SERVER_COLUMNS = ["replica_id", "pool", "url", "pid", "placement", "start_s", "ready_s", "stop_s", "state"]


@dataclass
class RealResult:
    """The simulator's result tables plus what only a real run has (failures, servers, token times).

    vLLM's HTTP API does not report per-call preemptions or the first-scheduled time, so those result
    columns stay 0 / NaN; preemptions per replica are in ``vllm:num_preemptions_total`` (ReplicaView).
    """

    requests: pd.DataFrame  # policies.frontend.RESULT_COLUMNS, one row per call (times: wall s since t=0)
    jobs: pd.DataFrame  # policies.frontend.job_table
    timeseries: pd.DataFrame  # TIMESERIES_COLUMNS, one row per replica per scrape (the simulator's columns)
    cluster: pd.DataFrame  # CLUSTER_COLUMNS, one row per scrape (gpus_in_use: GPUs, or cores, held)
    failures: pd.DataFrame  # FAILURE_COLUMNS; kinds: replica_died, start_failed, call_failed, call_retried
    servers: pd.DataFrame  # SERVER_COLUMNS, one row per replica (pid -1 when attached)
    token_times: pd.DataFrame  # request_id, t: one row per generated token (empty unless record_token_times)
    # ENGINE_COLUMNS: per replica and phase of real.metrics.LATENCY_HISTOGRAMS, the seconds and calls the server
    # itself measured during this run (its last scrape minus its first; a final scrape ends the run)
    engine: pd.DataFrame
    pools: dict[str, RealConfig]  # pool name -> its servers' config

    def summary(self) -> str:
        r = self.requests
        ms = r.loc[r["replica_id"] >= 0, "route_overhead_s"].to_numpy() * 1e3
        kinds = self.failures["kind"].value_counts().to_dict()
        lines = [f"{int((r['status'] == 'ok').sum())} calls ok, {int((r['status'] == 'failed').sum())} failed, "
                 f"{kinds.get('call_retried', 0)} retried; {kinds.get('replica_died', 0)} replica(s) died, "
                 f"{kinds.get('start_failed', 0)} failed to start"]
        if len(ms):
            lines.append(f"route() overhead per call: p50 {np.median(ms):.3f} ms, p99 {np.percentile(ms, 99):.3f} ms, "
                         f"max {ms.max():.3f} ms")
        return "\n".join(lines)


@dataclass
class _Slot:
    """One replica: a server we launched, or one we attached to."""

    replica_id: int
    pool: str
    url: str
    state: str  # starting | ready | draining | stopped (idle or shut down) | dead
    server: Server | None = None  # launch mode only
    metrics: ReplicaMetrics | None = None  # latest scrape
    latency_first: dict[str, tuple[float, int]] | None = None  # the server's latency sums at its first scrape
    latency: dict[str, tuple[float, int]] = field(default_factory=dict)  # ... and at its latest
    inflight: dict[int, asyncio.Task] = field(default_factory=dict)  # request_id -> its call task
    start_s: float = math.nan
    ready_s: float = math.nan
    stop_s: float = math.nan


def execute(table: pd.DataFrame, cfg: RealConfig | Sequence[RealConfig], router: Router,
            scaler: Scaler | None = None, *, time_scale: float = 1.0,
            agent_pools: Mapping[str, str] | None = None) -> RealResult:
    """Replay ``table`` on real vLLM servers (launched from ``cfg``, or ``cfg.urls``) and return the results.

    ``cfg`` is one pool, or a sequence of pools with distinct ``RealConfig.pool`` names and devices;
    ``agent_pools`` maps an agent to its pool (other agents: the first pool), as ``ClusterConfig.agent_pools``.

    ``time_scale`` stretches the trace's clock: a call at ``arrival_s`` is released at ``arrival_s *
    time_scale`` wall seconds after all initial replicas are ready (t=0), and think times scale alike;
    control and scrape intervals are wall time. Result times are wall seconds since t=0. Calls with
    ``output_tokens`` 0 generate one token (vLLM's minimum). Launched servers are stopped on every exit path.
    """
    validate(table, "execute(table)")
    if not time_scale > 0:
        raise ValueError(f"time_scale={time_scale} must be > 0")
    agent_pools = agent_pools or {}
    pools = pools_of(cfg, agent_pools)
    first = next(iter(pools.values()))
    pool_of = [agent_pools.get(a, first.pool) for a in table["agent"]]
    max_len = np.array([pools[p].max_model_len for p in pool_of])
    too_long = (table["input_tokens"] + table["output_tokens"].clip(lower=1)).to_numpy() > max_len
    if too_long.any():
        i = int(np.flatnonzero(too_long)[0])
        raise WorkloadError(f"execute(table), row {i}: input_tokens + output_tokens = "
                            f"{table['input_tokens'].iat[i] + table['output_tokens'].iat[i]} exceeds the servers' "
                            f"max_model_len={max_len[i]} (pool '{pool_of[i]}'); raise RealConfig.max_model_len or "
                            f"trim the trace")
    run = _Run(table, pools, pool_of, router, scaler, time_scale)
    launch = any(c.launch for c in pools.values())
    with Launcher(first.log_dir or None) if launch else contextlib.nullcontext() as launcher:
        run.launcher = launcher
        asyncio.run(run.main())
    return run.result()


class _Run:
    def __init__(self, table: pd.DataFrame, pools: dict[str, RealConfig], pool_of: list[str], router: Router,
                 scaler: Scaler | None, time_scale: float):
        self.pools, self.router, self.scaler, self.time_scale = pools, router, scaler, time_scale
        self.cfg = next(iter(pools.values()))  # the executor settings (EXECUTOR_FIELDS), equal in every pool
        self.launcher: Launcher | None = None
        self.front = FrontEnd()
        self.vocab_size = {name: c.resolved_vocab_size() for name, c in pools.items()}
        infos = [replace(i, pool=p) for i, p in zip(request_infos(table), pool_of, strict=True)]
        self.infos: dict[int, RequestInfo] = {i.request_id: i for i in infos}
        self.output_tokens = dict(zip(self.infos, table["output_tokens"].tolist(), strict=True))
        self.think = dict(zip(self.infos, table["think_s"].tolist(), strict=True))
        self.waiting_on = {rid: len(p) for rid, p in zip(self.infos, table["parents"], strict=True)}
        self.children: dict[int, list[int]] = {}
        for rid, parents in zip(self.infos, table["parents"], strict=True):
            for p in parents:
                self.children.setdefault(int(p), []).append(rid)
        self.roots = [rid for rid, n in self.waiting_on.items() if n == 0]
        self.remaining = len(infos)
        self.slots: dict[int, _Slot] = {}
        self.pending: dict[str, deque[int]] = {name: deque() for name in pools}
        self.tasks: set[asyncio.Task] = set()
        self.error: BaseException | None = None
        self.ts_rows: list[tuple] = []
        self.cl_rows: list[tuple] = []
        self.failure_rows: list[tuple] = []
        self.token_rows: list[tuple[int, float]] = []
        self.t0 = 0.0

    # --- clock and task supervision ----------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - self.t0

    def _spawn(self, coro) -> asyncio.Task:
        """Run ``coro`` as a task whose unexpected exception aborts the run (instead of hanging it)."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self.error is None:
            self.error = task.exception()
            self.done.set()

    async def main(self) -> None:
        self.done = asyncio.Event()
        self.t0 = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.cfg.request_timeout_s)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
            self.session = session
            try:
                await self._start_initial()
                shift = self.now()
                self.t0 += shift  # t=0: every initial replica is ready (their start-up shows as negative times)
                for slot in self.slots.values():
                    slot.start_s, slot.ready_s = slot.start_s - shift, slot.ready_s - shift
                background = [self._spawn(self._arrivals()), self._spawn(self._scraper())]
                if self.scaler is not None:
                    background.append(self._spawn(self._controller()))
                if self.remaining == 0:
                    self.done.set()
                await self.done.wait()
                if self.error is None:  # the servers' own latency sums, now that every call has finished
                    await asyncio.gather(*(self._scrape(s) for s in self.slots.values()
                                           if s.state in ("ready", "draining")))
            finally:
                for task in list(self.tasks):
                    task.cancel()
                await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.error is not None:
            raise self.error

    # --- replicas ------------------------------------------------------------------------------------
    async def _start_initial(self) -> None:
        for name, cfg in self.pools.items():
            if cfg.launch:
                for _ in range(cfg.num_replicas):
                    self._new_server(name)
                continue
            attached = []
            for url in cfg.urls:
                rid = len(self.slots)
                self.slots[rid] = _Slot(rid, name, url.rstrip("/"), "stopped")
                attached.append(self.slots[rid])
            for slot in attached[: cfg.num_replicas]:
                slot.state, slot.start_s = "starting", self.now()
        starting = [s for s in self.slots.values() if s.state == "starting"]
        await asyncio.gather(*(self._bring_up(s, initial=True) for s in starting))

    def _new_server(self, pool: str) -> _Slot:
        """Launch one server of ``pool`` on its least used core or GPU group (a dead server's is reused)."""
        assert self.launcher is not None
        cfg = self.pools[pool]
        used = [s.server.placement for s in self.slots.values()
                if s.pool == pool and s.server and s.state not in ("stopped", "dead")]
        server = self.launcher.spawn_vllm(cfg, min(cfg.placements, key=used.count))
        rid = len(self.slots)
        self.slots[rid] = _Slot(rid, pool, server.url, "starting", server, start_s=self.now())
        return self.slots[rid]

    async def _bring_up(self, slot: _Slot, initial: bool = False) -> None:
        """Wait for /health, take a first scrape, then serve. Failure: error at start, a failure row later."""
        proc = slot.server.proc if slot.server else None
        deadline = time.monotonic() + (self.pools[slot.pool].startup_timeout_s if slot.server else 10.0)
        while (state := await asyncio.to_thread(probe, slot.url, proc)) != "ready":
            if slot.state != "starting":
                return  # drained before it came up
            if state == "exited" or time.monotonic() > deadline:
                what = (f"exited with code {proc.returncode}" if state == "exited"
                        else "did not answer /health in time")
                detail = f"replica {slot.replica_id} at {slot.url} {what}"
                if slot.server:
                    detail += f"; last log lines ({slot.server.log_path}):\n{slot.server.log_tail()}"
                if initial:
                    raise ServerStartError(detail)
                self._failure("start_failed", slot.replica_id, -1, detail)
                self._retire(slot, "dead")
                self._recheck_pending(slot.pool)
                return
            await asyncio.sleep(0.5)
        if slot.state != "starting":
            return
        self._read_metrics(slot, await fetch_text(self.session, f"{slot.url}/metrics"))
        slot.state, slot.ready_s = "ready", self.now()
        pending = self.pending[slot.pool]
        while pending and self._ready(slot.pool):
            self._route(pending.popleft())

    def _ready(self, pool: str) -> list[_Slot]:
        return [s for s in self.slots.values() if s.pool == pool and s.state == "ready"]

    def _in_use(self, pool: str) -> int:
        return sum(s.pool == pool and s.state in ("starting", "ready", "draining") for s in self.slots.values())

    def _free(self, pool: str) -> int:
        """Replicas of ``pool`` that could still be started: spare cores or GPU groups, or idle attached servers."""
        if self.pools[pool].launch:
            return self.pools[pool].capacity - self._in_use(pool)
        return sum(s.pool == pool and s.state == "stopped" for s in self.slots.values())

    def _retire(self, slot: _Slot, state: str) -> None:
        """Stop serving from ``slot`` (stopped or dead); a launched server is shut down in the background."""
        slot.state, slot.stop_s = state, self.now()
        if slot.server is not None:
            self._spawn(asyncio.to_thread(stop_server, slot.server))

    def _stop_if_idle(self, slot: _Slot) -> None:
        if slot.state == "draining" and not slot.inflight:
            self._retire(slot, "stopped")

    async def _alive(self, slot: _Slot) -> bool:
        return await asyncio.to_thread(probe, slot.url, slot.server.proc if slot.server else None, 5.0) == "ready"

    async def _suspect(self, slot: _Slot, reason: str) -> None:
        """A call or scrape failed at the transport level: if the server is gone, retire it."""
        if slot.state not in ("dead", "stopped") and not await self._alive(slot):
            self._replica_died(slot, reason)

    def _replica_died(self, slot: _Slot, reason: str) -> None:
        if slot.state in ("dead", "stopped"):
            return
        log.warning("replica %d (%s) died: %s", slot.replica_id, slot.url, reason)
        self._failure("replica_died", slot.replica_id, -1, reason)
        victims = list(slot.inflight.items())
        slot.inflight.clear()
        self._retire(slot, "dead")
        for rid, task in victims:
            if task is not asyncio.current_task():
                task.cancel()
            self._call_failed(rid, slot.replica_id, f"replica {slot.replica_id} died: {reason}",
                              retry=self.cfg.retry_failed)
        self._recheck_pending(slot.pool)

    def _can_recover(self, pool: str) -> bool:
        """Whether a replica of ``pool`` may still come up for calls that are waiting."""
        starting = any(s.pool == pool and s.state == "starting" for s in self.slots.values())
        return starting or (self.scaler is not None and self._free(pool) > 0)

    def _recheck_pending(self, pool: str) -> None:
        if not self._ready(pool) and not self._can_recover(pool):
            while self.pending[pool]:
                self._give_up(self.pending[pool].popleft())

    # --- calls ---------------------------------------------------------------------------------------
    async def _arrivals(self) -> None:
        for rid in self.roots:
            delay = self.infos[rid].arrival_s * self.time_scale - self.now()
            if delay > 0:
                await asyncio.sleep(delay)
            self._release(rid)

    async def _release_later(self, rid: int, delay: float) -> None:
        await asyncio.sleep(delay)
        self._release(rid)

    def _release(self, rid: int) -> None:
        now = self.now()
        self.front.release(self.infos[rid], self.output_tokens[rid], now)
        self._dispatch(rid)

    def _dispatch(self, rid: int) -> None:
        pool = self.infos[rid].pool
        if self._ready(pool):
            self._route(rid)
        elif self._can_recover(pool):
            self.pending[pool].append(rid)
        else:
            self._give_up(rid)

    def _route(self, rid: int) -> None:
        info, now = self.infos[rid], self.now()
        ready = self._ready(info.pool)
        views = [self.front.replica_view(s.replica_id, s.pool, "ready", s.metrics) for s in ready]
        t = time.perf_counter()
        choice = self.router.route(info, views, now)
        overhead = time.perf_counter() - t
        slot = self.slots.get(choice)
        if slot is None or slot.state != "ready":
            raise RuntimeError(f"router {type(self.router).__name__} returned replica {choice}, which is not one "
                               f"of the ready replicas {[s.replica_id for s in ready]} of pool '{info.pool}'")
        self.front.routed(rid, choice, now, overhead)
        slot.inflight[rid] = self._spawn(self._serve(rid, slot))

    async def _serve(self, rid: int, slot: _Slot) -> None:
        info = self.infos[rid]
        prompt = prompt_token_ids(info.block_hashes, info.hash_block_size, info.input_tokens, rid,
                                  self.vocab_size[info.pool])
        try:
            out = await stream_completion(self.session, slot.url, prompt, max(self.output_tokens[rid], 1), self.now)
        except CallError as e:
            if e.transport:
                await self._suspect(slot, str(e))
            if slot.inflight.pop(rid, None) is not None:  # not already handled as part of a replica death
                self._call_failed(rid, slot.replica_id, str(e), retry=False)
                self._stop_if_idle(slot)
            return
        if slot.inflight.pop(rid, None) is None:
            return
        self.front.first_token(rid, out.first_token_s)
        self.front.finished(rid, out.finish_s, cached_tokens=out.cached_tokens)
        if self.cfg.record_token_times:
            self.token_rows.extend((rid, t) for t in out.token_times)
        self._stop_if_idle(slot)
        self._call_done(rid)

    def _call_failed(self, rid: int, replica_id: int, reason: str, retry: bool) -> None:
        if retry:
            self._failure("call_retried", replica_id, rid, reason)
            self.front.unroute(rid)  # latency still counts from the first release
            self._dispatch(rid)
        else:
            self.front.finished(rid, self.now(), failed=True)
            self._failure("call_failed", replica_id, rid, reason)
            self._call_done(rid)

    def _give_up(self, rid: int) -> None:
        """No replica is ready and none can come up: the call fails without being sent."""
        self.front.finished(rid, self.now(), failed=True)
        self._failure("call_failed", -1, rid, "no live replica to serve it and none can be started")
        self._call_done(rid)

    def _call_done(self, rid: int) -> None:
        self.remaining -= 1
        for child in self.children.get(rid, ()):
            self.waiting_on[child] -= 1
            if self.waiting_on[child] == 0:
                self._spawn(self._release_later(child, self.think[child] * self.time_scale))
        if self.remaining == 0:
            self.done.set()

    def _failure(self, kind: str, replica_id: int, request_id: int, detail: str) -> None:
        self.failure_rows.append((self.now(), kind, replica_id, request_id, detail))

    # --- metrics, control ----------------------------------------------------------------------------
    async def _scraper(self) -> None:
        while True:
            live = [s for s in self.slots.values() if s.state in ("ready", "draining")]
            await asyncio.gather(*(self._scrape(s) for s in live))
            now = self.now()
            for s in live:
                if s.state in ("ready", "draining") and s.metrics is not None:
                    m = s.metrics
                    self.ts_rows.append((now, s.replica_id, s.pool, s.state, m.num_running, m.num_waiting,
                                         m.kv_usage))
            for name, cfg in self.pools.items():
                states = [s.state for s in self.slots.values() if s.pool == name]
                self.cl_rows.append((now, name, len(self.pending[name]), states.count("starting"),
                                     states.count("ready"), states.count("draining"),
                                     self._in_use(name) * cfg.gpus_per_replica))
            await asyncio.sleep(self.cfg.scrape_interval_s)

    async def _scrape(self, slot: _Slot) -> None:
        try:
            self._read_metrics(slot, await fetch_text(self.session, f"{slot.url}/metrics"))
        except CallError as e:
            if e.transport:
                await self._suspect(slot, str(e))

    @staticmethod
    def _read_metrics(slot: _Slot, text: str) -> None:
        slot.metrics = replica_metrics(text, f"{slot.url}/metrics")
        slot.latency = latency_sums(text)
        if slot.latency_first is None:
            slot.latency_first = slot.latency

    def _observe(self) -> ClusterObservation:
        views = []
        for s in self.slots.values():
            if s.state in ("starting", "ready", "draining"):
                cfg = self.pools[s.pool]
                empty = ReplicaMetrics(0, 0, 0.0, 0, 0, 0, cfg.num_gpu_blocks * cfg.block_size)
                views.append(self.front.replica_view(s.replica_id, s.pool, s.state, s.metrics or empty))  # type: ignore[arg-type]
        per = {name: cfg.gpus_per_replica for name, cfg in self.pools.items()}
        return self.front.observe(self.now(), self.cfg.control_interval_s, views,
                                  {name: len(q) for name, q in self.pending.items()}, per,
                                  sum(cfg.capacity * per[name] for name, cfg in self.pools.items()),
                                  sum(self._free(name) * per[name] for name in self.pools))

    async def _controller(self) -> None:
        assert self.scaler is not None
        while True:
            await asyncio.sleep(self.cfg.control_interval_s)
            action = self.scaler.decide(self._observe())
            for pool, want in sorted(action.target_replicas.items()):
                if pool not in self.pools:
                    raise ValueError(f"scaler {type(self.scaler).__name__} targets pool '{pool}'; the real "
                                     f"executor serves the pools {sorted(self.pools)} (RealConfig.pool)")
                self._scale_to(pool, want)

    def _scale_to(self, pool: str, want: int) -> None:
        active = [s for s in self.slots.values() if s.pool == pool and s.state in ("starting", "ready")]
        if want > len(active):
            free = self._free(pool)
            if want - len(active) > free:
                log.info("t=%.1f pool %s: scaler asked for %d replicas, only %d more fit; clamped", self.now(), pool,
                         want, free)
            for _ in range(min(want - len(active), free)):
                self._spawn(self._bring_up(self._start_replica(pool)))
        elif want < len(active):
            # Drain the least useful first: replicas still starting, then the least loaded ready ones.
            order = sorted(active, key=lambda s: (s.state != "starting", len(s.inflight), -s.replica_id))
            for s in order[: len(active) - max(want, 0)]:
                s.state = "draining"
                self._stop_if_idle(s)

    def _start_replica(self, pool: str) -> _Slot:
        if self.pools[pool].launch:
            return self._new_server(pool)
        slot = next(s for s in self.slots.values() if s.pool == pool and s.state == "stopped")  # an idle attached one
        slot.state, slot.start_s = "starting", self.now()
        return slot

    # --- results -------------------------------------------------------------------------------------
    def result(self) -> RealResult:
        requests = self.front.results()
        servers = [(s.replica_id, s.pool, s.url, s.server.pid if s.server else -1,
                    s.server.placement if s.server else "", s.start_s, s.ready_s, s.stop_s, s.state)
                   for s in self.slots.values()]
        engine = []
        for s in self.slots.values():
            for phase, (total, n) in s.latency.items():  # this run's share: the latest sums less the first
                total0, n0 = (s.latency_first or {}).get(phase, (0.0, 0))
                engine.append((s.replica_id, phase, total - total0, n - n0))
        return RealResult(
            requests=requests, jobs=job_table(requests),
            timeseries=pd.DataFrame(self.ts_rows, columns=TIMESERIES_COLUMNS),
            cluster=pd.DataFrame(self.cl_rows, columns=CLUSTER_COLUMNS),
            failures=pd.DataFrame(self.failure_rows, columns=FAILURE_COLUMNS),
            servers=pd.DataFrame(servers, columns=SERVER_COLUMNS),
            token_times=pd.DataFrame(self.token_rows, columns=["request_id", "t"]),
            engine=pd.DataFrame(engine, columns=ENGINE_COLUMNS),
            pools=self.pools,
        )
