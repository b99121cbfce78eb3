"""One vLLM v1 replica as a SimPy process: the scheduler, the KV cache and step coalescing.

Each step follows ``vllm/v1/core/sched/scheduler.py``: first the RUNNING requests in order (a decode
token, or the next prefill chunk) within ``max_num_batched_tokens``; when KV blocks run out the newest
running request is preempted by recompute (blocks freed, back to the front of WAITING). Then, only if
nothing was preempted, WAITING requests FCFS while the token budget, ``max_num_seqs`` and the free
blocks allow, stopping at the first that does not fit. A prompt longer than the remaining budget is
chunked over steps; the step that completes a request's prefill produces its first token.

Step coalescing. A run of decode-only steps in which nothing can change the batch (no arrival, no
completion, no allocation failure, no change that could admit the waiting head) is advanced as one
SimPy event, with durations from ``cost.decode_step_times`` and the same float arithmetic as one
event per step. An arrival in the middle shortens the run to the step in progress, since vLLM admits
new requests at the next step boundary. The per-request results are bit-identical with coalescing on
or off (tests/test_engine.py checks this).

Event ordering. Step boundaries are scheduled at a priority after every ordinary SimPy event, so a
boundary sees all arrivals of the same instant whichever process produced them, and metrics read at
that instant (the cluster's sampler) see the state before the boundary, in both modes alike.

Time per token: only the first-token and finish times are stored; TPOT = (finish - first token) /
(output_len - 1), as vLLM computes it.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass, fields
from itertools import accumulate
from typing import Protocol

import numpy as np
import pandas as pd
import simpy

from frontend.engine_args import EngineArgs
from sim.kvcache import KVCache, extend_block_hashes
from traces.schema import validate

_BOUNDARY = 2  # SimPy priority of step boundaries: after URGENT (0) and NORMAL (1) events at the same time


class CostModel(Protocol):
    """The part of ``sim.costmodel.CostModel`` the engine uses."""

    def step_time(self, prefill: Sequence[tuple[int, int]], num_decode: int, decode_context_sum: int) -> float:
        """Seconds for one step; ``prefill`` holds (new_tokens, tokens_already_in_kv) per chunk."""
        ...

    def decode_step_times(self, num_decode: int, context_sum: int, k: int) -> np.ndarray:
        """``k`` decode-only steps (context sum grows by num_decode per step), bit-identical to step_time."""
        ...


@dataclass
class SimRequest:
    """One call as the engine receives it. ``output_len`` 0 is served as 1 token: vLLM always samples
    at least one (``max_tokens`` must be >= 1), and the real executor does the same."""

    request_id: int
    prompt_len: int
    output_len: int
    block_hashes: tuple[int, ...]
    hash_block_size: int


@dataclass
class RequestRecord:
    """One finished request. ``output_len`` counts the tokens generated (at least 1); ``num_cached_tokens``
    is the prefix-cache hit at the first scheduling, like vLLM's ``RequestOutput.num_cached_tokens``."""

    request_id: int
    replica_id: int
    arrival_s: float
    scheduled_s: float
    first_token_s: float
    finish_s: float
    prompt_len: int
    output_len: int
    num_cached_tokens: int
    num_preemptions: int


RECORD_COLUMNS = [f.name for f in fields(RequestRecord)]


class _Seq:
    """The engine's state of one request (vLLM's ``Request``)."""

    __slots__ = ("req", "max_tokens", "num_tokens", "num_output", "num_computed", "blocks", "num_cached_blocks",
                 "hashes", "arrival_s", "scheduled_s", "first_token_s", "num_cached_tokens", "num_preemptions")

    def __init__(self, req: SimRequest, now: float):
        self.req = req
        self.max_tokens = max(1, req.output_len)
        self.num_tokens = req.prompt_len  # prompt + generated so far
        self.num_output = 0
        self.num_computed = 0  # tokens whose KV is in blocks
        self.blocks: list[int] = []  # block table
        self.num_cached_blocks = 0  # leading blocks registered in the prefix cache
        self.hashes: list[int] = []  # memoized chain hashes of full blocks
        self.arrival_s = now
        self.scheduled_s = -1.0
        self.first_token_s = -1.0
        self.num_cached_tokens = -1
        self.num_preemptions = 0

    def decoding(self) -> bool:
        """In the decode phase: one token to compute, and it is a generated one."""
        return self.num_output > 0 and self.num_computed + 1 == self.num_tokens


