"""Figure 8: ablation of Pythia's two mechanisms at each workload's reference load and at its highest load."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from experiments.common import REFERENCE_LOAD, WORKLOADS, Point, duration, loads, sweep
from experiments.output import Context, Output
from experiments.plots import color_of, figure, grouped_bars, setting
from policies.systems import system

SYSTEMS = ("vllm", "pythia-routing", "pythia-scaling", "pythia")
METRICS = (("prefix_hit_rate", "prefix-cache hit rate"), ("p99_latency_s", "p99 call latency (s)"),
           ("mean_jct_s", "mean JCT (s)"), ("gpu_seconds", "GPU-seconds"))


def run(ctx: Context) -> Output:
    rates = {w: sorted({REFERENCE_LOAD[w], loads(w, ctx.quick)[-1]}) for w in WORKLOADS}
    points = [Point(w, r, s, duration(ctx.quick), ctx.seed, cluster=ctx.cluster)
              for w in WORKLOADS for r in rates[w] for s in SYSTEMS]
    df = sweep(points, ctx.jobs)
    return Output(df, plot(df, setting(ctx.cluster)),
                  summary=df[["workload", "rate", "system"] + [c for c, _ in METRICS]])


def plot(df: pd.DataFrame, where: str) -> Figure:
    workloads = list(dict.fromkeys(df["workload"]))
    fig, axes = figure(len(workloads), len(METRICS), 4, 3.3)
    for i, w in enumerate(workloads):
        d = df[df["workload"] == w]
        rates = sorted(d["rate"].unique())
        for j, (col, title) in enumerate(METRICS):
            ax = axes[i][j]
            heights = {s: [float(d.loc[(d["system"] == s) & (d["rate"] == r), col].iloc[0]) for r in rates]
                       for s in SYSTEMS}
            grouped_bars(ax, [f"{r:g} jobs/s" for r in rates], heights, color_of(SYSTEMS),
                         {s: system(s).label for s in SYSTEMS})
            ax.set_title(f"{w}: {title}" if j == 0 else title, fontsize=10)
            ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Fig. 8: ablation (cache-aware routing only, scaling only, both), {where}")
    fig.tight_layout()
    return fig
