"""The contract between policies and backends.

A policy sees exactly what a real front end and controller could see: the request as it arrives
(with the workflow.yaml hints), each replica's vLLM /metrics, and the front end's own records. The
simulator and the real executor both build these objects, so the *same* policy object runs on both.
Nothing here may import ``sim`` or ``real``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

ReplicaState = Literal["starting", "ready", "draining"]


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """One LLM call as the front end sees it when it is released."""

    request_id: int
    arrival_s: float  # release time at the front end
    input_tokens: int
    block_hashes: tuple[int, ...]  # prefix block ids of the prompt (the router's view of the token ids)
    hash_block_size: int
    pool: str = "default"  # the replica pool (model) that serves this call
    session_id: str = ""
    job_id: int = -1
    workflow: str = ""
    agent: str = ""
    expected_output_tokens: int = -1  # hint (workflow.yaml, or a Predictor's bound); -1 unknown
    next_agents: tuple[str, ...] = ()  # hint: agents released after this call
    slo_s: float = float("nan")
    parents: tuple[int, ...] = ()  # request ids this call waited for (its job's DAG, as the front end released it)


def program_of(request: RequestInfo) -> str:
    """The program (agent run) a call belongs to, as a front end knows it: its job, else its session, else itself."""
    if request.job_id >= 0:
        return f"job:{request.job_id}"
    return f"session:{request.session_id}" if request.session_id else f"call:{request.request_id}"


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """One replica as exported by vLLM's /metrics, plus the front end's own count of what it sent there."""

    replica_id: int
    pool: str
    state: ReplicaState
    num_running: int  # vllm:num_requests_running
    num_waiting: int  # vllm:num_requests_waiting
    kv_usage: float  # vllm:kv_cache_usage_perc (0-1; cached-but-free blocks count as free)
    prefix_cache_queries: int  # vllm:prefix_cache_queries_total (tokens, cumulative)
    prefix_cache_hits: int  # vllm:prefix_cache_hits_total (tokens, cumulative)
    num_preemptions: int  # vllm:num_preemptions_total
    kv_capacity_tokens: int  # vllm:cache_config_info num_gpu_blocks * block_size
    outstanding_requests: int  # front end: routed here and not finished
    outstanding_tokens: int  # front end: prompt + expected output tokens of those requests


@dataclass(frozen=True, slots=True)
class PoolObservation:
    """What the controller knows about one pool over the last control interval."""

    pool: str
    replicas: tuple[ReplicaView, ...]
    gpus_per_replica: int
    pending: int  # released calls the front end holds because no replica of the pool is ready
    arrivals: int  # calls released to this pool during the interval
    arrival_tokens: int  # their prompt + expected output tokens
    completions: int
    p99_latency_s: float  # front-end measured end-to-end latency of calls finished in the interval (NaN: none)
    p99_ttft_s: float
    slo_violations: int  # calls finished in the interval above their slo_s
    inflight_by_agent: dict[str, int] = field(default_factory=dict)  # calls routed and not finished
    expected_next_by_agent: dict[str, int] = field(default_factory=dict)  # workflow look-ahead

    @property
    def num_ready(self) -> int:
        return sum(r.state == "ready" for r in self.replicas)

    @property
    def num_active(self) -> int:
        """Replicas that hold a GPU and will serve: starting or ready (draining ones are on their way out)."""
        return sum(r.state != "draining" for r in self.replicas)

    @property
    def queue_depth(self) -> int:
        return self.pending + sum(r.num_waiting for r in self.replicas)


@dataclass(frozen=True, slots=True)
class ClusterObservation:
    now: float
    interval_s: float
    total_gpus: int
    free_gpus: int
    pools: dict[str, PoolObservation]


@dataclass(frozen=True, slots=True)
class ScaleAction:
    """Desired number of serving replicas per pool (pools not named keep their count), and optionally each
    pool's KV-memory quotas per agent group (a share of every replica's KV blocks; simulator-only: vLLM has
    no per-tenant KV limit)."""

    target_replicas: dict[str, int]
    memory_quotas: dict[str, dict[str, float]] = field(default_factory=dict)  # pool -> agent -> share (0-1]


@dataclass(frozen=True, slots=True)
class CallDone:
    """What the front end learns when a call ends (a real one: the end of its HTTP stream)."""

    request: RequestInfo
    replica_id: int  # -1: never routed
    status: str  # ok | failed | rejected
    release_s: float
    first_token_s: float
    finish_s: float
    output_tokens: int  # tokens generated
    cached_tokens: int  # prompt tokens the engine served from its prefix cache (vLLM's usage.cached_tokens)
    program_done: bool = False  # its job has no call left: the program ended (an agent harness says so, e.g. to
    #                             ThunderAgent's release_program)


@dataclass(frozen=True, slots=True)
class Prefetch:
    """Warm ``replica_id``'s prefix cache with a prompt prefix: a prefill-only call (one output token) of
    ``num_tokens`` tokens named by ``block_hashes``, which real vLLM serves as any other call."""

    replica_id: int
    block_hashes: tuple[int, ...]
    hash_block_size: int
    num_tokens: int


@runtime_checkable
class Router(Protocol):
    def route(self, request: RequestInfo, replicas: Sequence[ReplicaView], now: float) -> int:
        """Pick the replica_id for ``request`` among ``replicas`` (the ready replicas of its pool)."""
        ...


@runtime_checkable
class Scaler(Protocol):
    def decide(self, obs: ClusterObservation) -> ScaleAction: ...


@runtime_checkable
class Observer(Protocol):
    """A policy that learns from the calls that end. The front end tells every policy of a system that has an
    ``observe`` (router, scaler, gate, prioritizer, retention, prefetcher; the predictor first) of every call that
    ends, in that order, before it asks the retention and prefetch policies about the call."""

    def observe(self, done: CallDone) -> None: ...


@runtime_checkable
class Gate(Protocol):
    """A waiting queue of the front end's own, before routing (ThunderAgent's program-aware global queue): it may
    hold a released call instead of routing it, and let held calls go later. A held call counts as pending."""

    def admit(self, request: RequestInfo, replicas: Sequence[ReplicaView], now: float) -> bool:
        """Route ``request`` now (True), or hold it (False)."""
        ...

    def tick(self, replicas: Sequence[ReplicaView], now: float) -> list[int]:
        """Every control interval, per pool (``replicas``: its ready ones): the held calls of that pool to route now
        (request ids, in that order)."""
        ...


@runtime_checkable
class Prioritizer(Protocol):
    """vLLM's priority scheduling (``scheduling_policy="priority"``): the call's ``priority``, lower first."""

    def priority(self, request: RequestInfo, now: float) -> int: ...


@runtime_checkable
class Retention(Protocol):
    """Continuum's mechanism: keep a finished call's KV blocks on its replica for a while, so the next call of
    the same program finds them after its tool call (simulator-only: vLLM 0.32 cannot pin blocks)."""

    def retain_s(self, done: CallDone, now: float) -> float:
        """Seconds to pin ``done``'s prompt and output blocks on ``done.replica_id`` (0: not at all)."""
        ...


@runtime_checkable
class Prefetcher(Protocol):
    def prefetch(self, done: CallDone, replicas: Sequence[ReplicaView], now: float) -> list[Prefetch]:
        """Prefixes to warm now that ``done`` ended (e.g. the predicted next agent's static prefix)."""
        ...


@runtime_checkable
class Predictor(Protocol):
    """What the front end predicts of a call (a profiler): it fills a released call's hints and learns from
    every call that ends."""

    def annotate(self, request: RequestInfo, now: float) -> RequestInfo: ...

    def observe(self, done: CallDone) -> None: ...


@dataclass(frozen=True)
class Hooks:
    """The per-call policies a system may add to its router and scaler (None: not used). The front end calls them;
    the engine mechanisms they drive (priority scheduling, pins, prefetch calls) are the backends'."""

    prioritizer: Prioritizer | None = None
    retention: Retention | None = None
    prefetcher: Prefetcher | None = None
    predictor: Predictor | None = None
    gate: Gate | None = None


NO_HOOKS = Hooks()  # routing and scaling only
