"""Replay a canonical workload on real vLLM servers, in wall-clock time: the real backend of ``frontend.FrontEnd``.

The front end (release, routing, scaling, sampling, results) is the simulator's own; what is real here is
how time passes (asyncio in wall-clock time) and how a call is served (a streaming HTTP call to a vLLM
server that we launched, or one we attached to). Replica state comes from each server's ``/metrics``,
scraped every ``scrape_interval_s``.

Several pools (``execute(table, [cfg_a, cfg_b], ..., agent_pools={"linter": "b"})``): each ``RealConfig`` is
one pool of replicas (its own model, engine arguments and devices), calls go to their agent's pool as in the
simulator's ``ClusterConfig.agent_pools`` (others to the first pool), and the scaler's targets name pools.

A replica that dies mid-run (its process exits, or its /health stops answering after a call or a
scrape failed) is taken out of routing; its in-flight calls are marked failed, or re-routed when
``retry_failed`` is set. Every such event is a row of ``Results.failures``: nothing is lost silently.

A system's engine mechanisms: priority scheduling runs on vLLM's own (``--scheduling-policy priority`` on the
servers, each call's ``priority`` in its request), and a prefetch is a real one-token call of the prefix
(``Results.prefetches``). vLLM 0.32 cannot pin KV blocks, cap an agent's KV share or admit by predicted KV need
(its ``kv_hints`` reach only the KV-offloading connector, ``session_id`` only the KV events): a run asked for one
of those says so once in an "unsupported" row of ``Results.failures`` and goes on without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import aiohttp
import pandas as pd

from frontend.core import FrontEnd, PoolSpec, Replica
from frontend.ledger import ReplicaMetrics
from frontend.results import ENGINE_COLUMNS, PREFETCH_COLUMNS, SERVER_COLUMNS, TOKEN_TIME_COLUMNS, Results
from policies.api import NO_HOOKS, Hooks, Prefetch, RequestInfo, Router, Scaler
from real.client import CallError, fetch_text, stream_completion
from real.config import RealConfig, pools_of
from real.launcher import Launcher, Server, ServerStartError, probe, stop_server
from real.metrics import latency_sums, replica_metrics
from real.tokens import prompt_token_ids
from traces.schema import validate

log = logging.getLogger(__name__)


@dataclass
class _Server:
    """A replica's server: one we launched, or one we attached to (``Replica.handle``)."""

    url: str
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
            agent_pools: Mapping[str, str] | None = None, hooks: Hooks = NO_HOOKS) -> Results:
    """Replay ``table`` on real vLLM servers (launched from ``cfg``, or ``cfg.urls``) and return the results.

    ``cfg`` is one pool, or a sequence of pools with distinct ``RealConfig.pool`` names and devices;
    ``agent_pools`` maps an agent to its pool (other agents: the first pool), as ``ClusterConfig.agent_pools``.

    ``time_scale`` stretches the trace's clock: a call at ``arrival_s`` is released at ``arrival_s *
    time_scale`` wall seconds after all initial replicas are ready (t=0), and think times scale alike;
    control and scrape intervals are wall time. Result times are wall seconds since t=0. Calls with
    ``output_tokens`` 0 generate one token (vLLM's minimum). Launched servers are stopped on every exit path.
    ``hooks``: a system's per-call policies (``policies.systems.make_system``); its engine arguments go in each
    ``RealConfig.engine``.
    """
    validate(table, "execute(table)")
    if not time_scale > 0:
        raise ValueError(f"time_scale={time_scale} must be > 0")
    agent_pools = agent_pools or {}
    pools = pools_of(cfg, agent_pools)
    first = next(iter(pools.values()))
    run = _Run(table, pools, router, scaler, time_scale, agent_pools, hooks)
    launch = any(c.launch for c in pools.values())
    with Launcher(first.log_dir or None) if launch else contextlib.nullcontext() as launcher:
        run.launcher = launcher
        asyncio.run(run.main())
    return run.result()


