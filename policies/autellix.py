"""Autellix: program-level least-attained-service scheduling and its locality-aware load balancer.

Luo et al., "Autellix: An Efficient Serving Engine for LLM Agents as General Programs", arXiv 2502.13965 (2025).
Autellix treats an agent program, not a call, as the unit of scheduling: a call's priority is the service its
program has attained so far (PLAS, for single-threaded programs: the sum over its earlier calls; ATLAS, for
programs that run calls in parallel: the longest critical path of attained service through the call's parents),
discretized into K queues served in order, FCFS within a queue, with a program promoted to the first queue once
its calls waited ``starvation_ratio`` times longer than they were served. Short programs finish first without
knowing their lengths; long ones are not starved. Across engines, short calls go to the least loaded engine and
long ones stay on their program's engine, where its KV cache is.

How it runs here, on vLLM's own priority scheduling (``EngineArgs(scheduling_policy="priority")``), and where that
differs from the paper's engine:

- A call's priority is its queue at submission (vLLM sets a request's priority once). Autellix also demotes a
  running call that exhausts its queue's quantum and swaps it out; here vLLM preempts the lowest queue only when KV
  blocks run out. On agent calls of tens of output tokens a call's own quantum rarely ends before the call does.
- Attained service is counted in tokens computed, not seconds: what a front end sees of a call in vLLM's usage
  (prompt tokens not served from the cache, plus generated tokens), which is what execution time grows with.
  ATLAS over the call DAG (``RequestInfo.parents``) is PLAS for sequential programs, so one rule serves both.
- The paper's queue thresholds and starvation ratio could not be read here (its text was not available to this
  project); the queues double from 2,048 tokens (about the first call of an agent program at these sizes) over
  8 levels, and the starvation ratio is 8, a reimplementation's default. Waiting is time to first token, service
  time from the first token to the last, as a front end measures them.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field

from policies.api import CallDone, ReplicaView, RequestInfo, program_of
from policies.routers import least_loaded

QUEUE_BOUNDARIES = (2_048, 4_096, 8_192, 16_384, 32_768, 65_536, 131_072)  # tokens of attained service: 8 queues


@dataclass
class _Program:
    path: dict[int, int] = field(default_factory=dict)  # request id -> attained service on the longest path to it
    waited_s: float = 0.0
    served_s: float = 0.0


@dataclass
class AttainedService:
    """Autellix's PLAS/ATLAS priority (a ``Prioritizer``): the queue of a call's program's attained service."""

    boundaries: tuple[int, ...] = QUEUE_BOUNDARIES
    starvation_ratio: float = 8.0
    _programs: dict[str, _Program] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.boundaries or list(self.boundaries) != sorted(set(self.boundaries)) or self.boundaries[0] <= 0:
            raise ValueError(f"boundaries={self.boundaries} must be increasing token counts > 0")
        if not self.starvation_ratio > 0:
            raise ValueError(f"starvation_ratio must be > 0, got {self.starvation_ratio}")

    def priority(self, request: RequestInfo, now: float) -> int:
        prog = self._programs.get(program_of(request))
        if prog is None:
            return 0
        if prog.served_s > 0 and prog.waited_s >= self.starvation_ratio * prog.served_s:
            return 0  # starved: promoted to the first queue
        attained = max((prog.path.get(p, 0) for p in request.parents), default=0)
        return bisect_right(self.boundaries, attained)

    def observe(self, done: CallDone) -> None:
        key = program_of(done.request)
        if done.program_done:
            self._programs.pop(key, None)
            return
        prog = self._programs.setdefault(key, _Program())
        req = done.request
        own = max(req.input_tokens - done.cached_tokens, 0) + done.output_tokens
        prog.path[req.request_id] = max((prog.path.get(p, 0) for p in req.parents), default=0) + own
        if done.status == "ok":
            prog.waited_s += done.first_token_s - done.release_s
            prog.served_s += done.finish_s - done.first_token_s


@dataclass
class LocalityBalancer:
    """Autellix's load balancer (its Algorithm 2): a call of at most ``long_prompt_tokens`` prompt tokens (2,048, the
    paper's) goes to the least loaded replica (outstanding tokens, the front end's count), where its short shared
    prefix is likely cached anyway; a longer one to its program's replica, chosen as the least loaded at the
    program's first long call (again if that replica left)."""

    long_prompt_tokens: int = 2048
    _home: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    def route(self, request: RequestInfo, replicas: Sequence[ReplicaView], now: float) -> int:
        if request.input_tokens <= self.long_prompt_tokens:
            return least_loaded(replicas).replica_id
        key = program_of(request)
        home = self._home.get(key)
        if home is None or all(r.replica_id != home for r in replicas):
            home = self._home[key] = least_loaded(replicas).replica_id
        return home

    def observe(self, done: CallDone) -> None:
        if done.program_done:
            self._home.pop(program_of(done.request), None)
