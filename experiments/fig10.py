"""Figure 10: GPU memory (KV cache) utilization of each GPU over time, and its spread across GPUs."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from experiments.common import REFERENCE_LOAD, WORKLOADS, Point, duration, parallel_map, run_point
from experiments.common import system as get_system
from experiments.metrics import mem_util_cv

SYSTEMS = ("vllm", "sglang", "pythia")


def _usage(p: Point) -> pd.DataFrame:
    ts = run_point(p).timeseries
    return ts.assign(workload=p.workload, system=p.system)


def run(quick: bool, seed: int, out: Path, jobs: int = 1) -> pd.DataFrame:
    points = [Point(w, REFERENCE_LOAD[w], s, duration(quick), seed) for w in WORKLOADS for s in SYSTEMS]
    df = pd.concat(parallel_map(_usage, points, jobs, desc="simulate"), ignore_index=True)
    df.to_csv(out / "fig10.csv", index=False)
    rows = []
    fig, axes = plt.subplots(len(WORKLOADS), len(SYSTEMS), figsize=(4.5 * len(SYSTEMS), 3.2 * len(WORKLOADS)),
                             squeeze=False, sharey=True)
    for i, w in enumerate(WORKLOADS):
        for j, s in enumerate(SYSTEMS):
            d = df[(df["workload"] == w) & (df["system"] == s)]
            cv = mem_util_cv(d)
            rows.append({"workload": w, "system": s, "mem_util_variance": cv,
                         "mean_kv_usage": float(d.loc[d["state"] == "ready", "kv_usage"].mean())})
            ax = axes[i][j]
            for rid, g in d.groupby("replica_id"):
                ax.plot(g["t"], g["kv_usage"], lw=0.7, label=f"GPU {rid}")
            ax.set_title(f"{w}: {get_system(s).label}\nspread (CV across GPUs) {cv:.2f}", fontsize=9)
            ax.set_xlabel("time (s)")
            ax.grid(alpha=0.3)
        axes[i][0].set_ylabel("KV cache utilization")
    fig.suptitle("Fig. 10: GPU memory utilization per GPU")
    fig.tight_layout()
    fig.savefig(out / "fig10.png", dpi=120)
    plt.close(fig)
    return pd.DataFrame(rows)
