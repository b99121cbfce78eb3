"""workflow.yaml, the predictability interface, and the generator that turns a workflow into a workload.

A workflow declares what a serving layer can know ahead of time about an agent application: each
agent's role, its system prompt and static context (the deterministic prompt prefix), the size of
its inputs and outputs, which agents it waits for, how many copies run in parallel (fan-out), how
many calls one copy makes (its tool loop), loops over several agents with a bounded iteration count,
and the tool time between calls. ``generate`` samples jobs from it and places them with an arrival
process; the table it returns carries the front-end hints (expected output length, next agents).

Prompts are built from content segments, and block ids are content ids of hash_block_size-token
blocks, so exactly the sharing the workflow implies shows up as prefix hits:
- every call of an agent starts with the agent's system prompt (same blocks in every job),
- calls of one job read the same job context (the agent's ``static_context_tokens`` leading tokens
  of one per-job document), after the system prompt (``prompt_layout: system-first``) or before it
  (``context-first``, so that all agents of a job share it),
- a call that continues a conversation (the next call of an agent's tool loop, or an agent with
  ``continues``) has its predecessor's whole prompt and output as its prefix.

The YAML is validated with pydantic; errors name the file, line and YAML path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from traces.arrivals import ArrivalProcess, Poisson, parse_arrivals
from traces.schema import WorkloadError
from traces.sessions import Session, no_gc, sessions_to_table

WORKFLOWS_DIR = Path(__file__).resolve().parent / "workflows"
WORKFLOWS: dict[str, Path] = {p.stem: p for p in sorted(WORKFLOWS_DIR.glob("*.yaml"))}


# ---------------------------------------------------------------------------------------------------
# Distributions (a plain number in the YAML is a constant)


class _Dist(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min: float | None = None  # samples are clipped to [min, max]
    max: float | None = None

    def sample(self, rng: np.random.Generator) -> float:
        return self._clip(self._draw(rng))

    def expected(self) -> float:
        """Mean of the unclipped distribution, clipped to [min, max]: the front end's expectation."""
        return self._clip(self._mean())

    def _clip(self, x: float) -> float:
        lo = -np.inf if self.min is None else self.min
        hi = np.inf if self.max is None else self.max
        return float(min(max(x, lo), hi))

    @model_validator(mode="after")
    def _bounds(self):
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min={self.min} is greater than max={self.max}")
        return self


class Constant(_Dist):
    dist: Literal["constant"]
    value: float

    def _draw(self, rng):
        return self.value

    def _mean(self):
        return self.value


class Uniform(_Dist):
    dist: Literal["uniform"]
    low: float
    high: float

    def _draw(self, rng):
        return rng.uniform(self.low, self.high)

    def _mean(self):
        return (self.low + self.high) / 2


class LogNormal(_Dist):
    """Parametrized by its mean and coefficient of variation, the two numbers one can read off a trace."""

    dist: Literal["lognormal"]
    mean: float = Field(gt=0)
    cv: float = Field(gt=0)

    def _draw(self, rng):
        sigma2 = np.log1p(self.cv ** 2)
        return rng.lognormal(np.log(self.mean) - sigma2 / 2, np.sqrt(sigma2))

    def _mean(self):
        return self.mean


class Exponential(_Dist):
    dist: Literal["exponential"]
    mean: float = Field(gt=0)

    def _draw(self, rng):
        return rng.exponential(self.mean)

    def _mean(self):
        return self.mean


class Geometric(_Dist):
    """Integers >= 1: the number of tries until success, e.g. loop iterations."""

    dist: Literal["geometric"]
    mean: float = Field(ge=1)

    def _draw(self, rng):
        return float(rng.geometric(1.0 / self.mean))

    def _mean(self):
        return self.mean


