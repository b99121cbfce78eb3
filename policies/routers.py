"""Routers: which ready replica of its pool serves a released call.

Every router sees only what a real front end sees (``RequestInfo``, each replica's ``ReplicaView``) plus
its own records; prefix-aware routers remember what they sent where in a ``PrefixIndex``, as
sglang-router and llm-d do. Routers are deterministic: ties break by replica id, and the randomized ones
draw from ``random.Random(seed)``. Registered by name in ``policies.registry.ROUTERS``; constructor keyword
arguments are the configuration.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from policies.api import ReplicaView, RequestInfo
from policies.prefix_index import PrefixIndex

# Prefix-index bound for a replica that does not report its KV capacity (vllm:cache_config_info missing).
UNREPORTED_CAPACITY_TOKENS = 1 << 20


def _ids(replicas: Sequence[ReplicaView]) -> list[int]:
    return sorted(r.replica_id for r in replicas)


def least_loaded(replicas: Sequence[ReplicaView]) -> ReplicaView:
    return min(replicas, key=lambda r: (r.outstanding_tokens, r.outstanding_requests, r.replica_id))


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


class RoutedPrefixes:
    """The router's own record of which prompt prefixes it sent to which replica, one index per pool.

    Each replica's share is bounded by its KV capacity (``kv_capacity_tokens``): the router cannot know
    what the engine evicted, so it assumes the engine keeps the most recently sent blocks that fit.
    Replicas missing from a pool's ready list have left the pool (drained, stopped) and are forgotten.
    """

    def __init__(self) -> None:
        self._pools: dict[str, PrefixIndex] = {}

    def matched_tokens(self, request: RequestInfo, replicas: Sequence[ReplicaView]) -> dict[int, int]:
        """Prompt tokens of ``request`` that each replica holds, by this router's records."""
        index = self._pools.setdefault(request.pool, PrefixIndex())
        ids = _ids(replicas)
        index.retain(ids)
        blocks = index.match(request.block_hashes, ids)
        return {r: min(n * request.hash_block_size, request.input_tokens) for r, n in blocks.items()}

    def record(self, request: RequestInfo, replica: ReplicaView) -> None:
        capacity = replica.kv_capacity_tokens
        if capacity <= 0:
            capacity = UNREPORTED_CAPACITY_TOKENS
        self._pools[request.pool].insert(replica.replica_id, request.block_hashes,
                                         capacity // max(request.hash_block_size, 1))

    def size_tokens(self, request: RequestInfo, replica_id: int) -> int:
        """Prompt tokens this router believes ``replica_id`` caches (the size of its prefix tree)."""
        return self._pools[request.pool].size(replica_id) * request.hash_block_size


class OutstandingWork:
    """Uncached work (prompt tokens to prefill + expected output tokens) still outstanding per replica.

    The router records the work of each call it sends; it is not told which calls finished, only how many
    are still outstanding (``outstanding_requests``). vLLM serves in arrival order, so those are taken to
    be the replica's most recent calls: the estimate is the sum of the work of its last n calls.
    """

    HISTORY = 4096  # calls remembered per replica (far more than a replica keeps outstanding)

    def __init__(self) -> None:
        self._cumulative: dict[int, list[int]] = {}  # replica -> running sum of work, one entry per call

    def add(self, replica_id: int, work: int) -> None:
        cum = self._cumulative.setdefault(replica_id, [0])
        cum.append(cum[-1] + work)
        if len(cum) > 2 * self.HISTORY:
            del cum[: self.HISTORY]  # differences of the remaining sums stay exact

    def of(self, replica: ReplicaView) -> int:
        cum = self._cumulative.get(replica.replica_id)
        if not cum:
            return 0
        n = min(replica.outstanding_requests, len(cum) - 1)
        return cum[-1] - cum[-1 - n]


# --- load-only routers -----------------------------------------------------------------------------------


@dataclass
class RoundRobin:
    """Vanilla vLLM behind a Kubernetes Service: the ready replicas in turn, by replica id.

    The ids are sorted again only when the replicas come as a new sequence (a front end passes the same tuple
    while its ready set stays the same), so a call costs O(1) however many replicas there are."""

    _calls: int = field(default=0, init=False, repr=False)
    _seen: Sequence[ReplicaView] | None = field(default=None, init=False, repr=False)
    _sorted: list[int] = field(default_factory=list, init=False, repr=False)

    def route(self, request: RequestInfo, replicas: Sequence[ReplicaView], now: float) -> int:
        if replicas is not self._seen or type(replicas) is not tuple:  # a list may have changed in place
            self._seen, self._sorted = replicas, _ids(replicas)
        self._calls += 1
        return self._sorted[(self._calls - 1) % len(self._sorted)]


@dataclass
class Random:
    """A Kubernetes Service in kube-proxy's iptables mode: a uniformly random ready replica."""

    seed: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def route(self, request: RequestInfo, replicas: Sequence[ReplicaView], now: float) -> int:
        return self._rng.choice(_ids(replicas))


@dataclass
class LeastLoaded:
    """The replica with the fewest outstanding tokens (prompt + expected output of unfinished calls)."""

    def route(self, request: RequestInfo, replicas: Sequence[ReplicaView], now: float) -> int:
        return least_loaded(replicas).replica_id


@dataclass
class PowerOfTwo:
    """Power of two choices: of two distinct random replicas, the one with fewer outstanding tokens."""

    seed: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def route(self, request: RequestInfo, replicas: Sequence[ReplicaView], now: float) -> int:
        ordered = sorted(replicas, key=lambda r: r.replica_id)
        if len(ordered) == 1:
            return ordered[0].replica_id
        return least_loaded(self._rng.sample(ordered, 2)).replica_id


@dataclass
class SessionAffinity:
    """Sticky sessions: rendezvous hash of the session id (else the job id) over the ready replicas.

    Rendezvous (highest random weight) hashing moves only the sessions of a replica that leaves or joins.
    Calls with neither a session nor a job fall back to the least-loaded replica.
    """

    def route(self, request: RequestInfo, replicas: Sequence[ReplicaView], now: float) -> int:
        key = request.session_id or (f"job:{request.job_id}" if request.job_id >= 0 else "")
        if not key:
            return least_loaded(replicas).replica_id
        return max(_ids(replicas), key=lambda rid: _stable_hash(f"{key}|{rid}"))


@dataclass
class ProductionStack:
    """The vLLM production-stack router (vllm-project/production-stack, ``vllm_router/routers/routing_logic.py``), in
    its session mode with overload protection (``cache_aware_load_balancing``): a call of a session (its session id,
    else its job) goes to the session's replica on a consistent-hash ring, unless that replica has
    ``tolerate_waiting_requests`` (the stack's default 20) or more calls waiting (vllm:num_requests_waiting); then to
    the replica with the fewest waiting (the stack breaks ties by p50 latency, here by outstanding calls and id),
    the session's own if every replica is over. A call with neither session nor job goes where the longest prefix it
    shares was sent (its ``prefixaware`` mode, a prefix trie of its own), else to the least loaded.

    Differences: the ring is rendezvous hashing (as ``SessionAffinity``), which like the stack's uhashring moves only
    the sessions of a replica that leaves or joins; the prefix fallback breaks ties by load, not at random."""

    tolerate_waiting_requests: int = 20
    _prefixes: RoutedPrefixes = field(default_factory=RoutedPrefixes, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.tolerate_waiting_requests < 1:
            raise ValueError(f"tolerate_waiting_requests must be >= 1, got {self.tolerate_waiting_requests}")

    def route(self, request: RequestInfo, replicas: Sequence[ReplicaView], now: float) -> int:
        key = request.session_id or (f"job:{request.job_id}" if request.job_id >= 0 else "")
        if not key:
            matched = self._prefixes.matched_tokens(request, replicas)
            chosen = min(replicas, key=lambda r: (-matched[r.replica_id], r.outstanding_tokens, r.replica_id))
            self._prefixes.record(request, chosen)
            return chosen.replica_id
        home = max(replicas, key=lambda r: _stable_hash(f"{key}|{r.replica_id}"))
        limit = self.tolerate_waiting_requests
        if home.num_waiting < limit:
            return home.replica_id
        calm = [r for r in replicas if r.num_waiting < limit]
        if not calm:
            return home.replica_id
        return min(calm, key=lambda r: (r.num_waiting, r.outstanding_requests, r.replica_id)).replica_id


def _stable_hash(text: str) -> int:
    """A hash that is the same in every process (Python's ``hash(str)`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


# --- prefix-aware routers --------------------------------------------------------------------------------


@dataclass
class CacheAware:
    """sglang-router's cache_aware policy (defaults as in sglang-router).

    Load is the outstanding requests per replica. If the pool is imbalanced (max - min load >
    ``balance_abs_threshold`` and max > ``balance_rel_threshold`` * min) the call goes to the least
    loaded replica. Otherwise it goes to the replica with the longest cached prefix if that prefix covers
    more than ``cache_threshold`` of the prompt, else to the replica with the smallest prefix tree (the
    most free cache). Either way the prompt is then recorded in the chosen replica's tree.
    """

    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    _prefixes: RoutedPrefixes = field(default_factory=RoutedPrefixes, init=False, repr=False)

    def __post_init__(self) -> None:
        _check_fraction("cache_threshold", self.cache_threshold)

    def route(self, request: RequestInfo, replicas: Sequence[ReplicaView], now: float) -> int:
        matched = self._prefixes.matched_tokens(request, replicas)
        loads = [r.outstanding_requests for r in replicas]
        hi, lo = max(loads), min(loads)
        if hi - lo > self.balance_abs_threshold and hi > self.balance_rel_threshold * lo:
            chosen = min(replicas, key=lambda r: (r.outstanding_requests, r.replica_id))
        else:
            best = max(replicas,
                       key=lambda r: (matched[r.replica_id], -r.outstanding_requests, -r.replica_id))
            ratio = matched[best.replica_id] / request.input_tokens if request.input_tokens > 0 else 0.0
            if ratio > self.cache_threshold:
                chosen = best
            else:
                chosen = min(replicas, key=lambda r: (self._prefixes.size_tokens(request, r.replica_id),
                                                      r.outstanding_requests, r.replica_id))
        self._prefixes.record(request, chosen)
        return chosen.replica_id


@dataclass
class Preble:
    """Preble's E2 (exploit / explore) scheduling, with load as outstanding tokens.

    Exploit: if the longest cached prefix (over all replicas) is longer than the rest of the prompt, send
    the call to the least-loaded replica holding that prefix, unless that replica carries more than
    ``rebalance_ratio`` times the mean load (Preble's load rebalancing). Explore otherwise: the replica
    minimizing load after routing, outstanding tokens + the prompt tokens it would have to prefill.
    Simplified from the paper: load is outstanding tokens rather than a window of estimated GPU time,
    and the eviction cost term is left out.
    """

    rebalance_ratio: float = 2.0
    _prefixes: RoutedPrefixes = field(default_factory=RoutedPrefixes, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.rebalance_ratio < 1.0:
            raise ValueError(f"rebalance_ratio must be >= 1, got {self.rebalance_ratio}")

    def route(self, request: RequestInfo, replicas: Sequence[ReplicaView], now: float) -> int:
        matched = self._prefixes.matched_tokens(request, replicas)
        longest = max(matched.values())
        mean_load = sum(r.outstanding_tokens for r in replicas) / len(replicas)
        holders = [r for r in replicas if matched[r.replica_id] == longest]
        best = min(holders, key=lambda r: (r.outstanding_tokens, r.replica_id))
        exploit = longest > request.input_tokens - longest
        if exploit and best.outstanding_tokens <= self.rebalance_ratio * mean_load:
            chosen = best
        else:
            chosen = min(replicas, key=lambda r: (
                r.outstanding_tokens + request.input_tokens - matched[r.replica_id], r.replica_id))
        self._prefixes.record(request, chosen)
        return chosen.replica_id


@dataclass
class Pythia:
    """Pythia: workflow- and cache-aware placement, balanced by the work each replica must still do.

    Rule, for each call:

    1. Long-context confinement. A call is long if its prompt has at least ``long_context_tokens``
       tokens, or its (workflow, agent) averages that many (learned online, so all calls of a
       long-context agent share replicas and their static prefix). Long calls go only to a sticky
       subset of the pool, sized to the long calls' share of routed tokens (decayed) and capped at
       ``long_context_max_share`` of the replicas, so long prompts cannot spread over the pool and
       starve short calls of memory; short calls may use every replica, by step 2.
    2. Cost. Each candidate r costs the work the call would wait behind plus the work it adds there:
           work_r + miss_weight * miss_r * (1 + stall_weight * (num_running_r + num_waiting_r))
                  + memory_weight * overflow_r
       work_r is the uncached work (prompt tokens to prefill + expected output tokens) of the calls
       outstanding at r, from the router's own ledger (``OutstandingWork``): a cached prompt token
       costs no prefill, so it does not count as load. miss_r is the prompt tokens r does not cache,
       by the router's prefix index of what it sent where; prefilling them delays this call and stalls
       the calls batched beside it, hence the weight growing with r's running and waiting calls.
       miss_weight (4) also prices the second copy of the prefix a miss leaves in KV memory, which is
       the binding resource under agent load: measured on the coding-assistant and software-team
       workloads, 4 keeps jobs and agents together longer than 2 (higher hit rate, fewer preemptions,
       lower JCT) while a burst still spreads.
       overflow_r is how far the call's new tokens would push r's KV usage past ``kv_high`` (the
       preemption risk). ``kv_high`` 0.7 leaves headroom for the outputs still to be decoded; measured at
       the reference loads of both workloads it also evens memory use across GPUs (spread 0.22 vs 0.26 at
       0.9 on software-team) at an equal or higher hit rate. The same rule places each agent's static
       prefix (system prompt, static context) and keeps a job's conversation continuation where its
       predecessor's prompt is cached:
       a call stays with its prefix while that replica is not busier than the alternative by more
       than the prefill the prefix saves. An agent's calls thus stay on few replicas while the pool is
       balanced and spread exactly when the imbalance outweighs the cache hit.
    3. Ties go to the replica with the smallest prefix tree (the most free cache), then the lowest id,
       which places a new agent's prefix on an empty replica rather than beside another agent's.
    """

    long_context_tokens: int = 16384
    long_context_max_share: float = 0.5
    miss_weight: float = 4.0
    stall_weight: float = 0.05
    memory_weight: float = 1.0
    kv_high: float = 0.7
    _prefixes: RoutedPrefixes = field(default_factory=RoutedPrefixes, init=False, repr=False)
    _work: OutstandingWork = field(default_factory=OutstandingWork, init=False, repr=False)
    _agent_calls: dict[tuple[str, str], list[int]] = field(default_factory=dict, init=False, repr=False)
    _long_tokens: dict[str, float] = field(default_factory=dict, init=False, repr=False)  # decayed, per pool
    _all_tokens: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _long_set: dict[str, list[int]] = field(default_factory=dict, init=False, repr=False)

    # Per-call decay of the long-token share: a memory of about 200 calls.
    SHARE_DECAY = 0.995

    def __post_init__(self) -> None:
        if self.long_context_tokens <= 0:
            raise ValueError(f"long_context_tokens must be > 0, got {self.long_context_tokens}")
        _check_fraction("long_context_max_share", self.long_context_max_share)
        _check_fraction("kv_high", self.kv_high)
        for name in ("miss_weight", "stall_weight", "memory_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def route(self, request: RequestInfo, replicas: Sequence[ReplicaView], now: float) -> int:
        is_long = self._is_long(request)
        candidates = self._long_subset(request, replicas) if is_long else list(replicas)
        matched = self._prefixes.matched_tokens(request, replicas)
        out_tokens = max(request.expected_output_tokens, 0)

        def cost(r: ReplicaView) -> tuple[float, int, int]:
            miss = request.input_tokens - matched[r.replica_id]
            overflow = 0.0
            if r.kv_capacity_tokens > 0:
                used = r.kv_usage * r.kv_capacity_tokens
                overflow = max(0.0, used + miss + out_tokens - self.kv_high * r.kv_capacity_tokens)
            prefill = self.miss_weight * miss * (1.0 + self.stall_weight * (r.num_running + r.num_waiting))
            total = self._work.of(r) + prefill + self.memory_weight * overflow
            return total, self._prefixes.size_tokens(request, r.replica_id), r.replica_id

        chosen = min(candidates, key=cost)
        self._prefixes.record(request, chosen)
        self._work.add(chosen.replica_id, request.input_tokens - matched[chosen.replica_id] + out_tokens)
        return chosen.replica_id

    def _is_long(self, request: RequestInfo) -> bool:
        """Is this call long-context, by its own size or its agent's mean; updates the long-token share."""
        long_call = request.input_tokens >= self.long_context_tokens
        if request.agent:
            stats = self._agent_calls.setdefault((request.workflow, request.agent), [0, 0])
            stats[0] += 1
            stats[1] += request.input_tokens
            long_call = long_call or stats[1] >= self.long_context_tokens * stats[0]
        tokens = request.input_tokens + max(request.expected_output_tokens, 0)
        pool = request.pool
        self._long_tokens[pool] = self.SHARE_DECAY * self._long_tokens.get(pool, 0.0) + long_call * tokens
        self._all_tokens[pool] = self.SHARE_DECAY * self._all_tokens.get(pool, 0.0) + tokens
        return long_call

    def _long_subset(self, request: RequestInfo, replicas: Sequence[ReplicaView]) -> list[ReplicaView]:
        """The replicas long calls may use: kept from call to call, resized to the long-token share."""
        n = len(replicas)
        if n == 1:
            return list(replicas)
        share = self._long_tokens[request.pool] / max(self._all_tokens[request.pool], 1.0)
        cap = max(1, math.floor(self.long_context_max_share * n))
        k = min(max(1, math.ceil(share * n)), cap)
        by_id = {r.replica_id: r for r in replicas}
        members = [rid for rid in self._long_set.get(request.pool, []) if rid in by_id][:k]
        others = sorted((r for r in replicas if r.replica_id not in members),
                        key=lambda r: (self._work.of(r), r.replica_id))
        members += [r.replica_id for r in others[: k - len(members)]]
        self._long_set[request.pool] = members
        return [by_id[rid] for rid in members]

