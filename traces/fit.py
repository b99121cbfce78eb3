"""Agent call shapes fitted from real agent sessions, and the shipped agent workflows built from them.

``fit_shapes(sessions)`` learns, per agent role, what a serving layer sees of an agent: its static prefix
(tool definitions + system prompt), the first prompt after that prefix, how the context grows per turn (tool
results and user messages appended beyond the previous prompt and reply), output lengths, the tool time before
a call that answers a tool call, the human time before a user turn, turns per conversation, where the harness
compacts, and how often and how wide it fans out to sub-agents. Roles come from the session structure:
conversations that start a session are ``main``, conversations spawned by another call are ``subagent``
(``by_agent=True`` splits them by the trace's agent names instead, Explore, Plan, ...: too few of each in the
traces to fit them apart).

``python -m traces.fit`` rewrites the three agent workflows from the Claude Code v8 sessions (the largest,
curated set). Every number in them is fitted, except the scale and the team's fix loop, stated here and in
each file's description:

- ``claude-code``: the sessions as recorded (a main loop with sub-agent batches, think times as recorded,
  human time included, the harness's own compaction threshold).
- ``coding-assistant``: the same agent served as a coding-assistant service on an open model. Token sizes are
  the trace's times ``CODING_SCALE`` (a choice, not a fit): at Claude's own sizes one 40 GB replica of an 8B
  model holds the KV of a couple of conversations, at 1/8 of many, so placement matters, while the calls stay
  agent-like; one factor for inputs and outputs keeps the trace's input:output ratio and per-session structure
  (``scale_workflow`` / ``scale_to_means`` move it elsewhere, e.g. to the paper's ~2 K-token prompts). Think
  time is tool time only: the human time before user turns is not the service's work, and neither are
  main-agent tool waits longer than any autonomous (sub-agent) tool wait: Claude Code asks the user before it
  runs most tools, so those are approvals and idle time.
- ``software-team``: a SWE-style team on one issue, planner -> coder -> testers (parallel) -> reviewer, with a
  reviewer -> coder fix loop. The coder is the fitted main agent; planner, testers and reviewer are fitted
  sub-agents (the sub-agents' fan-out is the testers'), at the same scale. The fix loop (geometric, mean 1.5,
  at most 3 rounds) is assumed: no trace records one.

``python -m traces.fit --show`` (``--trace claude-code-v6`` or ``tracelab``, ``--by-agent``) prints the shapes.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import numpy as np
import yaml

from traces.loaders import read_sessions
from traces.schema import WorkloadError
from traces.sessions import Session
from traces.workflow import WORKFLOWS_DIR, Agent, Workflow, parse_workflow, scale_workflow

PROBS = np.linspace(0, 1, 101)
COMPACTION = 0.7  # a prompt shorter than this share of the previous one: the harness compacted the conversation
CODING_SCALE = 1 / 8  # token sizes of the coding-assistant and software-team against the Claude Code sessions
FIX_ROUNDS = {"dist": "geometric", "mean": 1.5}  # software-team's coder -> reviewer loop (assumed)
MAX_FIX_ROUNDS = 3


@dataclass
class RoleShape:
    """What one agent role's calls look like, as samples (one per conversation, call or turn)."""

    role: str
    system: list[int] = field(default_factory=list)  # static prefix, per conversation
    initial: list[int] = field(default_factory=list)  # first prompt minus the prefix, per conversation
    growth: list[int] = field(default_factory=list)  # a continuing call's prompt minus previous prompt + output
    output: list[int] = field(default_factory=list)  # per call
    tool_s: list[float] = field(default_factory=list)  # think time before a call answering a tool call
    user_s: list[float] = field(default_factory=list)  # think time before a user turn (the human's)
    turns: list[int] = field(default_factory=list)  # calls per conversation
    compactions: list[tuple[int, int]] = field(default_factory=list)  # (prompt before, new prompt minus prefix)
    inputs: list[int] = field(default_factory=list)  # prompt per call (for the report)
    spawned_by: str | None = None  # the role whose calls start this role's conversations
    batches: list[int] = field(default_factory=list)  # conversations started by one spawning call (fan-out)
    spawning_calls: int = 0  # calls of the spawning role (batches per such call = the spawn probability)

    def summary(self, tool_cap: float | None = None) -> dict:
        """Medians and means of the samples; with ``tool_cap``, the share of tool waits (and of their time)
        above it."""
        med = lambda x: float(np.median(x)) if len(x) else float("nan")  # noqa: E731
        mean = lambda x: float(np.mean(x)) if len(x) else float("nan")  # noqa: E731
        out = {"role": self.role, "conversations": len(self.turns), "calls": len(self.output),
               "system_p50": med(self.system), "initial_p50": med(self.initial), "growth_mean": mean(self.growth),
               "growth_p50": med(self.growth), "prompt_mean": mean(self.inputs), "output_mean": mean(self.output),
               "output_p50": med(self.output), "in_over_out": sum(self.inputs) / max(sum(self.output), 1),
               "tool_s_p50": med(self.tool_s), "tool_s_mean": mean(self.tool_s), "tool_s_max": max(self.tool_s,
                                                                                                    default=0.0),
               "user_s_p50": med(self.user_s), "turns_p50": med(self.turns), "turns_mean": mean(self.turns),
               "compactions": len(self.compactions), "compact_at_p50": med([a for a, _ in self.compactions]),
               "compacted_p50": med([b for _, b in self.compactions]), "fan_out_mean": mean(self.batches),
               "spawn_probability": len(self.batches) / self.spawning_calls if self.spawning_calls else 0.0}
        if tool_cap is not None and self.tool_s:
            waits = np.asarray(self.tool_s)
            out["tool_waits_over_cap"] = float((waits > tool_cap).mean())
            out["tool_time_over_cap"] = float(waits[waits > tool_cap].sum() / max(waits.sum(), 1e-9))
        return out


