"""Continuum: KV time-to-live across tool calls, and program-level FCFS.

Li et al., "Continuum: Efficient and Robust Multi-Turn LLM Agent Scheduling with KV Cache Time-to-Live", arXiv
2511.02230 (2025); code: github.com/Hanchenli/vllm-continuum. When an agent's call ends in a tool call, Continuum
keeps (pins) the program's KV cache on its engine for a time-to-live, so the next turn finds it instead of
re-entering the queue behind others and recomputing its context; the TTL trades the expected saving against the
memory held:

    tau* = argmax_tau  P(tau) * (PrefillReload + T * eta) - tau

with P the empirical distribution of that tool's durations (learned online from the gaps between a call's end and
its continuation), PrefillReload the time to recompute the context, T the queueing delay an evicted program meets
on return, and eta its "memoryfulness" (1: later turns extend earlier ones, as in these workloads). With fewer
than 100 samples of a tool the pool of all tools is used, and with fewer than 100 of those, durations are taken as
exponential with a mean of 1 s, as the paper does. Requests are scheduled by program arrival (program-level FCFS).

How it runs here: ``ToolTimeTTL`` is the retention policy (the engine pins, ``sim.engine.Engine.pin``; real vLLM
0.32 cannot, so pins are simulator-only), ``ProgramFCFS`` the priority (vLLM's priority scheduling). A tool is
the agent whose call ended (the trace names no tools); P is kept as a histogram over 64 log-spaced durations from
0.1 s to 1 h, the candidate TTLs. A front end estimates PrefillReload as the context's tokens times the fastest
recent time to first token per computed token, and T as the recent mean of the rest of the time to first token.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from policies.api import CallDone, RequestInfo, program_of

MIN_SAMPLES = 100  # the paper's: fewer samples of a tool fall back to all tools, then to Exp(1 s)
EDGES = np.geomspace(0.1, 3600.0, 64)  # candidate TTLs (s): the upper edges of the duration histogram
WINDOW = 100  # calls the prefill-rate and queueing estimates look back over


@dataclass
class ToolTimeTTL:
    """Continuum's TTL (a ``Retention``): pin an ended call's blocks for the tau* of its tool (see the module)."""

    eta: float = 1.0
    _hist: dict[tuple[str, str], np.ndarray] = field(default_factory=dict, init=False, repr=False)
    _all: np.ndarray = field(default_factory=lambda: np.zeros(len(EDGES) + 1, np.int64), init=False, repr=False)
    _ended: dict[int, tuple[float, tuple[str, str]]] = field(default_factory=dict, init=False, repr=False)
    _rates: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW), init=False, repr=False)
    _ttfts: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=WINDOW), init=False, repr=False)

    def observe(self, done: CallDone) -> None:
        req = done.request
        for parent in req.parents:  # the gap after a parent's end is the duration of the tool it called
            ended = self._ended.pop(parent, None)
            if ended is not None:
                finish, tool = ended
                self._add(tool, done.release_s - finish)
        if done.status != "ok":
            return
        if not done.program_done:
            self._ended[req.request_id] = (done.finish_s, (req.workflow, req.agent))
        computed = req.input_tokens - done.cached_tokens
        if computed > 0:
            ttft = done.first_token_s - done.release_s
            self._rates.append(ttft / computed)
            self._ttfts.append((ttft, computed))

    def _add(self, tool: tuple[str, str], duration_s: float) -> None:
        k = int(np.searchsorted(EDGES, duration_s))  # bin k: durations in (EDGES[k-1], EDGES[k]]; k = 64: longer
        hist = self._hist.get(tool)
        if hist is None:
            hist = self._hist[tool] = np.zeros(len(EDGES) + 1, np.int64)
        hist[k] += 1
        self._all[k] += 1

    def retain_s(self, done: CallDone, now: float) -> float:
        if done.program_done:
            return 0.0
        benefit = self._reload_s(done) + self._queueing_s() * self.eta
        hist = self._hist.get((done.request.workflow, done.request.agent))
        if hist is None or hist.sum() < MIN_SAMPLES:
            hist = self._all
        n = int(hist.sum())
        if n < MIN_SAMPLES:  # P(tau) = 1 - exp(-tau): the maximum of P * B - tau is at tau = ln B
            return math.log(benefit) if benefit > 1.0 else 0.0
        gain = np.cumsum(hist[:-1]) / n * benefit - EDGES
        best = int(np.argmax(gain))
        return float(EDGES[best]) if gain[best] > 0 else 0.0

    def _reload_s(self, done: CallDone) -> float:
        rate = min(self._rates) if self._rates else 0.0
        return (done.request.input_tokens + done.output_tokens) * rate

    def _queueing_s(self) -> float:
        if not self._ttfts:
            return 0.0
        rate = min(self._rates)
        return sum(max(ttft - computed * rate, 0.0) for ttft, computed in self._ttfts) / len(self._ttfts)


@dataclass
class ProgramFCFS:
    """Continuum's scheduling order (a ``Prioritizer``): every call of a program has the program's arrival rank,
    so vLLM's priority queue serves programs first come, first served, and a preempted call of an older program
    goes back ahead of newer programs."""

    _rank: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _next: int = field(default=0, init=False, repr=False)

    def priority(self, request: RequestInfo, now: float) -> int:
        key = program_of(request)
        if key not in self._rank:
            self._rank[key] = self._next
            self._next += 1
        return self._rank[key]

    def observe(self, done: CallDone) -> None:
        if done.program_done:
            self._rank.pop(program_of(done.request), None)
