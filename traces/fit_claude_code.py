"""Fit the ``claude-code`` workflow to the real Claude Code sessions (kv-cache-tester v8).

``python -m traces.fit_claude_code`` rewrites ``traces/workflows/claude-code.yaml``. Every number in
it comes from the trace (no invented values): the workflow is one main agent whose conversation
continues for a number of turns, and after a turn a batch of parallel sub-agents may run (each its
own tool loop) before the next main turn. Distributions are empirical quantiles (1 % steps).

What is fitted, per agent (main; sub-agents pooled as ``subagent``):
- system_prompt_tokens: median tool definitions + system prompt of the calls' agent.
- initial_input_tokens: first call's input minus that prefix (the task and project context).
- input_tokens: per continuing call, the growth of the prompt beyond the previous prompt and output
  (tool results, user messages); negative growth (11 % of main turns, mostly thinking blocks that are
  not sent back) is clipped to 1 token, so contexts grow slightly faster than in the trace.
- output_tokens, tool_time_s (the recorded think time between calls).
- compaction (main): a turn whose prompt falls below 70 % of the previous one is a compaction (251 in
  v8); compact_at_tokens is the median prompt before it, compacted_tokens the new prompts' size after
  the system prompt. Without it contexts would grow without bound over long sessions.
- loop iterations: main calls per session; sub-agent batches: probability per main turn, batch size
  (fan_out) and calls per sub-agent.
"""

from __future__ import annotations

import argparse
from itertools import pairwise
from pathlib import Path

import numpy as np
import yaml

from traces.loaders import read_sessions
from traces.sessions import Session
from traces.workflow import WORKFLOWS_DIR, parse_workflow

OUT = WORKFLOWS_DIR / "claude-code.yaml"
PROBS = np.linspace(0, 1, 101)


def _quantiles(values: list[float], digits: int = 0, low: float = 0.0) -> dict:
    q = np.maximum(np.quantile(np.asarray(values, dtype=float), PROBS), low)
    return {"dist": "empirical", "quantiles": [round(float(x), digits) if digits else int(round(x)) for x in q]}


def _instances(s: Session) -> tuple[list[int], list[list[int]], dict[int, list[int]]]:
    """Main-loop calls, sub-agent instances (their calls), and batches: spawning main call -> instances."""
    main = [i for i, a in enumerate(s.agent) if a == "main"]
    subs: list[list[int]] = []
    batches: dict[int, list[int]] = {}
    owner: dict[int, int] = {}
    for i, a in enumerate(s.agent):
        if a == "main":
            continue
        ps = [p for p in s.parents[i] if s.agent[p] != "main"]
        if ps:
            subs[owner[ps[0]]].append(i)
            owner[i] = owner[ps[0]]
        else:
            owner[i] = len(subs)
            subs.append([i])
            batches.setdefault(s.parents[i][0] if s.parents[i] else -1, []).append(owner[i])
    return main, subs, batches


COMPACTION = 0.7  # a prompt shorter than this share of the previous one: the conversation was compacted


def _growth(s: Session, chain: list[int]) -> list[int]:
    """Tokens a continuing call adds after the previous prompt and output (compactions left out)."""
    return [int(s.input_tokens[b] - s.input_tokens[a] - s.output_tokens[a]) for a, b in pairwise(chain)
            if s.input_tokens[b] >= COMPACTION * s.input_tokens[a]]


def _compactions(s: Session, chain: list[int]) -> list[tuple[int, int]]:
    """(prompt before, new prompt after the system prompt) for each compaction in a chain of calls."""
    system = s.meta["system_tokens"]
    return [(int(s.input_tokens[a]), int(s.input_tokens[b] - system[b])) for a, b in pairwise(chain)
            if s.input_tokens[b] < COMPACTION * s.input_tokens[a]]


def fit(sessions: list[Session]) -> dict:
    """The claude-code workflow as a dict (YAML-ready) from agent sessions."""
    f: dict[str, dict[str, list]] = {a: {k: [] for k in ("system", "initial", "growth", "out", "think")}
                                     for a in ("main", "subagent")}
    main_calls, batch_sizes, sub_calls, compactions = [], [], [], []
    for s in sessions:
        main, subs, batches = _instances(s)
        system = s.meta["system_tokens"]
        for agent, chains in (("main", [main] if main else []), ("subagent", subs)):
            for chain in chains:
                first = chain[0]
                f[agent]["system"].append(int(system[first]))
                f[agent]["initial"].append(int(s.input_tokens[first] - system[first]))
                f[agent]["growth"] += _growth(s, chain)
                f[agent]["out"] += s.output_tokens[chain].tolist()
                f[agent]["think"] += s.think_s[chain[1:]].tolist()
        compactions += _compactions(s, main)
        main_calls.append(len(main))
        sub_calls += [len(c) for c in subs]
        batch_sizes += [len(b) for b in batches.values()]

    def agent(name: str, role: str) -> dict:
        d = f[name]
        return {"role": role, "system_prompt_tokens": int(np.median(d["system"])),
                "initial_input_tokens": _quantiles(d["initial"], low=1), "input_tokens": _quantiles(d["growth"], low=1),
                "output_tokens": _quantiles(d["out"], low=1), "tool_time_s": _quantiles(d["think"], digits=1)}

    main = agent("main", "Claude Code main agent: one turn of the tool-use loop; continues its conversation")
    main.update({"continues": "main", "compact_at_tokens": int(np.median([a for a, _ in compactions])),
                 "compacted_tokens": _quantiles([b for _, b in compactions], low=1)})
    sub = agent("subagent", "Claude Code sub-agent (Explore, general-purpose, Plan): its own tool loop, "
                            "spawned in parallel batches by a main turn")
    sub.update({"depends_on": ["main"], "probability": round(len(batch_sizes) / sum(main_calls), 5),
                "fan_out": _quantiles(batch_sizes, low=1), "calls": _quantiles(sub_calls, low=1)})
    return {
        "name": "claude-code",
        "description": f"Fitted by traces/fit_claude_code.py to {len(sessions)} Claude Code sessions "
                       f"(kv-cache-tester v8, {sum(len(s) for s in sessions)} calls). Do not edit by hand.",
        "hash_block_size": int(sessions[0].hash_block_size),
        "agents": {"main": main, "subagent": sub},
        "loops": [{"first": "main", "last": "subagent", "iterations": _quantiles(main_calls, low=1),
                   "max_iterations": int(max(main_calls))}],
    }


def write(workflow: dict, path: Path = OUT) -> None:
    parse_workflow(workflow, str(path))  # never ship a file that does not load
    text = yaml.safe_dump(workflow, sort_keys=False, width=120, default_flow_style=None)
    path.write_text("# Generated by `python -m traces.fit_claude_code`; every number is fitted to the trace.\n"
                    + text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trace", default="claude-code-v8")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    sessions, _ = read_sessions(args.trace)
    write(fit(sessions), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
