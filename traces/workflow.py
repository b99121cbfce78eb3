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
  ``continues``) has its predecessor's whole prompt and output as its prefix,
- a conversation that would outgrow the model's context window (``context_limit_tokens``), or the agent's own
  ``compact_at_tokens``, is compacted as agent harnesses do (``traces.compaction``): system prompt and static
  context, a new summary, the most recent turns.

``scale_workflow`` and ``scale_to_means`` rescale a workflow's token distributions (e.g. to a mean prompt and
output length) without changing its structure.

The YAML is validated with pydantic; errors name the file, line and YAML path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import numpy as np
import pandas as pd
import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from traces.arrivals import ArrivalProcess, Poisson
from traces.compaction import DEFAULT_CONTEXT_LIMIT, check_limit, plan
from traces.loaders import TRACES, load_trace, resolve_arrivals
from traces.schema import MAX_ROWS, MAX_TOKENS, WorkloadError
from traces.sessions import Session, no_gc, sessions_to_table

WORKFLOWS_DIR = Path(__file__).resolve().parent / "workflows"
WORKFLOWS: dict[str, Path] = {p.stem: p for p in sorted(WORKFLOWS_DIR.glob("*.yaml"))}
# Bounds on a workflow's counts (tokens: traces.schema.MAX_TOKENS), so that a mistyped 1e9 is refused at its line
# instead of generating until memory runs out.
MAX_FAN_OUT = 1024  # parallel copies of one agent activation
MAX_CALLS = 10_000  # sequential calls of one copy (its tool loop), and loop iterations
MAX_JOB_CALLS = 100_000  # calls of one job, all agents and loops together


# ---------------------------------------------------------------------------------------------------
# Distributions (a plain number in the YAML is a constant)


