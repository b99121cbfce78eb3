"""Figure 8: ablation of Pythia's mechanisms on the agent workloads: Pythia with each mechanism removed in turn, and
round-robin vLLM with each mechanism added alone (``policies.pythia.MECHANISMS``), at the reference load (no
replica queues, KV memory to spare) and at 4x it (KV memory short: conversations are evicted during tool calls),
where the mechanisms have something to act on. ``--quick``: the reference load only."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from experiments.common import (
    AGENT_REFERENCE_LOAD,
    AGENT_SLO_S,
    AGENT_WORKLOADS,
    Point,
    agent_duration,
    agent_load_factor,
    sweep,
)
from experiments.output import Context, Output
from experiments.plots import figure, setting
from policies.pythia import MECHANISMS
from policies.systems import system

SYSTEMS = ("vllm", *(f"vllm+{m}" for m in MECHANISMS), "pythia", *(f"pythia-no-{m}" for m in MECHANISMS))
METRICS = (("mean_jct_s", "mean JCT (s)"), ("p99_latency_s", "p99 call latency (s)"),
           ("prefix_hit_rate", "prefix-cache hit rate"), ("gpu_seconds", "GPU-seconds"))


LOAD_FACTORS = (1.0, 4.0)  # x the reference load


def run(ctx: Context) -> Output:
    factors = LOAD_FACTORS[:1] if ctx.quick else LOAD_FACTORS
    points = [Point(w, f * AGENT_REFERENCE_LOAD[w], s, agent_duration(ctx.quick), ctx.seed, cluster=ctx.cluster,
                    slo_s=AGENT_SLO_S)
              for w in AGENT_WORKLOADS for f in factors for s in SYSTEMS]
    df = sweep(points, ctx.jobs)
    df.insert(2, "load_factor", agent_load_factor(df))
    return Output(df, plot(df, setting(ctx.cluster)),
                  summary=df[["workload", "load_factor", "system"] + [c for c, _ in METRICS]])


def plot(df: pd.DataFrame, where: str) -> Figure:
    """Each metric relative to round-robin vLLM (left group) and to full Pythia (right group)."""
    rows = list(dict.fromkeys(zip(df["workload"], df["load_factor"], strict=True)))
    fig, axes = figure(len(rows), len(METRICS), 4.5, 3.6)
    for i, (w, f) in enumerate(rows):
        d = df[(df["workload"] == w) & (df["load_factor"] == f)].set_index("system")
        for j, (col, title) in enumerate(METRICS):
            ax = axes[i][j]
            added = [d.loc[f"vllm+{m}", col] / d.loc["vllm", col] for m in MECHANISMS]
            removed = [d.loc[f"pythia-no-{m}", col] / d.loc["pythia", col] for m in MECHANISMS]
            x = range(len(MECHANISMS))
            ax.bar([k - 0.2 for k in x], added, 0.4, label="vLLM + mechanism / vLLM")
            ax.bar([k + 0.2 for k in x], removed, 0.4, label="Pythia - mechanism / Pythia")
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xticks(list(x), MECHANISMS, rotation=45, fontsize=8)
            ax.set_title(f"{w} @ {f:g}x load: {title}" if j == 0 else title, fontsize=10)
            ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Fig. 8: ablation of {system('pythia').label}'s mechanisms, {where}")
    fig.tight_layout()
    return fig
