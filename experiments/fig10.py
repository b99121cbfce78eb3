"""Figure 10: GPU memory (KV cache) utilization of each GPU over time, and its spread across GPUs."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from experiments.common import REFERENCE_LOAD, WORKLOADS, Point, duration, parallel_map, run_point
from experiments.output import Context, Output
from experiments.plots import figure, setting
from frontend.metrics import mem_util_cv
from policies.systems import system

SYSTEMS = ("vllm", "sglang", "pythia")


def _usage(p: Point) -> pd.DataFrame:
    ts = run_point(p).timeseries
    return ts.assign(workload=p.workload, system=p.system)


def run(ctx: Context) -> Output:
    points = [Point(w, REFERENCE_LOAD[w], s, duration(ctx.quick), ctx.seed, cluster=ctx.cluster)
              for w in WORKLOADS for s in SYSTEMS]
    df = pd.concat(parallel_map(_usage, points, ctx.jobs, desc="simulate"), ignore_index=True)
    summary = pd.DataFrame([{"workload": w, "system": s, "mem_util_cv": mem_util_cv(d),
                             "mean_kv_usage": float(d.loc[d["state"] == "ready", "kv_usage"].mean())}
                            for (w, s), d in df.groupby(["workload", "system"], sort=False)])
    return Output(df, plot(df, setting(ctx.cluster)), summary=summary)


def plot(df: pd.DataFrame, where: str) -> Figure:
    workloads = list(dict.fromkeys(df["workload"]))
    fig, axes = figure(len(workloads), len(SYSTEMS), 4.5, 3.2, sharey=True)
    for i, w in enumerate(workloads):
        for j, s in enumerate(SYSTEMS):
            d = df[(df["workload"] == w) & (df["system"] == s)]
            ax = axes[i][j]
            for rid, g in d.groupby("replica_id"):
                ax.plot(g["t"], g["kv_usage"], lw=0.7, label=f"GPU {rid}")
            ax.set_title(f"{w}: {system(s).label}\nspread (CV across GPUs) {mem_util_cv(d):.2f}", fontsize=9)
            ax.set_xlabel("time (s)")
            ax.grid(alpha=0.3)
        axes[i][0].set_ylabel("KV cache utilization")
    fig.suptitle(f"Fig. 10: GPU memory utilization per GPU, {where}")
    fig.tight_layout()
    return fig
