"""Figure 9: queue length over time when jobs arrive in on/off bursts."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from experiments.common import REFERENCE_LOAD, WORKLOADS, Point, burst_arrivals, duration, parallel_map, run_point
from experiments.output import Context, Output
from experiments.plots import color_of, figure, setting
from frontend.metrics import queue_series
from policies.systems import system

SYSTEMS = ("vllm", "vllm-hpa", "sglang", "pythia")


def _series(p: Point) -> pd.DataFrame:
    res = run_point(p)
    q = queue_series(res.timeseries, res.cluster)
    ready = res.cluster.groupby("t")["ready"].sum()
    return pd.DataFrame({"t": q.index, "queue_len": q.to_numpy(), "ready_replicas": ready.reindex(q.index).to_numpy(),
                         "workload": p.workload, "system": p.system})


def run(ctx: Context) -> Output:
    points = [Point(w, REFERENCE_LOAD[w], s, duration(ctx.quick), ctx.seed, burst_arrivals(w), ctx.cluster)
              for w in WORKLOADS for s in SYSTEMS]
    df = pd.concat(parallel_map(_series, points, ctx.jobs, desc="simulate"), ignore_index=True)
    summary = df.groupby(["workload", "system"], as_index=False).agg(max_queue=("queue_len", "max"),
                                                                     mean_queue=("queue_len", "mean"))
    return Output(df, plot(df, setting(ctx.cluster)), summary=summary)


def plot(df: pd.DataFrame, where: str) -> Figure:
    workloads = list(dict.fromkeys(df["workload"]))
    fig, axes = figure(2, len(workloads), 6.5, 3, sharex="col")
    colors = color_of(SYSTEMS)
    for j, w in enumerate(workloads):
        for s in SYSTEMS:
            d = df[(df["workload"] == w) & (df["system"] == s)]
            axes[0][j].plot(d["t"], d["queue_len"], color=colors[s], label=system(s).label, lw=1)
            axes[1][j].step(d["t"], d["ready_replicas"], color=colors[s], where="post", lw=1)
        axes[0][j].set_title(f"{w}: {burst_arrivals(w)} (jobs/s, s)", fontsize=10)
        axes[0][j].set_ylabel("waiting calls")
        axes[1][j].set_ylabel("ready replicas")
        axes[1][j].set_xlabel("time (s)")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Fig. 9: queue length under bursts, {where}")
    fig.tight_layout()
    return fig