class _Run:
    """One real run: the ``Backend`` of its ``FrontEnd``, and the asyncio tasks that drive it."""

    def __init__(self, table: pd.DataFrame, pools: dict[str, RealConfig], router: Router, scaler: Scaler | None,
                 time_scale: float, agent_pools: Mapping[str, str], hooks: Hooks):
        self.pools, self.time_scale = pools, time_scale
        self.cfg = next(iter(pools.values()))  # the executor settings (EXECUTOR_FIELDS), equal in every pool
        self.launcher: Launcher | None = None
        self.vocab_size = {name: c.resolved_vocab_size() for name, c in pools.items()}
        specs = [PoolSpec(name, c.gpus_per_replica, c.resolved_max_model_len()) for name, c in pools.items()]
        self.front = FrontEnd(table, specs, router, scaler, self, agent_pools=agent_pools,
                              control_interval_s=self.cfg.control_interval_s, time_policies=True,
                              source="execute(table)", hooks=hooks)
        self.front.on_call_done = self._call_done
        self.tasks: set[asyncio.Task] = set()
        self.error: BaseException | None = None
        self.token_rows: list[tuple[int, float]] = []
        self.prefetch_rows: list[list] = []  # PREFETCH_COLUMNS
        self._told: set[str] = set()  # mechanisms a notice was written for
        self.t0 = 0.0

    # --- clock and task supervision ----------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - self.t0

    def after(self, delay_s: float, fn: Callable[[], None]) -> None:
        """``fn`` after ``delay_s`` seconds of the workload's clock (stretched by ``time_scale``)."""
        async def wait() -> None:
            await asyncio.sleep(delay_s * self.time_scale)
            fn()

        self._spawn(wait())

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

    def _call_done(self, request_id: int) -> None:
        if self.front.all_done:
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
                for rep in self.front.replicas.values():
                    rep.handle.start_s, rep.handle.ready_s = rep.handle.start_s - shift, rep.handle.ready_s - shift
                for name, cfg in self.pools.items():
                    for arg in cfg.engine.simulator_only():
                        self._unsupported(f"EngineArgs.{arg}",
                                          f"pool '{name}': EngineArgs.{arg} has no vLLM 0.32 counterpart; the servers "
                                          "run without it (simulator-only)")
                self._spawn(self._arrivals())
                self._spawn(self._scraper())
                if self.front.scaler is not None or self.front.hooks.gate is not None:
                    self._spawn(self._controller())
                if self.front.all_done:
                    self.done.set()
                await self.done.wait()
                if self.error is None:  # the servers' own latency sums, now that every call has finished
                    await asyncio.gather(*(self._scrape(r) for r in self.front.replicas.values()
                                           if r.state in ("ready", "draining")))
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
            attached = [self.front.add_replica(name, _Server(url.rstrip("/")), "stopped") for url in cfg.urls]
            for rep in attached[: cfg.num_replicas]:
                rep.state, rep.handle.start_s = "starting", self.now()
        starting = [r for r in self.front.replicas.values() if r.state == "starting"]
        await asyncio.gather(*(self._bring_up(r, initial=True) for r in starting))

    def _new_server(self, pool: str) -> Replica:
        """Launch one server of ``pool`` on its least used core or GPU group (a dead server's is reused)."""
        assert self.launcher is not None
        cfg = self.pools[pool]
        used = [r.handle.server.placement for r in self.front.replicas.values()
                if r.pool == pool and r.handle.server and r.state not in ("stopped", "dead")]
        server = self.launcher.spawn_vllm(cfg, min(cfg.placements, key=used.count))
        return self.front.add_replica(pool, _Server(server.url, server, start_s=self.now()), "starting")

    async def _bring_up(self, rep: Replica, initial: bool = False) -> None:
        """Wait for /health, take a first scrape, then serve. Failure: error at start, a failure row later."""
        s = rep.handle
        proc = s.server.proc if s.server else None
        deadline = time.monotonic() + (self.pools[rep.pool].startup_timeout_s if s.server else 10.0)
        while (state := await asyncio.to_thread(probe, s.url, proc)) != "ready":
            if rep.state != "starting":
                return  # drained before it came up
            if state == "exited" or time.monotonic() > deadline:
                what = (f"exited with code {proc.returncode}" if state == "exited"
                        else "did not answer /health in time")
                detail = f"replica {rep.replica_id} at {s.url} {what}"
                if s.server:
                    detail += f"; last log lines ({s.server.log_path}):\n{s.server.log_tail()}"
                if initial:
                    raise ServerStartError(detail)
                self.front.failure("start_failed", rep.replica_id, -1, detail)
                self.front.retire(rep, "dead")
                self.front.recheck_pending(rep.pool)
                return
            await asyncio.sleep(0.5)
        if rep.state != "starting":
            return
        self._read_metrics(s, await fetch_text(self.session, f"{s.url}/metrics"))
        s.ready_s = self.now()
        self.front.replica_ready(rep)

    async def _alive(self, rep: Replica) -> bool:
        s = rep.handle
        return await asyncio.to_thread(probe, s.url, s.server.proc if s.server else None, 5.0) == "ready"

    async def _suspect(self, rep: Replica, reason: str) -> None:
        """A call or scrape failed at the transport level: if the server is gone, retire it."""
        if rep.state not in ("dead", "stopped") and not await self._alive(rep):
            self._replica_died(rep, reason)

    def _replica_died(self, rep: Replica, reason: str) -> None:
        if rep.state in ("dead", "stopped"):
            return
        log.warning("replica %d (%s) died: %s", rep.replica_id, rep.handle.url, reason)
        self.front.failure("replica_died", rep.replica_id, -1, reason)
        victims = list(rep.handle.inflight.items())
        rep.handle.inflight.clear()
        self.front.retire(rep, "dead")
        for rid, task in victims:
            if task is not asyncio.current_task():
                task.cancel()
            self.front.call_failed(rid, rep.replica_id, f"replica {rep.replica_id} died: {reason}",
                                   retry=self.cfg.retry_failed)
        self.front.recheck_pending(rep.pool)

    # --- Backend ---------------------------------------------------------------------------------------
    def start_replica(self, pool: str) -> Replica:
        if self.pools[pool].launch:
            rep = self._new_server(pool)
        else:  # an idle attached server
            rep = next(r for r in self.front.replicas.values() if r.pool == pool and r.state == "stopped")
            rep.state, rep.handle.start_s = "starting", self.now()
        self._spawn(self._bring_up(rep))
        return rep

    def startable(self, pool: str) -> int:
        """Spare cores or GPU groups, or idle attached servers."""
        reps = [r for r in self.front.replicas.values() if r.pool == pool]
        if self.pools[pool].launch:
            return self.pools[pool].capacity - sum(r.state in ("starting", "ready", "draining") for r in reps)
        return sum(r.state == "stopped" for r in reps)

    def gpus(self) -> tuple[int, int]:
        per = {name: cfg.gpus_per_replica for name, cfg in self.pools.items()}
        return (sum(cfg.capacity * per[name] for name, cfg in self.pools.items()),
                sum(self.startable(name) * per[name] for name in self.pools))

    def send(self, replica: Replica, info: RequestInfo, output_tokens: int, priority: int = 0) -> None:
        replica.handle.inflight[info.request_id] = self._spawn(self._serve(replica, info, output_tokens, priority))

    def pin(self, replica: Replica, info: RequestInfo, ttl_s: float) -> None:
        self._unsupported("pin", "a retention policy asked to pin KV blocks; vLLM 0.32 cannot pin or hold blocks "
                                 "for a time-to-live, so no call was pinned (simulator-only)")

    def set_quotas(self, pool: str, quotas: Mapping[str, float]) -> None:
        self._unsupported("quotas", f"pool '{pool}': the scaler set per-agent KV quotas {dict(quotas)}; vLLM 0.32 has "
                                    "no per-tenant KV limit, so none was applied (simulator-only)")

    def _unsupported(self, what: str, detail: str) -> None:
        """One notice row per mechanism the servers cannot do (never faked)."""
        if what not in self._told:
            self._told.add(what)
            log.warning(detail)
            self.front.failure("unsupported", -1, -1, detail)

    def prefetch(self, replica: Replica, prefetch: Prefetch) -> None:
        """A real one-token call of the prefix (its own request id below 0), recorded in ``Results.prefetches``."""
        row = [self.now(), replica.replica_id, prefetch.num_tokens, 0, math.nan]
        self.prefetch_rows.append(row)
        rid = -len(self.prefetch_rows)
        prompt = prompt_token_ids(prefetch.block_hashes, prefetch.hash_block_size, prefetch.num_tokens, rid,
                                  self.vocab_size[replica.pool])

        async def call() -> None:
            try:
                out = await stream_completion(self.session, replica.handle.url, prompt, 1, self.now)
            except CallError as e:
                self.front.failure("call_failed", replica.replica_id, rid, f"prefetch: {e}")
                return
            row[3], row[4] = out.cached_tokens, out.finish_s

        self._spawn(call())

    def metrics(self, replica: Replica) -> ReplicaMetrics:
        s = replica.handle
        if s.metrics is not None:
            return s.metrics
        capacity = (self.pools[replica.pool].engine.num_gpu_blocks_override or 0) * \
            self.pools[replica.pool].engine.block_size
        return ReplicaMetrics(0, 0, 0.0, 0, 0, 0, capacity)  # not scraped yet

    def num_unfinished(self, replica: Replica) -> int:
        return len(replica.handle.inflight)

    def stop_replica(self, replica: Replica) -> None:
        """Stop serving from the replica; a launched server is shut down in the background."""
        s = replica.handle
        s.stop_s = self.now()
        if s.server is not None:
            self._spawn(asyncio.to_thread(stop_server, s.server))

    # --- calls ---------------------------------------------------------------------------------------
    async def _arrivals(self) -> None:
        infos = self.front.graph.infos
        for rid in self.front.graph.roots:
            delay = infos[rid].arrival_s * self.time_scale - self.now()
            if delay > 0:
                await asyncio.sleep(delay)
            self.front.release(rid)

    async def _serve(self, rep: Replica, info: RequestInfo, output_tokens: int, priority: int) -> None:
        s, rid = rep.handle, info.request_id
        prompt = prompt_token_ids(info.block_hashes, info.hash_block_size, info.input_tokens, rid,
                                  self.vocab_size[info.pool])
        try:
            out = await stream_completion(self.session, s.url, prompt, max(output_tokens, 1), self.now, priority)
        except CallError as e:
            if e.transport:
                await self._suspect(rep, str(e))
            if s.inflight.pop(rid, None) is not None:  # not already handled as part of a replica death
                self.front.call_failed(rid, rep.replica_id, str(e), retry=False)
            return
        if s.inflight.pop(rid, None) is None:
            return
        if self.cfg.record_token_times:
            self.token_rows.extend((rid, t) for t in out.token_times)
        self.front.first_token(rid, out.first_token_s)
        self.front.call_finished(rid, out.finish_s, cached_tokens=out.cached_tokens)

    # --- metrics, control ----------------------------------------------------------------------------
    async def _scraper(self) -> None:
        while True:
            live = [r for r in self.front.replicas.values() if r.state in ("ready", "draining")]
            await asyncio.gather(*(self._scrape(r) for r in live))
            self.front.sample(self.now())
            await asyncio.sleep(self.cfg.scrape_interval_s)

    async def _scrape(self, rep: Replica) -> None:
        try:
            self._read_metrics(rep.handle, await fetch_text(self.session, f"{rep.handle.url}/metrics"))
        except CallError as e:
            if e.transport:
                await self._suspect(rep, str(e))

    @staticmethod
    def _read_metrics(s: _Server, text: str) -> None:
        s.metrics = replica_metrics(text, f"{s.url}/metrics")
        s.latency = latency_sums(text)
        if s.latency_first is None:
            s.latency_first = s.latency

    async def _controller(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.control_interval_s)
            if self.front.scaler is not None:
                self.front.control()
            if self.front.hooks.gate is not None:
                self.front.tick_gate()

    # --- results -------------------------------------------------------------------------------------
    def result(self) -> Results:
        reps = self.front.replicas.values()
        servers = [(r.replica_id, r.pool, r.handle.url, r.handle.server.pid if r.handle.server else -1,
                    r.handle.server.placement if r.handle.server else "", r.handle.start_s, r.handle.ready_s,
                    r.handle.stop_s, r.state) for r in reps]
        engine = []
        for r in reps:
            for phase, (total, n) in r.handle.latency.items():  # this run's share: the latest sums less the first
                total0, n0 = (r.handle.latency_first or {}).get(phase, (0.0, 0))
                engine.append((r.replica_id, phase, total - total0, n - n0))
        return self.front.results(
            self.pools, servers=pd.DataFrame(servers, columns=SERVER_COLUMNS),
            engine=pd.DataFrame(engine, columns=ENGINE_COLUMNS),
            token_times=pd.DataFrame(self.token_rows, columns=TOKEN_TIME_COLUMNS),
            prefetches=pd.DataFrame(self.prefetch_rows, columns=PREFETCH_COLUMNS))
