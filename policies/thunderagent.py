"""ThunderAgent: a program-aware global waiting queue with pause/restore of programs at tool boundaries.

Kang et al., "ThunderAgent: A Simple, Fast and Program-Aware Agentic Inference System", arXiv 2602.13692 (2026);
code: github.com/Agentic-Kinetics/ThunderAgent (``ThunderAgent/scheduler/router.py``, ``backend/state.py``, read for
this model); NVIDIA Dynamo ports it as ``thunderagent_router``. It sits in front of vLLM engines, which it does
not change, and schedules "LLM programs" (agent runs) instead of requests:

- Each program lives on one engine. An engine's budget is its KV capacity in tokens; a program counts its
  context (prompt + output of its latest call) whether it is reasoning (a call in flight) or acting (in a tool
  call, its KV idle but cached), plus ``buffer_tokens`` (100) of decode headroom; tokens several reasoning programs
  share (the engine's KV use below their sum) are counted once.
- Every ``interval`` (5 s; here each control interval of the front end) it looks for thrashing: an engine over
  budget pauses acting programs, smallest first, then marks reasoning ones, smallest first, to pause when their
  call ends, until the engine fits. A paused program's next call waits in the global queue (the front end holds
  it, ``policies.api.Gate``), so the engine may evict its KV instead of thrashing everyone's.
- Then it restores waiting programs greedily: engines with room, largest room first; programs that were paused
  mid-reasoning first, then new programs, then paused acting ones, smallest first within each; a program goes to
  the first engine with room for it (it may move: memory-balanced placement). A program waiting longer than
  ``resume_timeout_s`` (1,800 s) is restored to its engine regardless.
- A new program goes at once to the engine with the fewest program tokens that has room, if nothing waits in the
  global queue, else it queues.

Differences: the paper's code loops its pause step while the engine is over budget, not counting the programs it
marked (so under pressure it marks every reasoning program); here marked programs count as released, as their
``future_paused_tokens`` are meant to. Program context is known in tokens (the original estimates it from
characters). A program ends when its job has no call left (the harness's ``release_program``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from policies.api import CallDone, ReplicaView, RequestInfo, program_of


@dataclass
class _Program:
    pool: str
    tokens: int = 0  # context of its latest call: prompt (when sent), prompt + output (when done)
    replica: int | None = None  # its engine while active
    origin: int | None = None  # its engine before it was paused
    in_flight: int = 0  # calls sent and not ended: reasoning if > 0, else acting
    marked: bool = False  # pause when its calls end
    paused_s: float | None = None  # in the global queue since
    paused_reasoning: bool = False
    held: list[int] = field(default_factory=list)  # its calls the front end holds


@dataclass
class ThunderAgent:
    """ThunderAgent's program scheduler as one policy: the router, the gate and an observer (see the module)."""

    buffer_tokens: int = 100
    acting_weight: float = 1.0
    resume_timeout_s: float = 1800.0
    _programs: dict[str, _Program] = field(default_factory=dict, init=False, repr=False)
    _queue: dict[str, None] = field(default_factory=dict, init=False, repr=False)  # paused programs, in pause order
    _shared: dict[int, int] = field(default_factory=dict, init=False, repr=False)  # replica -> tokens counted twice
    _admitted: set[int] = field(default_factory=set, init=False, repr=False)  # calls let through, not yet routed

    def __post_init__(self) -> None:
        if self.buffer_tokens < 0 or self.acting_weight < 0 or not self.resume_timeout_s > 0:
            raise ValueError(f"buffer_tokens={self.buffer_tokens}, acting_weight={self.acting_weight} must be >= 0 "
                             f"and resume_timeout_s={self.resume_timeout_s} > 0")

    # --- budget ------------------------------------------------------------------------------------
    def _on(self, replica_id: int) -> list[_Program]:
        return [p for p in self._programs.values() if p.replica == replica_id]

    def _used(self, replica_id: int, marked_release: bool = False) -> float:
        progs = self._on(replica_id)
        tokens = sum(p.tokens * (1.0 if p.in_flight else self.acting_weight) for p in progs)
        if marked_release:
            tokens -= sum(p.tokens for p in progs if p.marked)
        return tokens - self._shared.get(replica_id, 0) + self.buffer_tokens * len(progs)

    def _room(self, r: ReplicaView) -> float:
        return r.kv_capacity_tokens - self._used(r.replica_id)

    # --- gate --------------------------------------------------------------------------------------
    def admit(self, request: RequestInfo, replicas: Sequence[ReplicaView], now: float) -> bool:
        key = program_of(request)
        prog = self._programs.get(key)
        if prog is None:
            prog = self._programs[key] = _Program(request.pool)
        prog.tokens = request.input_tokens
        if prog.paused_s is not None:  # paused (or new and queued): wait for restore
            prog.held.append(request.request_id)
            return False
        if prog.replica is None:  # new
            fits = [r for r in replicas if self._room(r) >= prog.tokens + self.buffer_tokens]
            if self._queue or not fits:
                prog.paused_s = now
                prog.held.append(request.request_id)
                self._queue[key] = None
                return False
            prog.replica = min(fits, key=lambda r: (self._used(r.replica_id), r.replica_id)).replica_id
        prog.in_flight += 1
        self._admitted.add(request.request_id)
        return True

    def route(self, request: RequestInfo, replicas: Sequence[ReplicaView], now: float) -> int:
        """The program's engine. Used as a router alone (no gate), every call goes through, counted here."""
        key = program_of(request)
        prog = self._programs.get(key)
        if prog is None:
            prog = self._programs[key] = _Program(request.pool)
        if request.request_id in self._admitted:
            self._admitted.discard(request.request_id)
        else:
            prog.tokens = request.input_tokens
            prog.in_flight += 1
        if all(r.replica_id != prog.replica for r in replicas):  # new, or its engine left: the emptiest one
            prog.replica = min(replicas, key=lambda r: (self._used(r.replica_id), r.replica_id)).replica_id
        return prog.replica  # type: ignore[return-value]

    def observe(self, done: CallDone) -> None:
        key = program_of(done.request)
        prog = self._programs.get(key)
        if prog is None:
            return
        if done.program_done:
            del self._programs[key]
            self._queue.pop(key, None)
            return
        if done.replica_id >= 0:
            prog.in_flight -= 1
        prog.tokens = done.request.input_tokens + done.output_tokens
        if prog.marked and not prog.in_flight:
            self._pause(key, prog, done.finish_s, reasoning=True)

    def _pause(self, key: str, prog: _Program, now: float, reasoning: bool) -> None:
        prog.origin, prog.replica, prog.marked = prog.replica, None, False
        prog.paused_s, prog.paused_reasoning = now, reasoning
        self._queue[key] = None

    def tick(self, replicas: Sequence[ReplicaView], now: float) -> list[int]:
        pool = replicas[0].pool
        for r in replicas:  # 1. thrashing: pause until each engine fits
            while self._used(r.replica_id, marked_release=True) > r.kv_capacity_tokens:
                acting = [(p.tokens, k) for k, p in self._programs.items() if p.replica == r.replica_id
                          and not p.in_flight]
                reasoning = [(p.tokens, k) for k, p in self._programs.items() if p.replica == r.replica_id
                             and p.in_flight and not p.marked]
                if acting:
                    k = min(acting)[1]
                    self._pause(k, self._programs[k], now, reasoning=False)
                elif reasoning:
                    self._programs[min(reasoning)[1]].marked = True
                else:
                    break
        released: list[int] = []
        room = sorted(((self._room(r), r.replica_id) for r in replicas if self._room(r) > self.buffer_tokens),
                      key=lambda x: (-x[0], x[1]))
        waiting = [(k, p) for k, p in self._queue.items() for p in (self._programs[k],) if p.pool == pool]
        order = sorted(waiting, key=lambda kp: (0 if kp[1].paused_reasoning else 1 if kp[1].origin is None else 2,
                                                kp[1].tokens))
        ids = {r.replica_id for r in replicas}
        for key, prog in order:  # 2. restore, greedily; 3. the timed-out ones regardless
            need = prog.tokens + self.buffer_tokens
            target = next((i for i, (free, _) in enumerate(room) if free >= need), None)
            if target is not None:
                free, rid = room[target]
                room[target] = (free - need, rid)
            elif now - prog.paused_s >= self.resume_timeout_s:  # type: ignore[operator]
                rid = prog.origin if prog.origin in ids else min(ids, key=lambda i: (self._used(i), i))
            else:
                continue
            del self._queue[key]
            prog.replica, prog.origin, prog.paused_s, prog.paused_reasoning = rid, None, None, False
            prog.in_flight += len(prog.held)
            self._admitted.update(prog.held)
            released += prog.held
            prog.held = []
        for r in replicas:  # 4. what the reasoning programs share, from the engines' KV use, for the next tick
            reasoning = sum(p.tokens for p in self._on(r.replica_id) if p.in_flight)
            self._shared[r.replica_id] = max(0, reasoning - int(r.kv_usage * r.kv_capacity_tokens))
        return released
