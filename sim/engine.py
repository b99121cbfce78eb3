"""One vLLM v1 replica driven by SimPy events: the scheduler, the KV cache and step coalescing.

Each step follows ``vllm/v1/core/sched/scheduler.py``: first the RUNNING requests in order (a decode
token, or the next prefill chunk) within ``max_num_batched_tokens``; when KV blocks run out the newest
running request is preempted by recompute (blocks freed, back to the front of WAITING). Then, only if
nothing was preempted, WAITING requests FCFS while the token budget, ``max_num_seqs`` and the free
blocks allow, stopping at the first that does not fit. A prompt longer than the remaining budget is
chunked over steps; the step that completes a request's prefill produces its first token.

Step coalescing. A run of steps whose batches are known in advance (no arrival, no completion, no
allocation failure, no change that could admit the waiting head; decodes only, or decodes beside one
prompt being prefilled in chunks) is advanced as one SimPy event, with durations from the cost model
and the same float arithmetic as one event per step. An arrival in the middle shortens the run to the
step in progress, since vLLM admits new requests at the next step boundary. The per-request results
are bit-identical with coalescing on or off (tests/test_engine.py checks this).

Event ordering. The engine is a chain of step boundaries (``_step_ended``), scheduled at a priority
after every ordinary SimPy event, so a boundary sees all arrivals of the same instant whichever
process produced them, and metrics read at that instant (the cluster's sampler) see the state before
the boundary, in both modes alike.

Steady decodes. Most of a step is running requests that decode one token each. The leading run of
them in running order (``_steady``) advances as a group: each keeps its counters as of the step it
joined (``_Seq.t0``), the engine counts steps (``tick``), and only what differs per request is touched
one by one: a new KV block every ``block_size`` steps (counted per step residue) and the step a
request finishes (indexed by step). A step then costs O(1) for all of them, plus the other running
requests (prefills), which take the per-request path in running order (``_rest``). When the group
cannot advance as one (fewer tokens in the budget than decodes, or too few free blocks, so someone
will be preempted) it is dissolved into ``_rest`` for that step and the per-request path decides
exactly as vLLM would; it re-forms afterwards.

Prefix caching touches only blocks another request could hit: the full blocks whose content trace ids
name that some other call of the workload shares (``SimRequest.shared_ids``). A request's other blocks
are registered when it is preempted, the only time anyone (itself) can look them up (``sim.kvcache``).

Time per token: only the first-token and finish times are stored; TPOT = (finish - first token) /
(output_len - 1), as vLLM computes it.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from heapq import heappop, heappush
from itertools import accumulate, cycle, islice
from typing import Protocol

import numpy as np
import pandas as pd
import simpy

from frontend.engine_args import EngineArgs
from sim.kvcache import BlockTable, KVCache, extend_block_hashes, shared_prefix_ids
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
    shared_ids: int | None = None  # leading block_hashes other requests have too (None: maybe all of them)
    priority: int = 0  # vLLM's request priority (scheduling_policy "priority": lower first, ties by arrival)
    predicted_output: int = -1  # the front end's output-length hint (admission_policy "predicted"); -1: unknown
    agent: str = ""  # whose KV quota its blocks count against (EngineArgs.kv_quotas, Engine.set_quotas)


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
    """The engine's state of one request (vLLM's ``Request``). While it is a steady decode its counters hold
    as of step ``t0`` and the engine's ``tick`` says how far it really is (``Engine._sync``)."""

    __slots__ = ("req", "max_tokens", "num_tokens", "num_output", "num_computed", "table", "num_shareable",
                 "hashes", "arrival_s", "scheduled_s", "first_token_s", "num_cached_tokens", "num_preemptions",
                 "order", "t0", "bucket")

    def __init__(self, req: SimRequest, now: float, block_size: int, caching: bool):
        self.req = req
        self.max_tokens = max(1, req.output_len)
        self.num_tokens = req.prompt_len  # prompt + generated so far
        self.num_output = 0
        self.num_computed = 0  # tokens whose KV is in blocks
        self.table = BlockTable()
        # Leading full blocks whose content trace ids shared with other requests name: the only ones another
        # request can hit.
        shared = len(req.block_hashes) if req.shared_ids is None else req.shared_ids
        self.num_shareable = min(req.prompt_len, shared * req.hash_block_size) // block_size if caching else 0
        self.hashes: list[int] = []  # memoized chain hashes of full blocks
        self.arrival_s = now
        self.scheduled_s = -1.0
        self.first_token_s = -1.0
        self.num_cached_tokens = -1
        self.num_preemptions = 0
        self.order = 0  # position in running order (increases with every admission)
        self.t0 = 0  # steady decodes: the tick its counters hold at
        self.bucket = 0  # steady decodes: it needs a new block in the steps with tick % block_size == bucket

    def decoding(self) -> bool:
        """In the decode phase: one token to compute, and it is a generated one."""
        return self.num_output > 0 and self.num_computed + 1 == self.num_tokens