class Empirical(_Dist):
    """Quantiles at equally spaced probabilities 0..1 (from a trace); sampled by linear interpolation."""

    dist: Literal["empirical"]
    quantiles: list[float] = Field(min_length=2)

    @model_validator(mode="after")
    def _sorted(self):
        if any(b < a for a, b in zip(self.quantiles, self.quantiles[1:], strict=False)):
            raise ValueError("quantiles must be non-decreasing")
        return self

    def _draw(self, rng):
        q = self.quantiles
        return float(np.interp(rng.random() * (len(q) - 1), np.arange(len(q)), q))

    def _mean(self):
        q = np.asarray(self.quantiles)
        return float(((q[1:] + q[:-1]) / 2).mean())


def _number_is_constant(v: object) -> object:
    return {"dist": "constant", "value": v} if isinstance(v, int | float) and not isinstance(v, bool) else v


Dist = Annotated[Constant | Uniform | LogNormal | Exponential | Geometric | Empirical,
                 Field(discriminator="dist"), BeforeValidator(_number_is_constant)]


# ---------------------------------------------------------------------------------------------------
# Schema


class Agent(BaseModel):
    """One agent (role) of a workflow."""

    model_config = ConfigDict(extra="forbid", validate_default=True)
    role: str = ""
    system_prompt_tokens: int = Field(ge=0)
    static_context_tokens: Dist = 0  # leading tokens of the job's shared context that this agent reads
    input_tokens: Dist  # new tokens per call (task, upstream results, tool output)
    initial_input_tokens: Dist | None = None  # new tokens of a call that starts a conversation
    output_tokens: Dist
    depends_on: list[str] = []
    fan_out: Dist = 1  # parallel copies per activation
    calls: Dist = 1  # sequential calls per copy (its tool loop), each continuing the conversation
    tool_time_s: Dist = 0  # think/tool time between the parents finishing and each call
    continues: str | None = None  # first call extends this agent's latest conversation in the job
    compact_at_tokens: int | None = Field(None, ge=1)  # a longer continued prompt is compacted ...
    compacted_tokens: Dist | None = None  # ... into a new conversation: head + a summary of this size
    probability: float = Field(1.0, ge=0, le=1)  # chance an activation runs (else it is skipped)
    slo_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _compaction(self):
        if (self.compact_at_tokens is None) != (self.compacted_tokens is None):
            raise ValueError("compact_at_tokens and compacted_tokens go together (set both or neither)")
        return self


class Loop(BaseModel):
    """Agents from ``first`` to ``last`` (all agents on paths between them) run again after ``last``."""

    model_config = ConfigDict(extra="forbid")
    first: str
    last: str
    iterations: Dist  # per job, clipped to [1, max_iterations]
    max_iterations: int = Field(ge=1)