def _conversations(s: Session) -> list[list[int]]:
    """Chains of calls linked by ``continues``, in order of their first call."""
    chains: list[list[int]] = []
    chain_of = np.full(len(s), -1)
    for i, p in enumerate(s.continues):
        if p < 0:
            chain_of[i] = len(chains)
            chains.append([i])
        else:
            chain_of[i] = chain_of[p]
            chains[chain_of[p]].append(i)
    return chains


def _check(s: Session) -> None:
    """The fields a fit needs; an error names the file and field the trace lacks."""
    where = s.meta.get("source", f"session {s.session_id}")
    if s.continues is None or s.head_tokens is None:
        raise WorkloadError(f"{where}: has no conversation structure (which call continues which) or static "
                            f"prefix sizes to fit")
    missing = s.meta.get("missing", {})
    if missing:
        fields, first = next(iter(missing.items()))
        raise WorkloadError(f"{first}: field {fields} is missing; fitting agent shapes needs it")
    if "user_turn" not in s.meta:
        raise WorkloadError(f"{where}: no record of which calls are user turns, needed to fit tool times")


def fit_shapes(sessions: list[Session], by_agent: bool = False) -> dict[str, RoleShape]:
    """Per-role shapes of the sessions' calls (see the module docstring)."""
    shapes: dict[str, RoleShape] = {}
    for s in sessions:
        _check(s)
        chains = _conversations(s)
        role_of_call: dict[int, str] = {}
        for chain in chains:
            first = chain[0]
            spawners = [p for p in s.parents[first] if p not in chain]
            role = s.agent[first] if by_agent else ("subagent" if spawners else "main")
            r = shapes.setdefault(role, RoleShape(role))
            for i in chain:
                role_of_call[i] = role
            head = s.head_tokens
            r.system.append(int(head[first]))
            r.initial.append(int(s.input_tokens[first] - head[first]))
            r.turns.append(len(chain))
            r.output += s.output_tokens[chain].tolist()
            r.inputs += s.input_tokens[chain].tolist()
            for a, b in pairwise(chain):
                if s.input_tokens[b] >= COMPACTION * s.input_tokens[a]:
                    r.growth.append(int(s.input_tokens[b] - s.input_tokens[a] - s.output_tokens[a]))
                else:
                    r.compactions.append((int(s.input_tokens[a]), int(s.input_tokens[b] - head[b])))
                (r.user_s if s.meta["user_turn"][b] else r.tool_s).append(float(s.think_s[b]))
        batches: dict[tuple[str, int], int] = {}
        for chain in chains:
            spawners = [p for p in s.parents[chain[0]] if p not in chain]
            if spawners:
                key = (role_of_call[chain[0]], spawners[0])
                batches[key] = batches.get(key, 0) + 1
                shapes[key[0]].spawned_by = role_of_call[spawners[0]]
        for (role, _), n in batches.items():
            shapes[role].batches.append(n)
    if not shapes:
        raise WorkloadError("fit_shapes: no sessions to fit")
    for r in shapes.values():
        if r.spawned_by is not None:
            r.spawning_calls = len(shapes[r.spawned_by].output)
    return shapes