@dataclass(slots=True)
class _Window:
    """A planned run of coalesced steps, applied when it ends."""

    times: list[float]  # times[i]: start of step i; times[i + 1]: its end
    allocs: list[int]  # cumulative blocks allocated after each step
    k: int  # steps to apply
    prefill: _Seq | None  # the request prefilling in these steps, if any
    chunks: list[int]  # its tokens in each step


def _delay_to(now: float, t: float) -> float:
    """A delay d with ``now + d == t`` exactly, so an event lands on a precomputed time."""
    d = t - now
    while now + d < t:
        d = math.nextafter(d, math.inf)
    while now + d > t:
        d = math.nextafter(d, -math.inf)
    return d


class _StepBoundary(simpy.events.Event):
    """A timeout at priority ``_BOUNDARY`` (SimPy's Timeout always uses NORMAL) that calls ``callback``."""

    def __init__(self, env: simpy.Environment, delay: float, callback: Callable[[simpy.events.Event], None]):
        self.env, self.callbacks, self._ok, self._value = env, [callback], True, None  # Event.__init__, triggered
        env.schedule(self, _BOUNDARY, delay)


class _PriorityWaiting:
    """vLLM's ``PriorityRequestQueue`` (scheduling_policy "priority"): waiting requests by (priority, arrival, request
    id), lowest first. A preempted request goes back by the same key: a priority queue has no front. Offers the part
    of ``deque``'s interface the engine uses, so the FCFS engine keeps its plain deque."""

    __slots__ = ("_heap",)

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, _Seq]] = []

    def append(self, s: _Seq) -> None:
        heappush(self._heap, (s.req.priority, s.arrival_s, s.req.request_id, s))

    appendleft = append

    def popleft(self) -> _Seq:
        return heappop(self._heap)[3]

    def __getitem__(self, i: int) -> _Seq:
        if i != 0:
            raise IndexError("a priority queue shows only its head")
        return self._heap[0][3]

    def __len__(self) -> int:
        return len(self._heap)


@dataclass(slots=True)
class _Pin:
    """Blocks of a finished call's prompt held until ``expiry_s`` (``Engine.pin``), known by its last block."""

    tail: int
    table: BlockTable
    start_s: float
    expiry_s: float


