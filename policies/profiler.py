"""Pythia's workflow profiler: what a front end can learn of an agent application from the calls it served.

The paper's premise is that agent workflows are predictable: the same roles (agents) recur, each with its own
static prompt prefix, output lengths, tool times and successors. ``Profiler`` learns that, per workflow, from
completed calls only (``observe``: what a real front end sees at the end of an HTTP stream, plus the job DAG it
released), so the same object runs on the simulator and on real vLLM:

- **roles**: the call's agent name; a trace without one gets a role per leading prompt block (the system prompt
  every call of a role starts with), i.e. prefix clustering;
- **output-length bound** per role: the ``quantile`` (p90) of its recent outputs, not the mean, so that a memory
  reservation made from it rarely falls short;
- **tool time** per role: the gap between a call's end and the release of the call that waited for it;
- **static prefix** per role: the block-hash run that (nearly) every call of the role shares: the leading blocks
  of its first call, cut to the length that a ``prefix_share`` of its calls match;
- **automaton**, learned when a job ends (its DAG is then complete): for a call of role ``a`` at position ``p``
  (calls of its job released before it, in log2 buckets), P(a call of role ``b`` follows | a, p), the fan-out of
  ``b`` when it does, and the calls and tokens the job still had to run after it (its remaining work).

Until a role has ``min_samples`` observations the profiler keeps the request's own hints (workflow.yaml's, if
any). It can be seeded offline from a table of completed calls (``fit``: a trace, or jobs generated from a
workflow.yaml, ``from_workflow``), and keeps learning online. Everything is deterministic: bounded windows of
the most recent samples, no randomness.

``python -m policies.profiler coding-assistant software-team claude-code-v8`` prints the prediction report
(``report``): it fits on the even jobs of a workload and predicts the odd ones.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter, deque
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from policies.api import CallDone, RequestInfo, program_of

MAX_BUCKET = 12  # position buckets: 0, 1, 2-3, 4-7, ..., >= 2**11
PREFIX_BLOCKS_CAP = 4096  # leading blocks a role's static-prefix candidate keeps


def bucket(position: int) -> int:
    """Log2 bucket of a call's position in its job (0 for the first call)."""
    return min(int(position + 1).bit_length() - 1, MAX_BUCKET)


class Samples:
    """The most recent ``window`` values of one quantity, with a cached quantile (recomputed every ``REFRESH``
    new values, so a lookup per call stays O(1))."""

    REFRESH = 16

    def __init__(self, window: int):
        self.values: deque[float] = deque(maxlen=window)
        self.count = 0
        self._cache: dict[float, float] = {}
        self._cached_at = -1

    def add(self, value: float) -> None:
        self.values.append(float(value))
        self.count += 1

    def quantile(self, q: float) -> float:
        if self.count != self._cached_at and (self.count - self._cached_at >= self.REFRESH or self.count < 64):
            self._cache, self._cached_at = {}, self.count
        if q not in self._cache:
            self._cache[q] = float(np.quantile(np.fromiter(self.values, float), q))
        return self._cache[q]

    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    def __len__(self) -> int:
        return len(self.values)


@dataclass
class Role:
    """What the profiler knows of one role of one workflow."""

    output: Samples
    tool_s: Samples  # gap from a call's end to the release of a call that waited for it
    input: Samples
    prefix: tuple[int, ...] = ()  # candidate static prefix: the leading blocks of the role's first call
    shared: Samples | None = None  # blocks of ``prefix`` each call matched
    hash_block_size: int = 0


@dataclass
class Step:
    """Automaton statistics of calls of one role at one position bucket."""

    calls: int = 0
    followed_by: Counter = field(default_factory=Counter)  # role b -> calls followed by at least one b
    fan_out: Counter = field(default_factory=Counter)  # role b -> b-calls that followed
    remaining_calls: float = 0.0  # sums over the calls, for the means
    remaining_tokens: float = 0.0


@dataclass
class _Call:
    """A call of a job still running, as the profiler follows it."""

    role: str
    position: int
    parents: tuple[int, ...]
    tokens: int  # prompt + output (prompt + predicted output until it ends)
    finish_s: float = math.nan


@dataclass(frozen=True)
class Next:
    """A predicted successor role: the probability a call of it follows, and how many follow when one does."""

    role: str
    probability: float
    fan_out: float