# ---------------------------------------------------------------------------------------------------
# Workflows from shapes


def _quantiles(values: list[float], digits: int = 0, low: float = 0.0) -> dict:
    q = np.maximum(np.quantile(np.asarray(values, dtype=float), PROBS), low)
    return {"dist": "empirical", "quantiles": [round(float(x), digits) if digits else int(round(x)) for x in q]}


def _agent(r: RoleShape, role: str, tool_cap: float | None) -> dict:
    """One workflow agent with role ``r``'s prefix, prompt, growth, output and think times: as recorded (human
    time included) without ``tool_cap``, else tool turns' waits of at most ``tool_cap`` seconds."""
    think = r.tool_s + r.user_s if tool_cap is None else [x for x in r.tool_s if x <= tool_cap]
    out = {"role": role, "system_prompt_tokens": int(np.median(r.system)),
           "initial_input_tokens": _quantiles(r.initial, low=1), "input_tokens": _quantiles(r.growth, low=1),
           "output_tokens": _quantiles(r.output, low=1), "tool_time_s": _quantiles(think, digits=1)}
    if r.compactions:
        out["compact_at_tokens"] = int(np.median([a for a, _ in r.compactions]))
        out["compacted_tokens"] = _quantiles([b for _, b in r.compactions], low=1)
    return out


def agent_session_workflow(shapes: dict[str, RoleShape], name: str, description: str, tool_cap: float | None,
                           block_size: int) -> dict:
    """One main agent continuing its conversation turn after turn; after a turn a batch of sub-agents may run
    (each its own tool loop) before the next main turn."""
    main, sub = shapes["main"], shapes["subagent"]
    agents = {"main": {**_agent(main, "main agent: one turn of the tool-use loop; continues its conversation",
                                tool_cap), "continues": "main"},
              "subagent": {**_agent(sub, "sub-agent (explore, plan): its own tool loop, spawned in parallel "
                                         "batches by a main turn", tool_cap),
                           "depends_on": ["main"], "probability": round(len(sub.batches) / sub.spawning_calls, 5),
                           "fan_out": _quantiles(sub.batches, low=1), "calls": _quantiles(sub.turns, low=1)}}
    return {"name": name, "description": description, "hash_block_size": block_size, "agents": agents,
            "loops": [{"first": "main", "last": "subagent", "iterations": _quantiles(main.turns, low=1),
                       "max_iterations": int(max(main.turns))}]}


def software_team_workflow(shapes: dict[str, RoleShape], description: str, tool_cap: float, block_size: int) -> dict:
    """planner -> coder -> testers (fan-out) -> reviewer, reviewer -> coder fix loop: SWE-style roles with the
    fitted main agent as the coder and fitted sub-agents for the others."""
    main, sub = shapes["main"], shapes["subagent"]

    def role(r: RoleShape, text: str, calls: list[int], **extra) -> dict:
        return {**_agent(r, text, tool_cap), "calls": _quantiles(calls, low=1), **extra}

    agents = {
        "planner": role(sub, "explore the repository and plan the change for the issue", sub.turns),
        "coder": role(main, "implement the plan (edit, run, read) in its tool loop; a fix round continues it",
                      main.turns, depends_on=["planner"], continues="coder"),
        "tester": role(sub, "write and run tests for the change, in parallel", sub.turns, depends_on=["coder"],
                       fan_out=_quantiles(sub.batches, low=1)),
        "reviewer": role(sub, "review the diff with the test reports; accept or request a fix round", sub.turns,
                         depends_on=["tester"]),
    }
    return {"name": "software-team", "description": description, "hash_block_size": block_size,
            "agents": agents, "loops": [{"first": "coder", "last": "reviewer", "iterations": FIX_ROUNDS,
                                         "max_iterations": MAX_FIX_ROUNDS}]}