class _Dist(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    min: float | None = None  # samples are clipped to [min, max]
    max: float | None = None
    _SIZES: ClassVar[tuple[str, ...]] = ()  # the parameters that scale with the samples

    def sample(self, rng: np.random.Generator) -> float:
        return self._clip(self._draw(rng))

    def bounds(self) -> tuple[float, float]:
        """The smallest and largest value a sample can take (its support, clipped to [min, max])."""
        lo, hi = self._support()
        return self._clip(lo), self._clip(hi)

    def scaled(self, factor: float, at_least: float | None = None):
        """The distribution of ``factor`` x its samples (bounds included); with ``at_least``, samples below it are
        raised to it (``min``), e.g. token sizes scaled below one token are one token."""
        fields = [*self._SIZES, *(k for k in ("min", "max") if getattr(self, k) is not None)]
        out = self.model_copy(update={k: _times(getattr(self, k), factor) for k in fields})
        if at_least is not None and out.bounds()[0] < at_least:
            raise_max = out.max is not None and out.max < at_least
            out = out.model_copy(update={"min": at_least, **({"max": at_least} if raise_max else {})})
        return out

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


def _times(x: float | list[float], factor: float) -> float | list[float]:
    return [v * factor for v in x] if isinstance(x, list) else x * factor


class Constant(_Dist):
    dist: Literal["constant"]
    value: float
    _SIZES = ("value",)

    def _draw(self, rng):
        return self.value

    def _mean(self):
        return self.value

    def _support(self):
        return self.value, self.value


class Uniform(_Dist):
    dist: Literal["uniform"]
    low: float
    high: float
    _SIZES = ("low", "high")

    @model_validator(mode="after")
    def _ordered(self):
        if self.low > self.high:
            raise ValueError(f"low={self.low} is greater than high={self.high}")
        return self

    def _support(self):
        return self.low, self.high

    def _draw(self, rng):
        return rng.uniform(self.low, self.high)

    def _mean(self):
        return (self.low + self.high) / 2


class LogNormal(_Dist):
    """Parametrized by its mean and coefficient of variation, the two numbers one can read off a trace."""

    dist: Literal["lognormal"]
    mean: float = Field(gt=0)
    cv: float = Field(gt=0)
    _SIZES = ("mean",)

    def _support(self):
        return 0.0, np.inf

    def _draw(self, rng):
        sigma2 = np.log1p(self.cv ** 2)
        return rng.lognormal(np.log(self.mean) - sigma2 / 2, np.sqrt(sigma2))

    def _mean(self):
        return self.mean


class Exponential(_Dist):
    dist: Literal["exponential"]
    mean: float = Field(gt=0)
    _SIZES = ("mean",)

    def _support(self):
        return 0.0, np.inf

    def _draw(self, rng):
        return rng.exponential(self.mean)

    def _mean(self):
        return self.mean


class Geometric(_Dist):
    """Integers >= 1: the number of tries until success, e.g. loop iterations."""

    dist: Literal["geometric"]
    mean: float = Field(ge=1)

    def scaled(self, factor: float, at_least: float | None = None):
        raise WorkloadError(f"a geometric distribution (mean {self.mean}) counts tries and cannot be scaled by "
                            f"{factor}; give token sizes as another distribution")

    def _support(self):
        return 1.0, np.inf

    def _draw(self, rng):
        return float(rng.geometric(1.0 / self.mean))

    def _mean(self):
        return self.mean


class Empirical(_Dist):
    """Quantiles at equally spaced probabilities 0..1 (from a trace); sampled by linear interpolation."""

    dist: Literal["empirical"]
    quantiles: list[float] = Field(min_length=2)
    _SIZES = ("quantiles",)

    @model_validator(mode="after")
    def _sorted(self):
        if any(b < a for a, b in zip(self.quantiles, self.quantiles[1:], strict=False)):
            raise ValueError("quantiles must be non-decreasing")
        return self

    def _support(self):
        return self.quantiles[0], self.quantiles[-1]

    def _draw(self, rng):
        q = self.quantiles
        return float(np.interp(rng.random() * (len(q) - 1), np.arange(len(q)), q))

    def _mean(self):
        q = np.asarray(self.quantiles)
        return float(((q[1:] + q[:-1]) / 2).mean())


def _number_is_constant(v: object) -> object:
    if isinstance(v, str):
        raise ValueError(f"{v!r} is text; write a number (e.g. 1000 or 1.0e+12) or a distribution "
                         "({dist: lognormal, mean: 1000, cv: 0.5, min: 1, max: 8000})")
    return {"dist": "constant", "value": v} if isinstance(v, int | float) and not isinstance(v, bool) else v


Dist = Annotated[Constant | Uniform | LogNormal | Exponential | Geometric | Empirical,
                 Field(discriminator="dist"), BeforeValidator(_number_is_constant)]


def _within(low: float, high: float, unit: str):
    """A check that every sample of a distribution lies in [low, high] (``unit`` names what it counts)."""
    def check(d: _Dist) -> _Dist:
        lo, hi = d.bounds()
        if lo < low or hi > high:
            allowed = f"the allowed [{_num(low)}, {_num(high)}] {unit}"
            if isinstance(d, Constant):
                raise ValueError(f"{_num(d.value)} is outside {allowed}")
            raise ValueError(f"a {d.dist} distribution draws values in [{_num(lo)}, {_num(hi)}], beyond {allowed}; "
                             "bound it with min and max")
        return d
    return AfterValidator(check)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


Tokens = Annotated[Dist, _within(1, MAX_TOKENS, "tokens")]
TokensOrZero = Annotated[Dist, _within(0, MAX_TOKENS, "tokens")]
Seconds = Annotated[Dist, _within(0, np.inf, "seconds")]


# ---------------------------------------------------------------------------------------------------
# Schema


class Agent(BaseModel):
    """One agent (role) of a workflow."""

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)
    role: str = ""
    system_prompt_tokens: int = Field(ge=0, le=MAX_TOKENS)
    static_context_tokens: TokensOrZero = 0  # leading tokens of the job's shared context that this agent reads
    input_tokens: Tokens  # new tokens per call (task, upstream results, tool output)
    initial_input_tokens: Tokens | None = None  # new tokens of a call that starts a conversation
    output_tokens: Tokens
    depends_on: list[str] = []
    fan_out: Annotated[Dist, _within(1, MAX_FAN_OUT, "copies")] = 1  # parallel copies per activation
    calls: Annotated[Dist, _within(1, MAX_CALLS, "calls")] = 1  # sequential calls per copy (its tool loop)
    tool_time_s: Seconds = 0  # think/tool time between the parents finishing and each call
    continues: str | None = None  # first call extends this agent's latest conversation in the job
    compact_at_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)  # the harness compacts a longer call ...
    compacted_tokens: Tokens | None = None  # ... keeping its head + this many tokens (summary + recent turns)
    probability: float = Field(1.0, ge=0, le=1)  # chance an activation runs (else it is skipped)
    slo_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _compaction(self):
        if (self.compact_at_tokens is None) != (self.compacted_tokens is None):
            raise ValueError("compact_at_tokens and compacted_tokens go together (set both or neither)")
        return self