@dataclass
class Profiler:
    """Pythia's profiler (a ``policies.api.Predictor``); see the module docstring."""

    quantile: float = 0.9
    window: int = 2048
    min_samples: int = 20
    prefix_share: float = 0.8
    next_threshold: float = 0.5  # a role goes into ``next_agents`` from this probability on
    _roles: dict[tuple[str, str], Role] = field(default_factory=dict, init=False, repr=False)
    _steps: dict[tuple[str, str, int], Step] = field(default_factory=dict, init=False, repr=False)
    _jobs: dict[str, dict[int, _Call]] = field(default_factory=dict, init=False, repr=False)
    _role_of: dict[int, tuple[str, str]] = field(default_factory=dict, init=False, repr=False)  # running calls

    def __post_init__(self) -> None:
        for name in ("quantile", "prefix_share", "next_threshold"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"Profiler.{name} must be in (0, 1], got {value}")
        for name in ("window", "min_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"Profiler.{name} must be >= 1, got {getattr(self, name)}")

    # --- roles -------------------------------------------------------------------------------------------
    @staticmethod
    def role_of(request: RequestInfo) -> str:
        """The call's agent, else its leading prompt block (prefix clustering)."""
        if request.agent:
            return request.agent
        return f"prefix:{request.block_hashes[0]:x}" if request.block_hashes else "prefix:none"

    def _role(self, workflow: str, role: str) -> Role:
        key = (workflow, role)
        r = self._roles.get(key)
        if r is None:
            r = self._roles[key] = Role(Samples(self.window), Samples(self.window), Samples(self.window))
        return r

    def roles(self, workflow: str) -> list[str]:
        return sorted(r for w, r in self._roles if w == workflow)

    # --- predictions -------------------------------------------------------------------------------------
    def output_bound(self, workflow: str, role: str) -> int:
        """The role's output-length bound (its ``quantile``), -1 until it has ``min_samples`` outputs."""
        r = self._roles.get((workflow, role))
        if r is None or len(r.output) < self.min_samples:
            return -1
        return max(1, math.ceil(r.output.quantile(self.quantile)))

    def mean_call_tokens(self, workflow: str, role: str) -> float:
        """Mean prompt + output tokens of a call of the role (NaN: none seen)."""
        r = self._roles.get((workflow, role))
        if r is None or not len(r.output) or not len(r.input):
            return math.nan
        return r.input.mean() + r.output.mean()

    def tool_time(self, workflow: str, role: str, q: float) -> float:
        """The ``q`` quantile of the gap after a call of the role ends (NaN until ``min_samples`` gaps)."""
        r = self._roles.get((workflow, role))
        if r is None or len(r.tool_s) < self.min_samples:
            return math.nan
        return r.tool_s.quantile(q)

    def static_prefix(self, workflow: str, role: str) -> tuple[tuple[int, ...], int]:
        """The block hashes every call of the role (a ``prefix_share`` of them) starts with, and the block size."""
        r = self._roles.get((workflow, role))
        if r is None or r.shared is None or len(r.shared) < self.min_samples:
            return (), 0
        n = int(r.shared.quantile(1.0 - self.prefix_share))
        return r.prefix[:n], r.hash_block_size

    def _step(self, workflow: str, role: str, position: int) -> Step | None:
        """The automaton state of (role, position), falling back to nearer positions with enough calls."""
        b = bucket(position)
        for k in [b] + [x for d in range(1, MAX_BUCKET + 1) for x in (b - d, b + d) if 0 <= x <= MAX_BUCKET]:
            s = self._steps.get((workflow, role, k))
            if s is not None and s.calls >= self.min_samples:
                return s
        return None

    def next_roles(self, workflow: str, role: str, position: int) -> list[Next]:
        """Roles that may follow a call of ``role`` at ``position``, most probable first ([]: not learned yet)."""
        s = self._step(workflow, role, position)
        if s is None:
            return []
        out = [Next(b, n / s.calls, s.fan_out[b] / n) for b, n in s.followed_by.items()]
        return sorted(out, key=lambda x: (-x.probability, x.role))

    def remaining(self, workflow: str, role: str, position: int) -> tuple[float, float]:
        """Expected calls and tokens the job runs after a call of ``role`` at ``position`` (NaN: not learned)."""
        s = self._step(workflow, role, position)
        if s is None:
            return math.nan, math.nan
        return s.remaining_calls / s.calls, s.remaining_tokens / s.calls

    def position(self, request: RequestInfo) -> int:
        """Calls of the request's job released before it (0 for a call this profiler did not annotate)."""
        call = self._jobs.get(program_of(request), {}).get(request.request_id)
        return 0 if call is None else call.position

    # --- the Predictor contract ---------------------------------------------------------------------------
    def annotate(self, request: RequestInfo, now: float) -> RequestInfo:
        """Record the released call (its position; the tool time its parents' role took) and fill its hints: the
        role's output bound and its likely successors, where learned; else the request's own hints stay."""
        role = self.role_of(request)
        wf = request.workflow
        job = self._jobs.setdefault(program_of(request), {}) if request.job_id >= 0 else None
        position = len(job) if job is not None else 0
        ends = []
        for p in request.parents:
            parent = job.get(p) if job is not None else None
            if parent is not None and not math.isnan(parent.finish_s):
                ends.append((parent.finish_s, parent.role))
        if ends:
            finish, parent_role = max(ends)
            self._role(wf, parent_role).tool_s.add(max(now - finish, 0.0))
        bound = self.output_bound(wf, role)
        if job is not None:
            job[request.request_id] = _Call(role, position, request.parents,
                                            request.input_tokens + max(bound, request.expected_output_tokens, 0))
        self._role_of[request.request_id] = (wf, role)
        nxt = tuple(n.role for n in self.next_roles(wf, role, position) if n.probability >= self.next_threshold)
        changes: dict[str, object] = {}
        if bound > 0:
            changes["expected_output_tokens"] = bound
        if nxt or self._step(wf, role, position) is not None:
            changes["next_agents"] = nxt
        return replace(request, **changes) if changes else request

    def observe(self, done: CallDone) -> None:
        req = done.request
        wf, role = self._role_of.pop(req.request_id, (req.workflow, self.role_of(req)))
        if done.status == "ok":
            self._learn_call(wf, role, req.input_tokens, done.output_tokens, req.block_hashes, req.hash_block_size)
        key = program_of(req)
        job = self._jobs.get(key)
        if job is not None and req.request_id in job:
            call = job[req.request_id]
            call.finish_s = done.finish_s
            call.tokens = req.input_tokens + done.output_tokens
        if done.program_done and job is not None:
            self._learn_job(wf, list(job.items()))
            del self._jobs[key]

    # --- learning ------------------------------------------------------------------------------------------
    def _learn_call(self, wf: str, role: str, input_tokens: int, output_tokens: int, blocks: tuple[int, ...],
                    hash_block_size: int) -> None:
        r = self._role(wf, role)
        r.output.add(output_tokens)
        r.input.add(input_tokens)
        if r.shared is None:
            r.prefix, r.hash_block_size, r.shared = tuple(blocks[:PREFIX_BLOCKS_CAP]), hash_block_size, \
                Samples(self.window)
        n = 0
        for a, b in zip(r.prefix, blocks, strict=False):
            if a != b:
                break
            n += 1
        r.shared.add(n)

    def _learn_job(self, wf: str, calls: list[tuple[int, _Call]]) -> None:
        """A finished job's DAG: successors, fan-outs and remaining work of each of its calls."""
        calls.sort(key=lambda x: x[1].position)
        children: dict[int, Counter] = {rid: Counter() for rid, _ in calls}
        for _, c in calls:
            for p in c.parents:
                if p in children:
                    children[p][c.role] += 1
        after = np.cumsum([c.tokens for _, c in calls][::-1])[::-1]  # tokens of this call and every later one
        n = len(calls)
        for i, (rid, c) in enumerate(calls):
            key = (wf, c.role, bucket(c.position))
            s = self._steps.get(key)
            if s is None:
                s = self._steps[key] = Step()
            s.calls += 1
            for b, k in children[rid].items():
                s.followed_by[b] += 1
                s.fan_out[b] += k
            s.remaining_calls += n - i - 1
            s.remaining_tokens += float(after[i] - c.tokens)

    def fit(self, table: pd.DataFrame) -> Profiler:
        """Learn offline from a canonical table of completed calls (a trace, or generated jobs): each call's output
        and prefix, the tool time before it (``think_s``, credited to its first parent's role), and each job's DAG.
        Returns self."""
        cols = ["request_id", "job_id", "session_id", "workflow", "agent", "input_tokens", "output_tokens",
                "block_hashes", "hash_block_size", "parents", "think_s"]
        jobs: dict[int, list[tuple[int, _Call]]] = {}
        wf_of: dict[int, str] = {}
        role_of: dict[int, str] = {}
        for rid, job, sess, wf, agent, inp, out, blocks, hbs, parents, think in zip(
                *(table[c].tolist() for c in cols), strict=True):
            blocks = tuple(blocks)
            role = self.role_of(RequestInfo(rid, 0.0, inp, blocks, hbs, session_id=sess, agent=agent))
            role_of[rid] = role
            self._learn_call(wf, role, inp, out, blocks, hbs)
            parents = tuple(int(p) for p in parents)
            if parents and parents[0] in role_of:
                self._role(wf, role_of[parents[0]]).tool_s.add(think)
            if job >= 0:
                calls = jobs.setdefault(job, [])
                calls.append((rid, _Call(role, len(calls), parents, inp + out)))
                wf_of[job] = wf
        for job, calls in jobs.items():
            self._learn_job(wf_of[job], calls)
        return self

    @classmethod
    def from_workflow(cls, workflow: str, num_jobs: int = 50, seed: int = 0, **params: object) -> Profiler:
        """A profiler seeded from a workflow.yaml: fitted to ``num_jobs`` jobs generated from it."""
        from traces.workflow import make_workload

        return cls(**params).fit(make_workload(workflow, rate=1.0, num_jobs=num_jobs, seed=seed))  # type: ignore[arg-type]


# --- the prediction report ----------------------------------------------------------------------------------


def report(table: pd.DataFrame, **params: object) -> dict:
    """Fit a profiler on the even jobs of ``table`` and predict its odd jobs (held out): output-bound coverage
    (share of calls whose output is within the bound) and the bound's mean over the mean output, next-agent
    accuracy (calls followed by another call whose most probable predicted successor role is among their actual
    successors), tool-time error (median |predicted median gap - actual gap|) and p90 coverage, and the relative
    error of the predicted remaining calls of a job after each call."""
    train = table[table["job_id"] % 2 == 0]
    test = table[table["job_id"] % 2 == 1]
    prof = Profiler(**params).fit(train)  # type: ignore[arg-type]
    wf = table["workflow"].iloc[0]
    role = {rid: prof.role_of(RequestInfo(rid, 0.0, 0, tuple(b), 1, agent=a))
            for rid, a, b in zip(test["request_id"], test["agent"], test["block_hashes"], strict=True)}
    position: dict[int, int] = {}
    per_job: Counter = Counter()
    children: dict[int, set[str]] = {rid: set() for rid in role}
    for rid, job, parents in zip(test["request_id"], test["job_id"], test["parents"], strict=True):
        position[rid] = per_job[job]
        per_job[job] += 1
        for p in parents:
            children[int(p)].add(role[rid])
    covered, bound_sum, out_sum = [], 0.0, 0.0
    for rid, out in zip(test["request_id"], test["output_tokens"], strict=True):
        b = prof.output_bound(wf, role[rid])
        if b > 0:
            covered.append(out <= b)
            bound_sum, out_sum = bound_sum + b, out_sum + out
    hits = []
    for rid, kids in children.items():
        if kids:
            nxt = prof.next_roles(wf, role[rid], position[rid])
            hits.append(bool(nxt) and nxt[0].role in kids)
    gaps, in_p90 = [], []
    for parents, think in zip(test["parents"], test["think_s"], strict=True):
        if len(parents):
            r = role[int(parents[0])]
            med, p90 = prof.tool_time(wf, r, 0.5), prof.tool_time(wf, r, 0.9)
            if not math.isnan(med):
                gaps.append(abs(med - think))
                in_p90.append(think <= p90)
    err, actual = [], []
    for job, n in per_job.items():
        for rid in test.loc[test["job_id"] == job, "request_id"]:
            pred, _ = prof.remaining(wf, role[rid], position[rid])
            if not math.isnan(pred):
                err.append(abs(pred - (n - position[rid] - 1)))
                actual.append(n - position[rid] - 1)
    nan = math.nan
    return {
        "roles": len(prof.roles(wf)), "test_calls": len(test),
        "output_bound_coverage": float(np.mean(covered)) if covered else nan,
        "bound_over_mean_output": bound_sum / out_sum if out_sum else nan,
        "next_agent_accuracy": float(np.mean(hits)) if hits else nan,
        "tool_time_median_abs_err_s": float(np.median(gaps)) if gaps else nan,
        "tool_time_p90_coverage": float(np.mean(in_p90)) if in_p90 else nan,
        "remaining_calls_rel_err": float(np.sum(err) / max(np.sum(actual), 1)) if err else nan,
        "static_prefix_tokens": {r: len(prof.static_prefix(wf, r)[0]) * prof.static_prefix(wf, r)[1]
                                 for r in prof.roles(wf)},
    }


def main(argv: list[str] | None = None) -> int:
    from traces.loaders import TRACES
    from traces.workflow import make_workload

    ap = argparse.ArgumentParser(prog="python -m policies.profiler", description=report.__doc__.split("\n")[0])
    ap.add_argument("workloads", nargs="+", help="shipped workflows or shared traces")
    ap.add_argument("--jobs", type=int, default=400, help="jobs generated from a workflow (a trace: all of it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quantile", type=float, default=0.9, help="the output-length bound's quantile")
    args = ap.parse_args(argv)
    rows = []
    for w in args.workloads:
        table = make_workload(w, seed=args.seed) if w in TRACES else \
            make_workload(w, rate=1.0, num_jobs=args.jobs, seed=args.seed)
        r = report(table, quantile=args.quantile)
        prefixes = r.pop("static_prefix_tokens")
        rows.append({"workload": w, **r})
        print(f"{w}: static prefix tokens per role: {prefixes}")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