class Workflow(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    hash_block_size: int = Field(16, ge=1)
    prompt_layout: Literal["system-first", "context-first"] = "system-first"
    slo_s: float | None = Field(None, gt=0)  # default end-to-end objective per call
    agents: dict[str, Agent] = Field(min_length=1)
    loops: list[Loop] = []

    def order(self) -> list[str]:
        """Agents in dependency order (YAML order among independent ones)."""
        return _topological(self)

    def loop_body(self, loop: Loop) -> list[str]:
        down, up = _reachable(self, loop.first, downstream=True), _reachable(self, loop.last, downstream=False)
        return [a for a in self.order() if a in down and a in up]

    def next_agents(self, name: str) -> list[str]:
        """What a front end knows may run after a call of ``name``: its dependents, the loop restart if
        it closes a loop, itself if its tool loop can take another call, and, past a dependent that may
        be skipped (probability < 1), what comes after that one."""
        calls = self.agents[name].calls
        nxt = [] if isinstance(calls, Constant) and calls.value <= 1 else [name]
        todo = [name]
        while todo:
            a = todo.pop(0)
            for b in [b for b, spec in self.agents.items() if a in spec.depends_on] + \
                     [lp.first for lp in self.loops if lp.last == a]:
                if b not in nxt:
                    nxt.append(b)
                    if self.agents[b].probability < 1.0:
                        todo.append(b)
        return nxt


def _reachable(wf: Workflow, start: str, downstream: bool) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        a = todo.pop()
        nxt = ([b for b, s in wf.agents.items() if a in s.depends_on] if downstream
               else wf.agents[a].depends_on)
        for b in nxt:
            if b not in seen:
                seen.add(b)
                todo.append(b)
    return seen


def _topological(wf: Workflow) -> list[str]:
    done: list[str] = []
    left = list(wf.agents)
    while left:
        ready = [a for a in left if all(d in done for d in wf.agents[a].depends_on)]
        if not ready:
            raise WorkloadError(f"workflow '{wf.name}': agents.*.depends_on has a cycle among {left}")
        done += ready
        left = [a for a in left if a not in ready]
    return done


def _graph_errors(wf: Workflow) -> list[tuple[tuple, str]]:
    """Cross-references pydantic cannot check, as (YAML path, message)."""
    errors: list[tuple[tuple, str]] = []
    names = list(wf.agents)
    for a, spec in wf.agents.items():
        for i, d in enumerate(spec.depends_on):
            if d not in wf.agents or d == a:
                errors.append((("agents", a, "depends_on", i),
                               f"'{d}' is not another agent of this workflow (agents: {names})"))
        if spec.continues is not None and spec.continues not in wf.agents:
            errors.append((("agents", a, "continues"), f"unknown agent '{spec.continues}' (agents: {names})"))
    if errors:
        return errors
    try:
        wf.order()
    except WorkloadError as e:
        return [(("agents",), str(e).split(": ", 1)[1])]
    in_loop: dict[str, int] = {}
    for k, lp in enumerate(wf.loops):
        for key in ("first", "last"):
            if getattr(lp, key) not in wf.agents:
                errors.append((("loops", k, key), f"unknown agent '{getattr(lp, key)}' (agents: {names})"))
        if errors:
            continue
        if lp.last not in _reachable(wf, lp.first, downstream=True):
            errors.append((("loops", k), f"'{lp.last}' does not depend (directly or not) on '{lp.first}'"))
            continue
        for a in wf.loop_body(lp):
            if a in in_loop:
                errors.append((("loops", k), f"agent '{a}' is also in loops[{in_loop[a]}]; loops may not overlap"))
            in_loop[a] = k
    return errors


# ---------------------------------------------------------------------------------------------------
# Loading


def load_workflow(path_or_name: str | Path) -> Workflow:
    """A shipped workflow by name (see ``WORKFLOWS``) or a YAML file by path."""
    path = WORKFLOWS.get(str(path_or_name)) or Path(path_or_name)
    if not path.exists():
        raise WorkloadError(f"no workflow '{path_or_name}': not a shipped name ({', '.join(WORKFLOWS)}) "
                            f"and no such file")
    text = path.read_text()
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise WorkloadError(f"{path}{line}: not valid YAML: {getattr(e, 'problem', e)}") from None
    return parse_workflow(data, str(path), node)


def parse_workflow(data: object, source: str = "workflow", node: yaml.Node | None = None) -> Workflow:
    """Validate a workflow given as a dict; errors list each bad field as file:line: yaml.path: message."""
    try:
        wf = Workflow.model_validate(data)
    except ValidationError as e:
        problems = [(err["loc"], err["msg"]) for err in e.errors()]
        raise WorkloadError(_format(source, node, problems)) from None
    problems = _graph_errors(wf)
    if problems:
        raise WorkloadError(_format(source, node, problems))
    return wf


def _format(source: str, node: yaml.Node | None, problems: list[tuple[tuple, str]]) -> str:
    lines = []
    for loc, msg in problems:
        path = ".".join(str(x) for x in loc if x not in _DIST_TAGS) or "(top level)"
        lines.append(f"{source}{_line(node, loc)}: {path}: {msg}")
    return "invalid workflow:\n  " + "\n  ".join(lines)


_DIST_TAGS = {"constant", "uniform", "lognormal", "exponential", "geometric", "empirical"}


def _line(node: yaml.Node | None, loc: tuple) -> str:
    """':N' for the deepest YAML node on ``loc`` (pydantic's error location)."""
    if node is None:
        return ""
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if k.value == str(key)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            child = node.value[key]
        else:
            child = None
        if child is None:
            break
        node = child
    return f":{node.start_mark.line + 1}"


# ---------------------------------------------------------------------------------------------------
# Generation


@dataclass
class _Call:
    index: int  # within the job
    segments: tuple[tuple[int, int, int], ...]  # prompt as (content id, offset in that content, tokens)
    length: int
    blocks: np.ndarray
    output: tuple[int, int, int]  # the output segment (a continuing call appends it to its prompt)


class _Contents:
    """Content ids for prompt segments, and block ids interned from the content a block covers."""

    def __init__(self, block: int):
        self.block = block
        self.next_content = 0
        self.blocks: dict[tuple, int] = {}

    def new(self) -> int:
        self.next_content += 1
        return self.next_content - 1

    def block_ids(self, segments: tuple, length: int, reuse: _Call | None) -> np.ndarray:
        """Ids of the prompt's blocks; the full blocks of ``reuse`` (a prompt prefix) are copied."""
        keep = reuse.length // self.block if reuse is not None else 0
        start = keep * self.block
        ids: list[int] = []
        pieces: list[tuple[int, int, int]] = []
        block_end, pos = start + self.block, 0
        for content, offset, n in segments:
            seg_start, pos = pos, pos + n
            a = max(seg_start, start)
            while a < pos:
                b = min(pos, block_end)
                pieces.append((content, offset + a - seg_start, offset + b - seg_start))
                a = b
                if a == block_end:
                    ids.append(self.blocks.setdefault(tuple(pieces), len(self.blocks)))
                    pieces, block_end = [], block_end + self.block
        if pieces:
            ids.append(self.blocks.setdefault(tuple(pieces), len(self.blocks)))
        new = np.asarray(ids, dtype=np.int64)
        return np.concatenate([reuse.blocks[:keep], new]) if keep else new


class _Job:
    """Samples one job of a workflow: its calls, their prompts and dependencies."""

    def __init__(self, wf: Workflow, job: int, rng: np.random.Generator, contents: _Contents,
                 system: dict[str, int]):
        self.wf, self.rng, self.c, self.system = wf, rng, contents, system
        self.document = contents.new()  # the job's static context
        self.context_tokens: dict[str, int] = {}
        self.calls: list[_Call] = []
        self.rows: dict[str, list] = {k: [] for k in ("t", "input", "output", "think", "parents", "agent")}
        self.latest: dict[tuple[str, int], _Call] = {}  # (agent, lane) -> last call of that conversation
        self.session_id = f"{wf.name}-{job}"

    def run(self) -> Session:
        done: dict[str, list[int]] = {}  # agent -> calls its dependents wait for
        for unit in _units(self.wf):
            if isinstance(unit, str):
                done[unit] = self._activate(unit, self._deps(unit, done))
                continue
            n = int(np.clip(round(unit.iterations.sample(self.rng)), 1, unit.max_iterations))
            body = self.wf.loop_body(unit)
            for it in range(n):
                for b in body:  # later iterations wait only for the loop itself (upstream is long done)
                    parents = self._deps(b, done, within=None if it == 0 else body)
                    restart = done[unit.last] if (b == unit.first and it > 0) else []
                    done[b] = self._activate(b, sorted(set(parents) | set(restart)))
        wf = self.wf
        agent = self.rows["agent"]
        expected = {a: round(spec.output_tokens.expected()) for a, spec in wf.agents.items()}
        hints = {a: ",".join(wf.next_agents(a)) for a in wf.agents}
        return Session(
            session_id=self.session_id, t=np.asarray(self.rows["t"], dtype=float),
            input_tokens=np.asarray(self.rows["input"], dtype=np.int64),
            output_tokens=np.asarray(self.rows["output"], dtype=np.int64),
            think_s=np.asarray(self.rows["think"], dtype=float), parents=self.rows["parents"], agent=agent,
            hashes=[c.blocks for c in self.calls], hash_block_size=wf.hash_block_size, workflow=wf.name,
            expected_output_tokens=np.asarray([expected[a] for a in agent], dtype=np.int64),
            next_agents=[hints[a] for a in agent],
            slo_s=np.asarray([_slo(wf, a) for a in agent], dtype=float))

    def _deps(self, a: str, done: dict[str, list[int]], within: list[str] | None = None) -> list[int]:
        deps = [d for d in self.wf.agents[a].depends_on if within is None or d in within]
        return sorted({p for d in deps for p in done[d]})

    def _activate(self, a: str, parents: list[int]) -> list[int]:
        """Run agent ``a`` once after ``parents``; return the calls its dependents wait for."""
        spec = self.wf.agents[a]
        if spec.probability < 1.0 and self.rng.random() >= spec.probability:
            return parents  # skipped: dependents wait for what it would have waited for
        ends = []
        for lane in range(max(1, round(spec.fan_out.sample(self.rng)))):
            prev = None
            if spec.continues is not None:
                prev = self.latest.get((spec.continues, lane)) or self.latest.get((spec.continues, 0))
            ps = parents
            for step in range(max(1, round(spec.calls.sample(self.rng)))):
                call = self._call(a, spec, prev, ps, first=(step == 0 and prev is None))
                prev, ps = call, [call.index]
            self.latest[(a, lane)] = prev
            ends.append(prev.index)
        return ends

    def _call(self, a: str, spec: Agent, prev: _Call | None, parents: list[int], first: bool) -> _Call:
        dist = spec.initial_input_tokens if (first and spec.initial_input_tokens is not None) else spec.input_tokens
        new = (self.c.new(), 0, max(1, round(dist.sample(self.rng))))
        if prev is not None and spec.compact_at_tokens is not None \
                and prev.length + prev.output[2] + new[2] > spec.compact_at_tokens:
            prev = None  # the conversation is summarized into a fresh one
            new = (new[0], 0, max(1, round(spec.compacted_tokens.sample(self.rng))))
        if prev is not None:
            segments = prev.segments + (prev.output, new)
        else:
            head = [(self.system[a], 0, spec.system_prompt_tokens), (self.document, 0, self._context(a, spec))]
            if self.wf.prompt_layout == "context-first":
                head.reverse()
            segments = tuple(s for s in head if s[2] > 0) + (new,)
        length = sum(s[2] for s in segments)
        n_out = max(1, round(spec.output_tokens.sample(self.rng)))
        call = _Call(len(self.calls), segments, length, self.c.block_ids(segments, length, prev),
                     (self.c.new(), 0, n_out))
        think = spec.tool_time_s.sample(self.rng) if parents else 0.0
        self.calls.append(call)
        r = self.rows
        r["t"].append(max((r["t"][p] for p in parents), default=0.0) + think)
        r["input"].append(length)
        r["output"].append(n_out)
        r["think"].append(max(0.0, think))
        r["parents"].append(list(parents))
        r["agent"].append(a)
        return call

    def _context(self, a: str, spec: Agent) -> int:
        if a not in self.context_tokens:
            self.context_tokens[a] = max(0, round(spec.static_context_tokens.sample(self.rng)))
        return self.context_tokens[a]


def _units(wf: Workflow) -> list[str | Loop]:
    """Agents outside loops and whole loops, in an order where everything a unit waits for comes first."""
    members: dict[int, list[str]] = {}
    key = {}
    for k, lp in enumerate(wf.loops):
        members[k] = wf.loop_body(lp)
        key.update({a: k for a in members[k]})
    units: list[str | int] = []
    for a in wf.order():
        u = key.get(a, a)
        if u not in units:
            units.append(u)
    waits = {u: {key.get(d, d) for a in (members[u] if isinstance(u, int) else [u])
                 for d in wf.agents[a].depends_on} - {u} for u in units}
    ordered: list[str | int] = []
    while len(ordered) < len(units):
        ordered.append(next(u for u in units if u not in ordered and waits[u] <= set(ordered)))
    return [wf.loops[u] if isinstance(u, int) else u for u in ordered]


def _slo(wf: Workflow, agent: str) -> float:
    slo = wf.agents[agent].slo_s or wf.slo_s
    return float("nan") if slo is None else slo


def generate(workflow: Workflow | str | Path, arrivals: ArrivalProcess | str | dict,
             num_jobs: int | None = None, duration_s: float | None = None, seed: int = 0,
             max_input_tokens: int | None = None) -> pd.DataFrame:
    """Sample jobs of ``workflow`` started by ``arrivals`` (``num_jobs`` of them, or all that start
    within ``duration_s``) as a validated canonical table. Same arguments, same table, bit for bit.

    ``arrival_s`` of a dependent call is an estimate: the time it would be released if every call took
    no time (job start + the tool times along its longest parent chain). ``max_input_tokens`` keeps the
    first N tokens of every prompt, as for the traces.
    """
    wf = workflow if isinstance(workflow, Workflow) else load_workflow(workflow)
    if (num_jobs is None) == (duration_s is None):
        raise WorkloadError("generate: give exactly one of num_jobs or duration_s")
    if num_jobs is not None and num_jobs < 0 or duration_s is not None and not duration_s > 0:
        raise WorkloadError(f"generate: num_jobs={num_jobs} must be >= 0, duration_s={duration_s} > 0")
    if max_input_tokens is not None and max_input_tokens < 1:
        raise WorkloadError(f"generate: max_input_tokens={max_input_tokens} must be >= 1")
    process = parse_arrivals(arrivals)
    starts = process.times(np.random.default_rng([seed, 0]), n=num_jobs, duration_s=duration_s)
    contents = _Contents(wf.hash_block_size)
    system = {a: contents.new() for a in wf.agents}
    with no_gc():
        jobs = [_Job(wf, j, np.random.default_rng([seed, 1, j]), contents, system).run() for j in range(len(starts))]
    for s in jobs:
        if max_input_tokens is not None:
            s.truncate(max_input_tokens)
    return sessions_to_table(jobs, starts, f"workflow '{wf.name}'")


def make_workload(name: str, *, rate: float | None = None, arrivals: ArrivalProcess | str | dict | None = None,
                  duration_s: float | None = None, num_jobs: int | None = None, seed: int = 0,
                  **knobs) -> pd.DataFrame:
    """A workload by name, for experiments: a shipped workflow (or YAML path) or a shared trace.

    Workflows: jobs arrive by ``arrivals`` or Poisson at ``rate`` jobs/s (default 1.0) for ``duration_s``
    (default 600 s) or ``num_jobs``. Traces: ``load_trace(name, seed=seed, **knobs)``; for agent-session
    traces ``rate`` is the session rate. ``max_input_tokens`` applies to both.
    """
    from traces.loaders import TRACES, load_trace

    if name in TRACES:
        if duration_s is not None or num_jobs is not None:
            raise WorkloadError(f"make_workload('{name}'): a trace has its own length; use window_s or "
                                "max_sessions instead of duration_s / num_jobs")
        if rate is not None:
            knobs["session_rate"] = rate
        return load_trace(name, arrivals=arrivals, seed=seed, **knobs)
    unknown = set(knobs) - {"max_input_tokens"}
    if unknown:
        raise WorkloadError(f"make_workload('{name}'): unknown option(s) {sorted(unknown)} for a workflow")
    process = parse_arrivals(arrivals) if arrivals is not None else Poisson(1.0 if rate is None else rate)
    if num_jobs is None and duration_s is None:
        duration_s = 600.0
    return generate(name, process, num_jobs=num_jobs, duration_s=duration_s, seed=seed, **knobs)