class Engine:
    """One vLLM engine. Metrics (``num_running``, ``num_waiting``, ``kv_usage``, ``prefix_cache_queries``,
    ``prefix_cache_hits``, ``num_preemptions``) are the /metrics equivalents, valid at any time.

    The running requests, in vLLM's running order, are ``_steady + _rest`` (see the module docstring)."""

    def __init__(self, env: simpy.Environment, replica_id: int, cost: CostModel, args: EngineArgs,
                 num_gpu_blocks: int, *, coalesce_steps: bool = True,
                 on_finish: Callable[[RequestRecord], None] | None = None,
                 on_first_token: Callable[[int, float], None] | None = None):
        self.env, self.replica_id, self.cost, self.args = env, replica_id, cost, args
        self.coalesce_steps = coalesce_steps
        self.on_finish, self.on_first_token = on_finish, on_first_token
        self.kv = KVCache(num_gpu_blocks, args.block_size, args.enable_prefix_caching)
        self.num_gpu_blocks, self.block_size = num_gpu_blocks, args.block_size
        self.waiting: deque[_Seq] | _PriorityWaiting = (
            _PriorityWaiting() if args.scheduling_policy == "priority" else deque())
        self._steady: dict[_Seq, None] = {}  # the leading steady decodes of the running requests, in order
        self._rest: list[_Seq] = []  # the other running requests, in running order
        self._new_blocks = [0] * args.block_size  # [i]: steady decodes that need a new block when tick % bs == i
        self._finishing: dict[int, list[_Seq]] = {}  # tick after a steady decode's last step -> those requests
        self._finish_ticks: list[int] = []  # the keys of _finishing, a heap
        self._context = 0  # sum of num_tokens over the steady decodes
        self._order = 0  # running-order counter
        self.tick = 0  # steps completed
        self.prefix_cache_queries = 0  # tokens looked up at first schedulings (vllm:prefix_cache_queries)
        self.prefix_cache_hits = 0  # tokens found (vllm:prefix_cache_hits)
        self.num_preemptions = 0
        self.num_steps = 0  # engine steps simulated
        self.num_step_events = 0  # SimPy events they took (fewer than steps when coalescing)
        self._boundary: _StepBoundary | None = None  # the end of the step or window in progress; None: idle
        self._batch: tuple[list[tuple[_Seq, int]], int] | None = None  # the step in progress (_schedule's)
        self._window: _Window | None = None  # or the coalesced steps in progress
        self._cuttable = False  # an arrival may still shorten the window to the step in progress
        self._last_lookup: tuple[_Seq, int, list[int]] | None = None  # (request, its num_tokens, cache hit)
        # The agent-serving mechanisms, each off unless a system asks for it (see the module docstring).
        self._predicted = args.admission_policy == "predicted"
        self._quotas: dict[str, int] = {}  # agent -> KV blocks its running requests may hold
        self._choose_victims = False  # preemption victims by priority or quota, not simply the newest
        self.set_quotas(args.kv_quotas or {})
        self._pins: dict[int, _Pin] = {}  # last pinned block -> its pin, oldest first
        self._commands: list[Callable[[], None]] = []  # changes to the KV cache that wait for the next step boundary
        self.pinned_block_s = 0.0  # pinned blocks x seconds held, of the pins released so far
        self.pinned_hit_tokens = 0  # prompt tokens of continuations that hit blocks a pin held
        self.pins = {"pinned": 0, "used": 0, "expired": 0, "yielded": 0}  # pins made, and how each one ended

    # --- metrics --------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self._steady) + len(self._rest)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def kv_usage(self) -> float:
        kv, w = self.kv, self._window
        if w is None:
            return kv.usage
        started = min(w.k, bisect_left(w.times, self.env.now, 0, len(w.times) - 1))  # steps allocated by now
        return 1.0 - (kv.num_free_blocks - (w.allocs[started - 1] if started else 0)) / kv.num_usable_blocks

    def num_unfinished(self) -> int:
        return len(self._steady) + len(self._rest) + len(self.waiting)

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
        self.waiting.append(_Seq(req, self.env.now, args.block_size, args.enable_prefix_caching))
        self._wake()

    def _wake(self) -> None:
        """Something the scheduler may act on arrived (a request, freed blocks): start stepping once every event of
        this instant is in, if idle; else end a coalesced run with the step in progress (vLLM acts on it at the next
        step boundary)."""
        env = self.env
        if self._boundary is None:  # idle: start once every arrival of this instant is queued
            self._boundary = _StepBoundary(env, 0.0, self._step_ended)
        elif self._cuttable:  # finish the step in progress (or the one ending right now), then reschedule
            self._cuttable = False
            w = self._window
            assert w is not None
            w.k = bisect_left(w.times, env.now, 1, w.k + 1)
            self._boundary = _StepBoundary(env, _delay_to(env.now, w.times[w.k]), self._step_ended)

    # --- agent-serving mechanisms (each off unless a system asks for it) ----------------------------
    def set_quotas(self, shares: dict[str, float]) -> None:
        """Cap each named agent's running requests at a share of the KV blocks: an agent at its cap waits (its
        requests are skipped, as vLLM skips one over its LoRA limit) and is preempted first. An agent with nothing
        running is always admitted, so no request waits for a quota it can never meet."""
        self._quotas = {agent: int(share * self.kv.num_usable_blocks) for agent, share in shares.items()}
        self._choose_victims = self.args.scheduling_policy == "priority" or bool(self._quotas)
        if self._boundary is not None:
            self._wake()  # seen from the next step boundary on, whether steps run one by one or coalesced

    def pin(self, req: SimRequest, ttl_s: float) -> None:
        """Continuum's retention: hold the cached blocks of ``req``'s prompt (a call that just ended) for ``ttl_s``
        seconds, so its continuation finds them after the tool call. Pinned blocks are not evicted and count as
        used. A pin ends when a request whose cache hit covers all of it (the continuation) is admitted, when it
        expires, or under memory pressure: the newest pin yields before a running request is preempted, or when
        nothing runs and the waiting head cannot fit. Pinning the same blocks again renews the pin. It takes hold
        at the next step boundary (at once when idle), where vLLM's engine loop would apply it."""
        if self._boundary is None:
            self._pin_now(req, ttl_s)
        else:
            self._commands.append(lambda: self._pin_now(req, ttl_s))
            self._wake()  # a coalesced run ends with the step in progress, as a run of single steps would see it

    def _pin_now(self, req: SimRequest, ttl_s: float) -> None:
        s = _Seq(req, self.env.now, self.block_size, self.args.enable_prefix_caching)
        if not s.num_shareable:
            return
        self._extend_hashes(s, s.num_shareable)
        hit = self.kv.find_longest_cache_hit(s.hashes[:s.num_shareable], s.num_shareable * self.block_size)
        if not hit:
            return
        old = self._pins.get(hit[-1])
        if old is not None:
            self._unpin(old, "expired")  # renewed below
        table = BlockTable()
        self.kv.allocate_slots(table, len(hit) * self.block_size, hit)  # hits only: always fits
        now = self.env.now
        pin = self._pins[hit[-1]] = _Pin(hit[-1], table, now, now + ttl_s)
        self.pins["pinned"] += 1
        self.env.timeout(ttl_s).callbacks.append(lambda _: self._expire(pin))

    def _expire(self, pin: _Pin) -> None:
        if self._pins.get(pin.tail) is not pin:
            return  # ended before its time
        if self._boundary is None:
            self._unpin(pin, "expired")
            return
        self._commands.append(lambda: self._pins.get(pin.tail) is pin and self._unpin(pin, "expired"))
        self._wake()  # released at the next step boundary, whether steps run one by one or coalesced

    def _unpin(self, pin: _Pin, why: str) -> None:
        del self._pins[pin.tail]
        self.pinned_block_s += pin.table.num_blocks * (self.env.now - pin.start_s)
        self.pins[why] += 1
        self.kv.free_blocks(pin.table)

    def _unpin_newest(self) -> None:
        self._unpin(next(reversed(self._pins.values())), "yielded")

    def _pins_used(self, hit: Sequence[int]) -> None:
        """A request that hit ``hit`` was admitted (it holds those blocks now): the pins it covers did their job."""
        pins = self._pins
        for b in hit:
            pin = pins.get(b)
            if pin is not None:
                self.pinned_hit_tokens += pin.table.num_blocks * self.block_size
                self._unpin(pin, "used")

    def pinned_block_seconds(self) -> float:
        """Pinned blocks x seconds, up to now (pins still held included)."""
        now = self.env.now
        return self.pinned_block_s + sum(p.table.num_blocks * (now - p.start_s) for p in self._pins.values())

    def _held(self, s: _Seq) -> int:
        """KV blocks running request ``s`` holds now (a steady decode's count is brought up to date lazily)."""
        if s in self._steady:
            return -(-(s.num_computed + self.tick - s.t0) // self.block_size)
        return s.table.num_blocks

    def _agent_blocks(self) -> dict[str, int]:
        used: dict[str, int] = {}
        for s in self._running():
            used[s.req.agent] = used.get(s.req.agent, 0) + self._held(s)
        return used

    def _running(self) -> list[_Seq]:
        return [*self._steady, *self._rest]

    def _over_quota(self, s: _Seq, num_tokens: int) -> bool:
        """Would admitting ``s`` with ``num_tokens`` in KV take its agent past its quota (while it runs others)?"""
        cap = self._quotas.get(s.req.agent)
        if cap is None:
            return False
        used = self._agent_blocks().get(s.req.agent, 0)
        return used > 0 and used + -(-num_tokens // self.block_size) > cap

    def _victim_index(self) -> int:
        """Whom to preempt among the running requests (all on the per-request path then): an agent over its quota
        first, then vLLM's choice: with priority scheduling the lowest priority, latest arrival (the first such
        in running order), else the newest."""
        running = self._rest
        pool: Sequence[int] = range(len(running))
        if self._quotas:
            used = self._agent_blocks()
            over = [j for j in pool if used[running[j].req.agent] > self._quotas.get(running[j].req.agent, 1 << 62)]
            pool = over or pool
        if self.args.scheduling_policy == "priority":
            return max(pool, key=lambda j: (running[j].req.priority, running[j].arrival_s))
        return pool[-1]

    def _rest_blocks(self, budget: int) -> int:
        """New blocks the per-request running requests take this step if no one is preempted."""
        bs, need = self.block_size, 0
        for s in self._rest:
            if budget <= 0:
                break
            n = min(s.num_tokens - s.num_computed, budget)
            need += max(0, -(-(s.num_computed + n) // bs) - s.table.num_blocks)
            budget -= n
        return need

    def _predicted_tokens(self, s: _Seq) -> int:
        """Tokens ``s`` is predicted to hold in KV: its prompt and its predicted output (its hint), or what it
        holds already if more."""
        return max(s.num_tokens, s.req.prompt_len + max(s.req.predicted_output, 0))

    def _predicted_growth(self) -> int:
        """Blocks the running requests are still predicted to take (admission_policy "predicted" keeps them free)."""
        bs = self.block_size
        return sum(max(0, -(-self._predicted_tokens(s) // bs) - self._held(s)) for s in self._running())

    # --- the engine loop ------------------------------------------------------------------------
    def _step_ended(self, event: simpy.events.Event) -> None:
        """A step boundary: apply the step or window that ended, then start the next one (or go idle)."""
        if event is not self._boundary:
            return  # the end of a window that an arrival shortened
        if self._window is not None:
            w, self._window, self._cuttable = self._window, None, False
            self.num_steps += w.k
            self.num_step_events += 1
            self._apply_window(w)
        elif self._batch is not None:
            (batch, num_steady), self._batch = self._batch, None
            self._complete(batch, num_steady)
        while self._commands:
            self._commands.pop(0)()
        if not (self._steady or self._rest or self.waiting):
            self._boundary = None
            return
        env = self.env
        w = self._plan_window() if self.coalesce_steps else None
        if w is None:
            self._batch = batch, num_steady = self._schedule()
            self.num_steps += 1
            self.num_step_events += 1
            self._boundary = _StepBoundary(env, self._step_time(batch, num_steady), self._step_ended)
        else:
            self._window, self._cuttable = w, True
            self._boundary = _StepBoundary(env, _delay_to(env.now, w.times[w.k]), self._step_ended)

    def _schedule(self) -> tuple[list[tuple[_Seq, int]], int]:
        """One vLLM ``Scheduler.schedule()``: how many steady decodes are scheduled (all of them, or none), and
        (request, tokens to compute) for the other requests of this step."""
        args, bs, kv = self.args, self.block_size, self.kv
        budget = args.max_num_batched_tokens
        num_steady = len(self._steady)
        if num_steady:
            need = self._new_blocks[self.tick % bs]
            if num_steady > budget or need > kv.num_free_blocks or (  # not everyone gets a token, or someone
                    self._choose_victims and need + self._rest_blocks(budget - num_steady) > kv.num_free_blocks):
                self._dissolve_steady()  # will be preempted (whom, a choice among all): one by one
                num_steady = 0
            else:
                if need:
                    kv.take_free_blocks(need)
                budget -= num_steady
        running = self._rest
        batch: list[tuple[_Seq, int]] = []
        preemptions = self.num_preemptions
        i = 0
        while i < len(running) and budget > 0:
            s = running[i]
            n = s.num_tokens - s.num_computed
            if n > budget:
                n = budget
            while not self._allocate(s, s.num_computed, n):  # vLLM: preempt until the blocks fit
                if self._pins:
                    self._unpin_newest()  # a pin yields before a running request is preempted
                    continue
                j = self._victim_index() if self._choose_victims else len(running) - 1
                victim = running.pop(j)
                if j < i:  # scheduled earlier in this step: its tokens go back to the budget, as in vLLM
                    i -= 1
                    k = next(k for k, (r, _) in enumerate(batch) if r is victim)
                    budget += batch.pop(k)[1]
                self._preempt(victim)
                if victim is s:
                    break
            else:
                batch.append((s, n))
                budget -= n
                i += 1
                continue
            break
        if self.num_preemptions > preemptions:  # vLLM admits no waiting request in a step that preempted
            return batch, num_steady
        waiting = self.waiting
        skipped: list[_Seq] = []  # over their agent's quota this step
        reserve = self._predicted_growth() if self._predicted and waiting else 0
        while waiting and budget > 0 and num_steady + len(running) < args.max_num_seqs:
            s = waiting[0]
            hit = self._lookup(s)
            hit_tokens = len(hit) * bs
            n = s.num_tokens - hit_tokens
            if not args.enable_chunked_prefill and n > budget:
                break
            n = min(n, budget)
            if self._quotas and self._over_quota(s, hit_tokens + n):
                skipped.append(waiting.popleft())
                continue
            if self._predicted and kv.num_blocks_to_allocate(0, self._predicted_tokens(s), hit) > \
                    kv.num_free_blocks - reserve:
                break
            if not self._allocate(s, hit_tokens, n, hit):
                if self._pins and not (num_steady or running):  # nothing runs that would free blocks
                    self._unpin_newest()
                    continue
                break
            waiting.popleft()
            if self._predicted:
                reserve += max(0, -(-self._predicted_tokens(s) // bs) - s.table.num_blocks)
            if self._pins and hit:
                self._pins_used(hit)
            self._order += 1
            s.order = self._order
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
        for s in reversed(skipped):  # back where they were (a priority queue puts them back by their key)
            waiting.appendleft(s)
        return batch, num_steady

    def _lookup(self, s: _Seq) -> list[int]:
        """vLLM ``get_computed_blocks``: cached prefix blocks, leaving at least the last token to compute.
        Before its first preemption a request can only hit blocks another request could have computed."""
        if not self.args.enable_prefix_caching:
            return []
        kv = self.kv
        max_blocks = (s.num_tokens - 1) // self.block_size
        if not s.num_preemptions and s.num_shareable < max_blocks:
            max_blocks = s.num_shareable
        if max_blocks <= 0:
            return []
        if len(s.hashes) < max_blocks:
            self._extend_hashes(s, max_blocks)
        # A blocked head is looked up at every boundary; reuse the last result while it provably holds.
        last = self._last_lookup
        if last is not None and last[0] is s and last[1] == s.num_tokens and not kv.watch_evicted:
            hit = last[2]
            if len(hit) == max_blocks or s.hashes[len(hit)] not in kv.cached:
                return hit
        hit = kv.find_longest_cache_hit(s.hashes[:max_blocks], s.num_tokens - 1)
        kv.watch(hit)  # from here on the cache flags any eviction of these blocks
        self._last_lookup = (s, s.num_tokens, hit)
        return hit

    def _allocate(self, s: _Seq, num_computed: int, n: int, hit: Sequence[int] = ()) -> bool:
        """vLLM ``allocate_slots``: blocks for ``num_computed + n`` tokens, then cache the full ones another
        request could hit (the request's own are registered when it is preempted: ``_preempt``)."""
        total = num_computed + n
        table = s.table
        if hit or -(-total // self.block_size) > table.num_blocks:  # most decode steps need no new block
            if not self.kv.allocate_slots(table, total, hit):
                return False
        num_full = (total if total < s.num_tokens else s.num_tokens) // self.block_size
        if num_full > s.num_shareable:
            num_full = s.num_shareable
        if num_full > len(table.cached):
            self._cache_full_blocks(s, num_full)
        return True

    def _cache_full_blocks(self, s: _Seq, num_full: int) -> None:
        if len(s.hashes) < num_full:
            self._extend_hashes(s, num_full)
        self.kv.cache_full_blocks(s.table, s.hashes, num_full)

    def _extend_hashes(self, s: _Seq, num_blocks: int) -> None:
        """Hashes of the request's first ``num_blocks`` blocks, and of all its shareable ones at once: those
        chain over the trace ids from the start, so they are computed in one pass."""
        extend_block_hashes(s.hashes, s.req, self.block_size, max(num_blocks, s.num_shareable))

    def _preempt(self, s: _Seq) -> None:
        """Preemption by recompute: register the request's full blocks (it may hit them when it comes back), free
        them, and put it back at the front of the waiting queue."""
        num_full = s.num_computed // self.block_size
        if self.args.enable_prefix_caching and num_full > len(s.table.cached):
            self._cache_full_blocks(s, num_full)
        self.kv.free_blocks(s.table)
        s.num_computed = 0
        s.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(s)

    def _step_time(self, batch: list[tuple[_Seq, int]], num_steady: int) -> float:
        prefill: list[tuple[int, int]] = []
        num_decode, context_sum = num_steady, (self._context if num_steady else 0)
        for s, n in batch:
            if n == 1 and s.decoding():
                num_decode += 1
                context_sum += s.num_tokens  # tokens the new query attends to, itself included
            else:
                prefill.append((n, s.num_computed))
        return float(self.cost.step_time(prefill, num_decode, context_sum))

    def _complete(self, batch: list[tuple[_Seq, int]], num_steady: int) -> None:
        """vLLM ``update_from_output``: advance each request, emit tokens, finish the done ones."""
        now = self.env.now
        self.tick += 1
        self._context += num_steady
        done: list[_Seq] = []
        for s, n in batch:
            s.num_computed += n
            if s.num_computed == s.num_tokens:  # caught up: this step sampled a token
                self._sample(s, now)
                if s.num_output >= s.max_tokens:
                    done.append(s)
        self._finish_done(done)

    def _sample(self, s: _Seq, now: float) -> None:
        s.num_output += 1
        s.num_tokens += 1
        if s.first_token_s < 0:
            s.first_token_s = now
            if self.on_first_token is not None:
                self.on_first_token(s.req.request_id, now)

    def _finish_done(self, done_rest: list[_Seq]) -> None:
        """Remove finished requests (the steady decodes whose last step this was, and ``done_rest``), free
        their blocks, then report them (callbacks see the new state)."""
        done = self._finishing.pop(self.tick, None)
        if done:
            heappop(self._finish_ticks)
            done.sort(key=_order)
            for s in done:
                self._sync(s)
                self._new_blocks[s.bucket] -= 1
                self._context -= s.num_tokens
                del self._steady[s]
        if done_rest:
            self._rest = [s for s in self._rest if s.num_output < s.max_tokens]
            done = done + done_rest if done else done_rest
        rest = self._rest
        while rest and rest[0].decoding():  # the oldest requests past their prefill join the steady decodes
            self._make_steady(rest.pop(0))
        if not done:
            return
        now = self.env.now
        for s in done:
            self.kv.free_blocks(s.table)
        if self.on_finish is not None:
            for s in done:
                r = s.req
                self.on_finish(RequestRecord(r.request_id, self.replica_id, s.arrival_s, s.scheduled_s,
                                             s.first_token_s, now, r.prompt_len, s.max_tokens, s.num_cached_tokens,
                                             s.num_preemptions))

    # --- steady decodes -------------------------------------------------------------------------
    def _make_steady(self, s: _Seq) -> None:
        tick = self.tick
        s.t0 = tick
        s.bucket = (tick - s.num_computed) % self.block_size  # it computes token num_computed + i at tick + i
        self._new_blocks[s.bucket] += 1
        finish = tick + s.max_tokens - s.num_output
        if finish in self._finishing:
            self._finishing[finish].append(s)
        else:
            self._finishing[finish] = [s]
            heappush(self._finish_ticks, finish)
        self._context += s.num_tokens
        self._steady[s] = None

    def _sync(self, s: _Seq) -> None:
        """Bring a steady decode's counters and block count up to the current tick."""
        d = self.tick - s.t0
        s.t0 = self.tick
        s.num_output += d
        s.num_tokens += d
        s.num_computed += d
        s.table.num_blocks = -(-s.num_computed // self.block_size)

    def _dissolve_steady(self) -> None:
        """Hand the steady decodes to the per-request path (at the front of ``_rest``: they come first)."""
        for s in self._steady:
            self._sync(s)
        self._rest[:0] = self._steady
        self._steady = {}
        self._new_blocks = [0] * self.block_size
        self._finishing.clear()
        self._finish_ticks.clear()
        self._context = 0

    # --- step coalescing ------------------------------------------------------------------------
    def _plan_window(self) -> _Window | None:
        """The longest run of steps, from now, whose batches are known in advance; None if shorter than 2.

        In such a run the steady decodes decode, and at most one other running request prefills, taking all the
        budget they leave, so no waiting request can be admitted, until the step that completes its prompt (that
        step joins the run only if nobody waits). The run ends with the first completion, before a step whose
        blocks would not fit (someone would be preempted), and, without a prefill, before the waiting head
        could be admitted."""
        num, rest = len(self._steady), self._rest
        budget = self.args.max_num_batched_tokens - num
        k = self._finish_ticks[0] - self.tick if num else 0  # the last step is the first completion
        p = None
        if rest:
            p = rest[0]
            if len(rest) > 1 or budget <= 0 or p.decoding():
                return None
            steps = -(-(p.num_tokens - p.num_computed) // budget)  # the last one completes the prompt
            if self.waiting:
                steps -= 1  # it leaves budget over: a waiting request might be admitted
            k = min(k, steps) if num else steps
        elif num == 0 or budget < 0:
            return None
        if k < 2:
            return None
        bs, kv = self.block_size, self.kv
        r, new_blocks = self.tick % bs, self._new_blocks
        hit: list[int] = []
        if p is None and self.waiting:
            blocked = self._waiting_head_blocked(budget, new_blocks[r])
            if blocked is None:
                return None
            hit = blocked
        # Step i allocates a block for each steady decode whose computed tokens fill a block, and the prefill's.
        allocs = list(accumulate(islice(cycle(new_blocks[r:] + new_blocks[:r]), k)))
        chunks: list[int] = []
        if p is not None:
            chunks = [budget] * k
            chunks[-1] = min(budget, p.num_tokens - p.num_computed - (k - 1) * budget)
            done = list(accumulate(chunks, initial=p.num_computed))  # its computed tokens before each step
            held = p.table.num_blocks
            allocs = [a + -(-c // bs) - held for a, c in zip(allocs, done[1:], strict=True)]
        k = min(k, bisect_right(allocs, kv.num_free_blocks))  # step k would preempt
        if hit and k >= 2:  # the first step whose allocations evict one of the head's hits ends the run before it
            k = bisect_right(allocs, kv.first_watched_in_free_queue(allocs[k - 1]), 0, k)
        if k < 2:
            return None
        if p is None:
            durations = self.cost.decode_step_times(num, self._context, k).tolist()
        else:
            step_time, ctx = self.cost.step_time, self._context
            durations = [float(step_time([(chunks[i], done[i])], num, ctx + i * num if num else 0)) for i in range(k)]
        return _Window(list(accumulate(durations, initial=self.env.now)), allocs, k, p, chunks)

    def _waiting_head_blocked(self, budget: int, first_alloc: int) -> list[int] | None:
        """Whether the waiting head stays unschedulable through a run of decode-only steps: None if the first
        step would admit it, else its cache hit (the blocks whose eviction may change that). Within such a run
        the free queue only shrinks and the head's needs stay put until a step evicts one of its hits.
        Tail-first freeing means such an eviction usually lowers need and supply alike, but not provably
        always (duplicate blocks), so the run stops there.

        With admission by predicted need the head must also fit beside the running requests' predicted growth;
        free blocks less that growth only shrink in such a run, so a head blocked by it stays blocked. With
        quotas a request behind the head may be admitted: no run is planned while any waits."""
        args, kv = self.args, self.kv
        if budget <= 0 or len(self._steady) >= args.max_num_seqs:
            return []  # not even tried: nothing in a decode-only run changes that
        if self._quotas:
            return None
        s = self.waiting[0]
        hit = self._lookup(s)  # also makes the head's hits the cache's watched blocks
        hit_tokens = len(hit) * self.block_size
        n = s.num_tokens - hit_tokens
        if not args.enable_chunked_prefill and n > budget:
            return hit
        need = kv.num_blocks_to_allocate(0, hit_tokens + min(n, budget), hit)
        if need > kv.num_free_blocks - first_alloc:
            return hit
        if self._predicted and kv.num_blocks_to_allocate(0, self._predicted_tokens(s), hit) > \
                kv.num_free_blocks - self._predicted_growth():
            return hit
        return None

    def _apply_window(self, w: _Window) -> None:
        """Advance the run's requests by ``w.k`` steps: blocks, counters (the steady decodes' lazily), the
        prefill's first token if its prompt is done, and who finished."""
        k = w.k
        self.kv.take_free_blocks(w.allocs[k - 1])
        self.tick += k
        self._context += k * len(self._steady)
        p, done = w.prefill, []
        if p is not None:
            p.num_computed += sum(w.chunks[:k])
            p.table.num_blocks = -(-p.num_computed // self.block_size)
            num_full = min(p.num_computed // self.block_size, p.num_shareable)
            if num_full > len(p.table.cached):
                self._cache_full_blocks(p, num_full)
            if p.num_computed == p.num_tokens:  # the prompt is done: its last step sampled a token
                self._sample(p, self.env.now)
                if p.num_output >= p.max_tokens:
                    done.append(p)
        self._finish_done(done)


def _order(s: _Seq) -> int:
    return s.order


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
    rows = list(zip(table["request_id"].tolist(), table["input_tokens"].tolist(), table["output_tokens"].tolist(),
                    map(tuple, table["block_hashes"]), table["hash_block_size"].tolist(), strict=True))
    shared = shared_prefix_ids((r, b, h) for r, _, _, h, b in rows)
    reqs = [SimRequest(r, p, o, h, b, shared.get(r, 0)) for r, p, o, h, b in rows]
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
    out = pd.DataFrame({c: [getattr(r, c) for r in records] for c in RECORD_COLUMNS}, columns=RECORD_COLUMNS)
    pos = {rid: i for i, rid in enumerate(table["request_id"].tolist())}
    return out.iloc[np.argsort([pos[r] for r in out["request_id"]], kind="stable")].reset_index(drop=True)
