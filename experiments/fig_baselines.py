"""fig-baselines: the paper's strong baselines side by side on the agent-shaped workloads.

vLLM (round-robin), vLLM + production-stack routing, SGLang-style cache-aware routing, Autellix (program-level
least-attained-service priorities and its locality-aware balancer), Continuum (KV time-to-live across tool calls,
program-level FCFS), ThunderAgent (program-aware global waiting queue) and the current Pythia, each as its
registered system (``policies.systems``), on ``coding-assistant`` and ``software-team`` (fitted to Claude Code
traces: long growing prompts, short outputs, tool times) at their reference loads and at twice them, on the
context's cluster (by default 8 x A100-40GB, llama-3.1-8b). At the reference load the KV cache is far from full
(no preemption, queues of a few calls), so the engine mechanisms (priorities, pins, pauses) have little to act on
and the systems differ by their routing; at twice the load they have more. Jobs last tens of minutes; a run has
30 minutes of Poisson job arrivals (``--quick``: 2, at the reference loads only) and serves every job to its end,
so its early jobs meet a cluster that is still filling up.

Metrics: mean job completion time, p99 call latency (release to last token), prefix-cache hit rate (cached /
prompt tokens) and GPU-seconds (every system starts with one replica per GPU; only Pythia scales).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from experiments.common import Point, sweep
from experiments.output import Context, Output
from experiments.plots import color_of, figure, setting
from policies.systems import system

SYSTEMS = ("vllm", "production-stack", "sglang", "autellix", "continuum", "thunderagent", "pythia")
REFERENCE_LOAD = {"coding-assistant": 0.15, "software-team": 0.1}  # jobs/s on 8 x A100-40GB (sim.characterize)
METRICS = (("mean_jct_s", "mean JCT (s)"), ("p99_latency_s", "p99 call latency (s)"),
           ("prefix_hit_rate", "prefix-cache hit rate"), ("gpu_seconds", "GPU-seconds"))
LOAD_FACTORS = (1.0, 2.0)  # x the reference load


def run(ctx: Context) -> Output:
    duration_s, factors = (120.0, LOAD_FACTORS[:1]) if ctx.quick else (1800.0, LOAD_FACTORS)
    points = [Point(w, f * rate, s, duration_s, ctx.seed, cluster=ctx.cluster)
              for w, rate in REFERENCE_LOAD.items() for f in factors for s in SYSTEMS]
    df = sweep(points, ctx.jobs)
    return Output(df, plot(df, setting(ctx.cluster), duration_s),
                  summary=df[["workload", "rate", "system"] + [c for c, _ in METRICS] + ["preemptions"]])


def plot(df: pd.DataFrame, where: str, duration_s: float) -> Figure:
    """One row per workload and load, one panel per metric, one bar per system."""
    cases = list(dict.fromkeys(zip(df["workload"], df["rate"], strict=True)))
    fig, axes = figure(len(cases), len(METRICS), 4.2, 3.2)
    colors, x = color_of(SYSTEMS), np.arange(len(SYSTEMS))
    for i, (w, rate) in enumerate(cases):
        d = df[(df["workload"] == w) & (df["rate"] == rate)].set_index("system")
        for j, (col, title) in enumerate(METRICS):
            ax = axes[i][j]
            ax.bar(x, [float(d.at[s, col]) for s in SYSTEMS], 0.7, color=[colors[s] for s in SYSTEMS])
            ax.set_xticks(x, [system(s).label for s in SYSTEMS] if i == len(cases) - 1 else [], rotation=35,
                          ha="right", fontsize=8)
            ax.set_title(f"{w} @ {rate:g} jobs/s: {title}" if j == 0 else title, fontsize=9)
            ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Baselines on agent workloads, {where}; {duration_s / 60:g} min of job arrivals, seed "
                 f"{df['seed'].iloc[0]}")
    fig.tight_layout()
    return fig
