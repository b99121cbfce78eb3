"""Figure 7: end-to-end throughput, p99 latency and job completion time vs offered load."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from experiments.common import WORKLOADS, Point, duration, loads, sweep
from experiments.output import Context, Output
from experiments.plots import color_of, figure, setting
from policies.systems import system

SYSTEMS = ("vllm", "vllm-hpa", "sglang", "autellix", "continuum", "thunderagent", "pythia")
PANELS = (("throughput_rps", "throughput (calls/s)"), ("p99_latency_s", "p99 call latency (s)"),
          ("mean_jct_s", "job completion time (s)\nmean (solid), p95 (dashed)"),
          ("prefix_hit_rate", "prefix-cache hit rate"))


def run(ctx: Context) -> Output:
    points = [Point(w, r, s, duration(ctx.quick), ctx.seed, cluster=ctx.cluster)
              for w in WORKLOADS for r in loads(w, ctx.quick) for s in SYSTEMS]
    df = sweep(points, ctx.jobs)
    summary = df[["workload", "rate", "system", "throughput_rps", "p99_latency_s", "mean_jct_s", "p95_jct_s",
                  "prefix_hit_rate"]]
    return Output(df, plot(df, setting(ctx.cluster)), summary=summary)


def plot(df: pd.DataFrame, where: str) -> Figure:
    workloads = list(dict.fromkeys(df["workload"]))
    fig, axes = figure(len(workloads), len(PANELS), 4.2, 3.4)
    colors = color_of(SYSTEMS)
    for i, w in enumerate(workloads):
        for j, (col, title) in enumerate(PANELS):
            ax = axes[i][j]
            for s in SYSTEMS:
                d = df[(df["workload"] == w) & (df["system"] == s)].sort_values("rate")
                ax.plot(d["rate"], d[col], marker="o", color=colors[s], label=system(s).label)
                if col == "mean_jct_s":
                    ax.plot(d["rate"], d["p95_jct_s"], ls="--", color=colors[s])
            ax.set_xlabel("offered load (jobs/s)")
            ax.set_title(f"{w}: {title}" if j == 0 else title, fontsize=10)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Fig. 7: end-to-end performance, {where} (simulated)")
    fig.tight_layout()
    return fig