def fit_workflows(sessions: list[Session], trace: str) -> dict[str, Workflow]:
    """The three shipped agent workflows, fitted to ``sessions`` (see the module docstring)."""
    shapes = fit_shapes(sessions)
    for needed in ("main", "subagent"):
        if needed not in shapes:
            raise WorkloadError(f"trace '{trace}': no {needed} conversations to fit (roles found: {sorted(shapes)})")
    block = int(sessions[0].hash_block_size)
    calls = sum(len(s) for s in sessions)
    fitted = f"fitted by traces/fit.py to {len(sessions)} sessions of {trace} ({calls} calls)"
    cap = max(shapes["subagent"].tool_s)  # the longest tool wait of an agent that never waits for a human
    scale = f"token sizes x {CODING_SCALE:g}, tool time only (tool waits up to {cap:g} s, the longest sub-agent wait)"
    claude = agent_session_workflow(shapes, "claude-code", f"Claude Code sessions as recorded, {fitted}. Do not "
                                                           f"edit by hand.", None, block)
    coding = agent_session_workflow(shapes, "coding-assistant", f"A coding agent served for an open model: {fitted}, "
                                                                f"{scale}. Do not edit by hand.", cap, block)
    team = software_team_workflow(shapes, f"SWE-style team: planner -> coder -> testers -> reviewer with a fix loop; "
                                          f"roles {fitted}, {scale}; the fix loop is assumed. Do not edit by hand.",
                                  cap, block)
    out = {"claude-code": parse_workflow(claude, "claude-code (fitted)")}
    for d in (coding, team):
        out[d["name"]] = scale_workflow(parse_workflow(d, f"{d['name']} (fitted)"), CODING_SCALE, CODING_SCALE)
    return out


def to_yaml_dict(wf: Workflow) -> dict:
    """A workflow as the YAML it was written from: defaults left out, constants as plain numbers, token
    quantiles rounded to whole tokens, at least 1 (samples are rounded to whole tokens anyway, and a token size
    must be at least 1), and a ``min`` that the rounded quantiles make redundant left out."""
    data = wf.model_dump(exclude_none=True, exclude_defaults=True)
    for spec in data["agents"].values():
        for key, value in list(spec.items()):
            if isinstance(value, dict) and value.get("dist") == "constant":
                spec[key] = value["value"]
                if spec[key] == Agent.model_fields[key].default:
                    del spec[key]
            elif isinstance(value, dict) and value.get("dist") == "empirical":
                value["quantiles"] = [round(float(q), 1) if key == "tool_time_s" else max(1, int(round(q)))
                                      for q in value["quantiles"]]
                if value.get("min", -np.inf) <= value["quantiles"][0]:
                    value.pop("min", None)
    return data


HEADER = "# Generated by `python -m traces.fit`; every number is fitted to the trace unless the description says not.\n"


def write(wf: Workflow, path: Path) -> None:
    data = to_yaml_dict(wf)
    parse_workflow(data, str(path))  # never ship a file that does not load
    path.write_text(HEADER + yaml.safe_dump(data, sort_keys=False, width=120, default_flow_style=None))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--trace", default="claude-code-v8", help="agent-session trace to fit")
    parser.add_argument("--out", type=Path, default=WORKFLOWS_DIR, help="folder for the workflow YAMLs")
    parser.add_argument("--show", action="store_true", help="print the fitted shapes instead of writing workflows")
    parser.add_argument("--by-agent", action="store_true", help="with --show: one role per agent name")
    args = parser.parse_args(argv)
    sessions, _ = read_sessions(args.trace)
    if args.show:
        shapes = fit_shapes(sessions, by_agent=args.by_agent)
        cap = max((x for r in shapes.values() if r.spawned_by is not None for x in r.tool_s), default=None)
        for r in shapes.values():
            summary = r.summary(cap if r.spawned_by is None else None)
            print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
        return
    for name, wf in fit_workflows(sessions, args.trace).items():
        write(wf, args.out / f"{name}.yaml")
        print(f"wrote {args.out / f'{name}.yaml'}")


if __name__ == "__main__":
    main()