@dataclass
class _Window:
    """A planned run of coalesced decode-only steps, applied when it ends."""

    seqs: list[_Seq]  # the running requests, in running order
    groups: list[list[_Seq]]  # groups[i % block_size]: requests that need a new block in step i
    starts: list[float]  # start time of each step
    ends: list[float]  # end time of each step
    allocs: list[int]  # cumulative blocks allocated after each step
    k: int  # steps to apply


def _delay_to(now: float, t: float) -> float:
    """A delay d with ``now + d == t`` exactly, so an event lands on a precomputed time."""
    d = t - now
    while now + d < t:
        d = math.nextafter(d, math.inf)
    while now + d > t:
        d = math.nextafter(d, -math.inf)
    return d


class _StepBoundary(simpy.events.Event):
    """A timeout at priority ``_BOUNDARY`` (SimPy's Timeout always uses NORMAL)."""

    def __init__(self, env: simpy.Environment, delay: float):
        super().__init__(env)
        self._ok = True
        self._value = None
        env.schedule(self, _BOUNDARY, delay)


class Engine:
    """One vLLM engine. Metrics (``num_running``, ``num_waiting``, ``kv_usage``, ``prefix_cache_queries``,
    ``prefix_cache_hits``, ``num_preemptions``) are the /metrics equivalents, valid at any time."""

    def __init__(self, env: simpy.Environment, replica_id: int, cost: CostModel, args: EngineArgs,
                 num_gpu_blocks: int, *, coalesce_steps: bool = True,
                 on_finish: Callable[[RequestRecord], None] | None = None,
                 on_first_token: Callable[[int, float], None] | None = None):
        self.env, self.replica_id, self.cost, self.args = env, replica_id, cost, args
        self.coalesce_steps = coalesce_steps
        self.on_finish, self.on_first_token = on_finish, on_first_token
        self.kv = KVCache(num_gpu_blocks, args.block_size, args.enable_prefix_caching)
        self.num_gpu_blocks, self.block_size = num_gpu_blocks, args.block_size
        self.running: list[_Seq] = []
        self.waiting: deque[_Seq] = deque()
        self.prefix_cache_queries = 0  # tokens looked up at first schedulings (vllm:prefix_cache_queries)
        self.prefix_cache_hits = 0  # tokens found (vllm:prefix_cache_hits)
        self.num_preemptions = 0
        self.num_steps = 0  # engine steps simulated
        self.num_step_events = 0  # SimPy events they took (fewer than steps when coalescing)
        self._proc: simpy.Process | None = None
        self._window: _Window | None = None
        self._interruptible = False  # the process is waiting out a coalesced window
        self._last_lookup: tuple[_Seq, int, list[int]] | None = None  # (request, its num_tokens, cache hit)

    # --- metrics --------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def kv_usage(self) -> float:
        kv, w = self.kv, self._window
        if w is None:
            return kv.usage
        started = min(w.k, bisect_left(w.starts, self.env.now))  # steps whose blocks are allocated by now
        return 1.0 - (kv.num_free_blocks - (w.allocs[started - 1] if started else 0)) / kv.num_usable_blocks

    def num_unfinished(self) -> int:
        return len(self.running) + len(self.waiting)

    # --- requests -------------------------------------------------------------------------------
    def add_request(self, req: SimRequest) -> None:
        """Queue a request (arrival = now); it joins the batch at the next step boundary."""
        args = self.args
        max_tokens = max(1, req.output_len)
        need = -(-(req.prompt_len + max_tokens - 1) // args.block_size)
        if need > self.kv.num_usable_blocks:
            raise ValueError(
                f"request {req.request_id}: prompt_len={req.prompt_len} + output_len={max_tokens} needs {need} KV "
                f"blocks of {args.block_size} tokens, but replica {self.replica_id} holds only "
                f"{self.kv.num_usable_blocks} ({self.kv.num_usable_blocks * args.block_size} tokens); it could never "
                f"run. Use a GPU/model with more KV memory or drop the request")
        if not args.enable_chunked_prefill and req.prompt_len + max_tokens - 1 > args.max_num_batched_tokens:
            raise ValueError(
                f"request {req.request_id}: prompt_len={req.prompt_len} (+ {max_tokens - 1} generated tokens "
                f"to recompute after a preemption) exceeds max_num_batched_tokens={args.max_num_batched_tokens} "
                f"with chunked prefill disabled; enable chunked prefill or raise max_num_batched_tokens")
        self.waiting.append(_Seq(req, self.env.now))
        if self._proc is None:
            self._proc = self.env.process(self._run())
        elif self._interruptible:
            self._interruptible = False
            self._proc.interrupt()

    # --- the engine loop ------------------------------------------------------------------------
    def _run(self):
        env = self.env
        yield _StepBoundary(env, 0.0)  # start once every arrival of this instant is queued
        while self.running or self.waiting:
            w = self._plan_window() if self.coalesce_steps else None
            if w is None:
                batch = self._schedule()
                self.num_steps += 1
                self.num_step_events += 1
                yield _StepBoundary(env, self._step_time(batch))
                self._complete(batch)
                continue
            self._window = w
            self._interruptible = True
            try:
                yield _StepBoundary(env, _delay_to(env.now, w.ends[w.k - 1]))
            except simpy.Interrupt:
                # An arrival: finish the step in progress (or the one ending right now), then reschedule.
                w.k = bisect_left(w.ends, env.now, 0, w.k) + 1
                yield _StepBoundary(env, _delay_to(env.now, w.ends[w.k - 1]))
            self._interruptible = False
            self._window = None
            self.num_steps += w.k
            self.num_step_events += 1
            self._apply_window(w)
        self._proc = None

    def _schedule(self) -> list[tuple[_Seq, int]]:
        """One vLLM ``Scheduler.schedule()``: (request, tokens to compute) for this step."""
        args, bs = self.args, self.block_size
        budget = args.max_num_batched_tokens
        running = self.running
        batch: list[tuple[_Seq, int]] = []
        preemptions = self.num_preemptions
        i = 0
        while i < len(running) and budget > 0:
            s = running[i]
            n = s.num_tokens - s.num_computed
            if n > budget:
                n = budget
            if not self._allocate_or_preempt(s, n):
                break
            batch.append((s, n))
            budget -= n
            i += 1
        if self.num_preemptions > preemptions:  # vLLM admits no waiting request in a step that preempted
            return batch
        waiting = self.waiting
        while waiting and budget > 0 and len(running) < args.max_num_seqs:
            s = waiting[0]
            hit = self._lookup(s)
            hit_tokens = len(hit) * bs
            n = s.num_tokens - hit_tokens
            if not args.enable_chunked_prefill and n > budget:
                break
            n = min(n, budget)
            if not self._allocate(s, hit_tokens, n, hit):
                break
            waiting.popleft()
            running.append(s)
            s.num_computed = hit_tokens
            if s.num_cached_tokens < 0:
                s.scheduled_s = self.env.now
                s.num_cached_tokens = hit_tokens
                if args.enable_prefix_caching:
                    self.prefix_cache_queries += s.num_tokens
                    self.prefix_cache_hits += hit_tokens
            batch.append((s, n))
            budget -= n
        return batch

    def _lookup(self, s: _Seq) -> list[int]:
        """vLLM ``get_computed_blocks``: cached prefix blocks, leaving at least the last token to compute."""
        if not self.args.enable_prefix_caching:
            return []
        kv = self.kv
        max_blocks = (s.num_tokens - 1) // self.block_size
        if len(s.hashes) < max_blocks:
            extend_block_hashes(s.hashes, s.req, self.block_size, max_blocks)
        # A blocked head is looked up at every boundary; reuse the last result while it provably holds.
        last = self._last_lookup
        if last is not None and last[0] is s and last[1] == s.num_tokens and not kv.watch_evicted:
            hit = last[2]
            if len(hit) == max_blocks or s.hashes[len(hit)] not in kv.cached:
                return hit
        hit = kv.find_longest_cache_hit(s.hashes, s.num_tokens - 1)
        kv.watch(hit)  # from here on the cache flags any eviction of these blocks
        self._last_lookup = (s, s.num_tokens, hit)
        return hit

    def _allocate(self, s: _Seq, num_computed: int, n: int, hit: Sequence[int] = ()) -> bool:
        """vLLM ``allocate_slots``: blocks for ``num_computed + n`` tokens, then cache the full ones."""
        total = num_computed + n
        if hit or -(-total // self.block_size) > len(s.blocks):  # most decode steps need no new block
            if not self.kv.allocate_slots(s.blocks, total, hit):
                return False
            if hit:
                s.num_cached_blocks = len(hit)
        self._cache_full_blocks(s, (total if total < s.num_tokens else s.num_tokens) // self.block_size)
        return True

    def _cache_full_blocks(self, s: _Seq, num_full: int) -> None:
        """Register the request's blocks that are full by now (vLLM does it when it allocates them)."""
        if num_full > s.num_cached_blocks and self.args.enable_prefix_caching:
            if len(s.hashes) < num_full:
                extend_block_hashes(s.hashes, s.req, self.block_size, num_full)
            self.kv.cache_full_blocks(s.blocks, s.hashes, s.num_cached_blocks, num_full)
            s.num_cached_blocks = num_full

    def _allocate_or_preempt(self, s: _Seq, n: int) -> bool:
        """Blocks for running request ``s``, preempting the newest running requests until they fit;
        False when ``s`` itself had to go."""
        while not self._allocate(s, s.num_computed, n):
            victim = self.running.pop()
            self._preempt(victim)
            if victim is s:
                return False
        return True

    def _preempt(self, s: _Seq) -> None:
        """Preemption by recompute: free the blocks, back to the front of the waiting queue."""
        self.kv.free_blocks(s.blocks)
        s.blocks = []
        s.num_cached_blocks = 0
        s.num_computed = 0
        s.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(s)

    def _step_time(self, batch: list[tuple[_Seq, int]]) -> float:
        prefill: list[tuple[int, int]] = []
        num_decode = context_sum = 0
        for s, n in batch:
            if n == 1 and s.decoding():
                num_decode += 1
                context_sum += s.num_tokens  # tokens the new query attends to, itself included
            else:
                prefill.append((n, s.num_computed))
        return float(self.cost.step_time(prefill, num_decode, context_sum))

    def _complete(self, batch: list[tuple[_Seq, int]]) -> None:
        """vLLM ``update_from_output``: advance each request, emit tokens, finish the done ones."""
        now = self.env.now
        done: list[_Seq] = []
        for s, n in batch:
            s.num_computed += n
            if s.num_computed == s.num_tokens:  # caught up: this step sampled a token
                s.num_output += 1
                s.num_tokens += 1
                if s.first_token_s < 0:
                    s.first_token_s = now
                    if self.on_first_token is not None:
                        self.on_first_token(s.req.request_id, now)
                if s.num_output >= s.max_tokens:
                    done.append(s)
        self._finish_done(done)

    def _finish_done(self, done: list[_Seq]) -> None:
        """Remove finished requests, free their blocks, then report them (callbacks see the new state)."""
        if not done:
            return
        self.running = [s for s in self.running if s.num_output < s.max_tokens]
        now = self.env.now
        for s in done:
            self.kv.free_blocks(s.blocks)
            s.blocks = []
        if self.on_finish is not None:
            for s in done:
                r = s.req
                self.on_finish(RequestRecord(r.request_id, self.replica_id, s.arrival_s, s.scheduled_s,
                                             s.first_token_s, now, r.prompt_len, s.max_tokens, s.num_cached_tokens,
                                             s.num_preemptions))

    # --- step coalescing ------------------------------------------------------------------------
    def _plan_window(self) -> _Window | None:
        """The longest run of decode-only steps, from now, whose batch nothing can change; None if < 2."""
        args, kv, bs = self.args, self.kv, self.block_size
        running = self.running
        num = len(running)
        if num == 0 or num > args.max_num_batched_tokens or not all(s.decoding() for s in running):
            return None
        k = min(s.max_tokens - s.num_output for s in running)  # the last step is the first completion
        if k < 2:
            return None
        # Step i allocates a block for each request whose computed tokens fill a block; in running order.
        groups: list[list[_Seq]] = [[] for _ in range(bs)]
        for s in running:
            groups[-s.num_computed % bs].append(s)
        free = kv.num_free_blocks
        allocs: list[int] = []
        total = 0
        for i in range(k):
            total += len(groups[i % bs])
            if total > free:  # step i would preempt
                k = i
                break
            allocs.append(total)
        if k >= 2 and self.waiting:
            k = self._steps_waiting_head_stays_blocked(k, allocs)
        if k < 2:
            return None
        ctx = sum(s.num_tokens for s in running)
        durations = self.cost.decode_step_times(num, ctx, k).tolist()
        starts = list(accumulate(durations, initial=self.env.now))
        return _Window(list(running), groups, starts[:-1], starts[1:], allocs[:k], k)

    def _steps_waiting_head_stays_blocked(self, k: int, allocs: list[int]) -> int:
        """How many of the next ``k`` decode steps leave the waiting head unschedulable (0 if the first
        does not). Within a decode-only run the free queue only shrinks and the head's needs stay put
        until a step evicts one of its cache hits. Tail-first freeing means such an eviction usually
        lowers need and supply alike, but not provably always (duplicate blocks), so the run stops there."""
        args, kv = self.args, self.kv
        budget = args.max_num_batched_tokens - len(self.running)
        if budget <= 0 or len(self.running) >= args.max_num_seqs:
            return k  # not even tried: nothing in a decode-only run changes that
        s = self.waiting[0]
        hit = self._lookup(s)  # also makes the head's hits the cache's watched blocks
        if hit:  # the first step whose allocations evict one of the head's hits ends the run before it
            k = bisect_right(allocs, kv.first_watched_in_free_queue(allocs[k - 1]), 0, k)
            if k == 0:
                return 0
        hit_tokens = len(hit) * self.block_size
        n = s.num_tokens - hit_tokens
        if not args.enable_chunked_prefill and n > budget:
            return k
        need = kv.num_blocks_to_allocate(0, hit_tokens + min(n, budget), hit)
        return k if need > kv.num_free_blocks - allocs[0] else 0

    def _apply_window(self, w: _Window) -> None:
        """Advance the window's requests by ``w.k`` decode steps, allocating in per-step order."""
        bs, k = self.block_size, w.k
        order = [s for i in range(k) for s in w.groups[i % bs]]  # per-step allocation order
        for s, b in zip(order, self.kv.take_free_blocks(len(order)), strict=True):
            s.blocks.append(b)
        for s in w.seqs:
            s.num_computed += k
            s.num_output += k
            s.num_tokens += k
            self._cache_full_blocks(s, s.num_computed // bs)
        self._finish_done([s for s in w.seqs if s.num_output >= s.max_tokens])


def simulate_replica(table: pd.DataFrame, cost: CostModel, args: EngineArgs, coalesce: bool = True) -> pd.DataFrame:
    """Replay a canonical table (arrival_s, ignoring parents) on one replica with ``args.num_gpu_blocks_override``
    KV blocks; one row per request (RequestRecord fields), in table order."""
    validate(table, "simulate_replica(table)")
    if args.num_gpu_blocks_override is None:
        raise ValueError("simulate_replica: set EngineArgs.num_gpu_blocks_override (a lone replica has no GPU to "
                         "size its KV cache from)")
    env = simpy.Environment()
    records: list[RequestRecord] = []
    replica = Engine(env, 0, cost, args, args.num_gpu_blocks_override, coalesce_steps=coalesce,
                      on_finish=records.append)
    reqs = [SimRequest(int(r), int(p), int(o), tuple(h), int(b)) for r, p, o, h, b in zip(
        table["request_id"], table["input_tokens"], table["output_tokens"], table["block_hashes"],
        table["hash_block_size"], strict=True)]
    arrival = table["arrival_s"].to_numpy(dtype=np.float64)
    order = np.argsort(arrival, kind="stable").tolist()

    def arrivals():
        for k in order:
            t = float(arrival[k])
            if t > env.now:
                yield env.timeout(_delay_to(env.now, t))
            replica.add_request(reqs[k])

    env.process(arrivals())
    env.run()
    out = pd.DataFrame([astuple(r) for r in records], columns=RECORD_COLUMNS)
    pos = {rid: i for i, rid in enumerate(table["request_id"].tolist())}
    return out.iloc[np.argsort([pos[r] for r in out["request_id"]], kind="stable")].reset_index(drop=True)