class Loop(BaseModel):
    """Agents from ``first`` to ``last`` (all agents on paths between them) run again after ``last``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    first: str
    last: str
    iterations: Annotated[Dist, _within(1, np.inf, "iterations")]  # per job, at most max_iterations
    max_iterations: int = Field(ge=1, le=MAX_CALLS)


class Workflow(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str
    description: str = ""
    hash_block_size: int = Field(16, ge=1, le=MAX_TOKENS)
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
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise WorkloadError(f"{path}{line}: not valid YAML: {getattr(e, 'problem', e)}") from None
    return parse_workflow(data, str(path), node)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys (it would keep the last silently) and reading numbers with
    an exponent and no dot (``1e12``) as numbers, as YAML 1.2 does (YAML 1.1 reads them as text)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[object, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key '{key}' (first at line {seen[key]})", key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def parse_workflow(data: object, source: str = "workflow", node: yaml.Node | None = None) -> Workflow:
    """Validate a workflow given as a dict; errors list each bad field as file:line: yaml.path: message."""
    try:
        wf = Workflow.model_validate(data)
    except ValidationError as e:
        problems = [(err["loc"], err["msg"].removeprefix("Value error, ")) for err in e.errors()]
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
class _GeneratedCall:
    index: int  # within the job
    segments: tuple[tuple[int, int, int], ...]  # prompt as (content id, offset in that content, tokens)
    length: int
    blocks: np.ndarray
    output: tuple[int, int, int]  # the output segment (a continuing call appends it to its prompt)
    head: int  # tokens of the conversation's static head (system prompt, static context) that compaction keeps
    continues: int  # index of the call whose prompt + output this prompt extends; -1 if none


def _cut(segments: tuple, start: int, end: int) -> tuple:
    """Tokens [start, end) of a prompt made of segments, as segments."""
    out, pos = [], 0
    for content, offset, n in segments:
        a, b = max(start, pos), min(end, pos + n)
        if a < b:
            out.append((content, offset + a - pos, b - a))
        pos += n
    return tuple(out)


class _Contents:
    """Content ids for prompt segments, and block ids interned from the content a block covers."""

    def __init__(self, block: int):
        self.block = block
        self.next_content = 0
        self.blocks: dict[tuple, int] = {}

    def new(self) -> int:
        self.next_content += 1
        return self.next_content - 1

    def block_ids(self, segments: tuple, length: int, reuse: _GeneratedCall | None) -> np.ndarray:
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

    def __init__(self, wf: Workflow, job: int, seed: int, contents: _Contents, system: dict[str, int],
                 limit: int | None):
        self.wf, self.c, self.system, self.limit = wf, contents, system, limit
        self.rng = np.random.default_rng([seed, 1, job])
        # summary sizes draw from their own stream, so that rescaled token sizes (which compact at other
        # calls) leave the job's structure (agents, calls, parents, tool times) unchanged
        self.summary_rng = np.random.default_rng([seed, 2, job])
        self.document = contents.new()  # the job's static context
        self.context_tokens: dict[str, int] = {}
        self.calls: list[_GeneratedCall] = []
        self.rows: dict[str, list] = {k: [] for k in ("t", "input", "output", "think", "parents", "agent")}
        self.latest: dict[tuple[str, int], _GeneratedCall] = {}  # (agent, lane) -> last call of that conversation
        self.session_id = f"{wf.name}-{job}"

    def run(self) -> Session:
        done: dict[str, list[int]] = {}  # agent -> calls its dependents wait for
        for unit in _units(self.wf):
            if isinstance(unit, str):
                done[unit] = self._activate(unit, self._deps(unit, done))
                continue
            n = min(round(unit.iterations.sample(self.rng)), unit.max_iterations)
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
            slo_s=np.asarray([_slo(wf, a) for a in agent], dtype=float),
            continues=np.asarray([c.continues for c in self.calls], dtype=np.int64),
            head_tokens=np.asarray([c.head for c in self.calls], dtype=np.int64),
            meta={"source": f"workflow '{wf.name}', job {self.session_id}", "user_turn": np.zeros(len(agent), bool)})

    def _deps(self, a: str, done: dict[str, list[int]], within: list[str] | None = None) -> list[int]:
        deps = [d for d in self.wf.agents[a].depends_on if within is None or d in within]
        return sorted({p for d in deps for p in done[d]})

    def _activate(self, a: str, parents: list[int]) -> list[int]:
        """Run agent ``a`` once after ``parents``; return the calls its dependents wait for."""
        spec = self.wf.agents[a]
        if spec.probability < 1.0 and self.rng.random() >= spec.probability:
            return parents  # skipped: dependents wait for what it would have waited for
        ends = []
        for lane in range(round(spec.fan_out.sample(self.rng))):
            prev = None
            if spec.continues is not None:
                prev = self.latest.get((spec.continues, lane)) or self.latest.get((spec.continues, 0))
            ps = parents
            for step in range(round(spec.calls.sample(self.rng))):
                call = self._call(a, spec, prev, ps, first=(step == 0 and prev is None))
                prev, ps = call, [call.index]
            self.latest[(a, lane)] = prev
            ends.append(prev.index)
        return ends

    def _call(self, a: str, spec: Agent, prev: _GeneratedCall | None, parents: list[int],
              first: bool) -> _GeneratedCall:
        if len(self.calls) == MAX_JOB_CALLS:
            raise WorkloadError(f"workflow '{self.wf.name}', job {self.session_id}: agent '{a}' would make call "
                                f"{MAX_JOB_CALLS + 1}; a job may have at most {MAX_JOB_CALLS} calls (lower fan_out, "
                                "calls or loop iterations)")
        dist = spec.initial_input_tokens if (first and spec.initial_input_tokens is not None) else spec.input_tokens
        new = (self.c.new(), 0, round(dist.sample(self.rng)))
        if prev is not None:
            segments, head = prev.segments + (prev.output, new), prev.head
        else:
            start = [(self.system[a], 0, spec.system_prompt_tokens), (self.document, 0, self._context(a, spec))]
            if self.wf.prompt_layout == "context-first":
                start.reverse()
            segments = tuple(s for s in start if s[2] > 0) + (new,)
            head = sum(s[2] for s in start)
        length = sum(s[2] for s in segments)
        n_out = round(spec.output_tokens.sample(self.rng))
        continues = -1 if prev is None else prev.index
        bounds = [b for b in (self.limit, spec.compact_at_tokens) if b is not None]
        if bounds and length + n_out > min(bounds):
            body = None if spec.compacted_tokens is None else round(spec.compacted_tokens.sample(self.summary_rng))
            step = plan(length, n_out, head, self.wf.hash_block_size, self.limit, spec.compact_at_tokens, body,
                        f"workflow '{self.wf.name}', job {self.session_id}, agent '{a}', call {len(self.calls)}")
            if step is not None:  # head + a new summary + the most recent tokens; the prefix cache misses once
                segments = _cut(segments, 0, step.head) + ((self.c.new(), 0, step.summary),) + \
                    _cut(segments, length - step.recent, length)
                length, prev = step.length, None
        call = _GeneratedCall(len(self.calls), segments, length, self.c.block_ids(segments, length, prev),
                     (self.c.new(), 0, n_out), head, continues)
        think = spec.tool_time_s.sample(self.rng) if parents else 0.0
        self.calls.append(call)
        r = self.rows
        r["t"].append(max((r["t"][p] for p in parents), default=0.0) + think)
        r["input"].append(length)
        r["output"].append(n_out)
        r["think"].append(think)
        r["parents"].append(list(parents))
        r["agent"].append(a)
        return call

    def _context(self, a: str, spec: Agent) -> int:
        if a not in self.context_tokens:
            self.context_tokens[a] = round(spec.static_context_tokens.sample(self.rng))
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
             context_limit_tokens: int | None = DEFAULT_CONTEXT_LIMIT) -> pd.DataFrame:
    """Sample jobs of ``workflow`` started by ``arrivals`` (``num_jobs`` of them, or all that start
    within ``duration_s``) as a validated canonical table. Same arguments, same table, bit for bit.

    ``arrival_s`` of a dependent call is an estimate: the time it would be released if every call took
    no time (job start + the tool times along its longest parent chain). ``context_limit_tokens`` is the
    model's context window (default: Llama-3.1-8B's 131,072; None: no limit): no call's prompt + output
    exceeds it, conversations are compacted to fit (``traces.compaction``), and a call that cannot fit even
    then is refused with an error naming the workflow, job and agent.
    """
    wf = workflow if isinstance(workflow, Workflow) else load_workflow(workflow)
    if (num_jobs is None) == (duration_s is None):
        raise WorkloadError("generate: give exactly one of num_jobs or duration_s")
    if num_jobs is not None and num_jobs < 0 or duration_s is not None and not duration_s > 0:
        raise WorkloadError(f"generate: num_jobs={num_jobs} must be >= 0, duration_s={duration_s} > 0")
    process = resolve_arrivals(arrivals)
    starts = process.times(np.random.default_rng([seed, 0]), n=num_jobs, duration_s=duration_s)
    jobs = sample_jobs(wf, len(starts), seed, context_limit_tokens)
    return sessions_to_table(jobs, starts, f"workflow '{wf.name}'")


def sample_jobs(wf: Workflow, num_jobs: int, seed: int = 0,
                context_limit_tokens: int | None = DEFAULT_CONTEXT_LIMIT) -> list[Session]:
    """The first ``num_jobs`` jobs ``generate`` would sample, each on its own clock (e.g. to fit them)."""
    check_limit(context_limit_tokens, f"generate('{wf.name}')")
    contents = _Contents(wf.hash_block_size)
    system = {a: contents.new() for a in wf.agents}
    jobs: list[Session] = []
    calls = 0
    with no_gc():
        for j in range(num_jobs):
            jobs.append(_Job(wf, j, seed, contents, system, context_limit_tokens).run())
            calls += len(jobs[-1])
            if calls > MAX_ROWS:
                raise WorkloadError(f"workflow '{wf.name}': the first {j + 1} of {num_jobs} jobs already make {calls} "
                                    f"calls; a workload may have at most {MAX_ROWS} (fewer jobs: a lower rate or a "
                                    "shorter duration)")
    return jobs


def make_workload(name: str | Workflow, *, rate: float | None = None,
                  arrivals: ArrivalProcess | str | dict | None = None, duration_s: float | None = None,
                  num_jobs: int | None = None, seed: int = 0, **knobs) -> pd.DataFrame:
    """A workload by name, for experiments: a shipped workflow (or YAML path, or a ``Workflow``, e.g. one
    returned by ``scale_to_means``) or a shared trace.

    Workflows: jobs arrive by ``arrivals`` or Poisson at ``rate`` jobs/s (default 1.0) for ``duration_s``
    (default 600 s) or ``num_jobs``. Traces: ``load_trace(name, seed=seed, **knobs)``; for agent-session
    traces ``rate`` is the session rate. ``context_limit_tokens`` applies to both.
    """
    if isinstance(name, str) and name in TRACES:
        if duration_s is not None or num_jobs is not None:
            raise WorkloadError(f"make_workload('{name}'): a trace has its own length; use window_s or "
                                "max_sessions instead of duration_s / num_jobs")
        if rate is not None:
            knobs["session_rate"] = rate
        return load_trace(name, arrivals=arrivals, seed=seed, **knobs)
    unknown = set(knobs) - {"context_limit_tokens"}
    if unknown:
        raise WorkloadError(f"make_workload('{getattr(name, 'name', name)}'): unknown option(s) {sorted(unknown)} "
                            "for a workflow")
    process = resolve_arrivals(arrivals) if arrivals is not None else Poisson(1.0 if rate is None else rate)
    if num_jobs is None and duration_s is None:
        duration_s = 600.0
    return generate(name, process, num_jobs=num_jobs, duration_s=duration_s, seed=seed, **knobs)


# ---------------------------------------------------------------------------------------------------
# Rescaling (the same structure at another prompt / output size)

SCALE_ITERATIONS = 12  # corrections scale_to_means tries before it gives up


def scale_workflow(wf: Workflow, input_scale: float = 1.0, output_scale: float = 1.0,
                   tool_time_scale: float = 1.0, name: str | None = None) -> Workflow:
    """``wf`` with every prompt-side token size (system prompts, static context, inputs, compaction trigger and
    size) times ``input_scale``, output sizes times ``output_scale`` and tool times times ``tool_time_scale``.
    Agents, dependencies, fan-outs, loop counts and probabilities are unchanged."""
    for knob, value in (("input_scale", input_scale), ("output_scale", output_scale),
                        ("tool_time_scale", tool_time_scale)):
        if not (np.isfinite(value) and value > 0):
            raise WorkloadError(f"scale_workflow('{wf.name}'): {knob}={value} must be a finite number > 0")
    agents = {}
    for a, spec in wf.agents.items():
        update = {"system_prompt_tokens": round(spec.system_prompt_tokens * input_scale),
                  "output_tokens": spec.output_tokens.scaled(output_scale, at_least=1),
                  "tool_time_s": spec.tool_time_s.scaled(tool_time_scale)}
        for key, at_least in (("static_context_tokens", None), ("input_tokens", 1), ("initial_input_tokens", 1),
                              ("compacted_tokens", 1)):
            if getattr(spec, key) is not None:
                update[key] = getattr(spec, key).scaled(input_scale, at_least)
        if spec.compact_at_tokens is not None:
            update["compact_at_tokens"] = max(1, round(spec.compact_at_tokens * input_scale))
        agents[a] = spec.model_copy(update=update)
    out = wf.model_copy(update={"agents": agents, "name": name or wf.name})
    return parse_workflow(out.model_dump(), f"scale_workflow('{wf.name}', {input_scale:g}, {output_scale:g})")


def scale_to_means(wf: Workflow, mean_input_tokens: float, mean_output_tokens: float, *, num_jobs: int = 200,
                   seed: int = 0, context_limit_tokens: int | None = DEFAULT_CONTEXT_LIMIT, rtol: float = 0.02,
                   name: str | None = None) -> Workflow:
    """``wf`` rescaled (``scale_workflow``) so that its calls' mean prompt and mean output length, measured on
    ``num_jobs`` jobs (those ``generate`` samples with ``seed``), are within ``rtol`` of the targets. Prompts
    include earlier outputs and compaction caps them, so the scales are found by a few multiplicative
    corrections, not in one step."""
    where = f"scale_to_means('{wf.name}', {mean_input_tokens}, {mean_output_tokens})"
    if not (mean_input_tokens > 0 and mean_output_tokens > 0):
        raise WorkloadError(f"{where}: the target means must be > 0")
    s_in = s_out = 1.0
    for _ in range(SCALE_ITERATIONS):
        scaled = scale_workflow(wf, s_in, s_out, name=name)
        jobs = sample_jobs(scaled, num_jobs, seed, context_limit_tokens)
        calls = sum(len(s) for s in jobs)
        got_in = sum(int(s.input_tokens.sum()) for s in jobs) / calls
        got_out = sum(int(s.output_tokens.sum()) for s in jobs) / calls
        if abs(got_in / mean_input_tokens - 1) <= rtol and abs(got_out / mean_output_tokens - 1) <= rtol:
            return scaled
        tried = (s_in, s_out)
        s_in *= mean_input_tokens / got_in
        s_out *= mean_output_tokens / got_out
    raise WorkloadError(f"{where}: no scale reaches these means (last: mean prompt {got_in:.0f}, mean output "
                        f"{got_out:.1f} at input_scale {tried[0]:.4g}, output_scale {tried[1]:.4g}); prompts contain "
                        f"earlier outputs and compaction caps them at context_limit_tokens={context_limit_tokens}")
