"""Figure 9: queue length over time when jobs arrive in on/off bursts."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from experiments.common import REFERENCE_LOAD, WORKLOADS, Point, burst_arrivals, duration, parallel_map, run_point
from experiments.common import system as get_system
from experiments.metrics import queue_series

SYSTEMS = ("vllm", "vllm-hpa", "sglang", "pythia")


def _series(p: Point) -> pd.DataFrame:
    res = run_point(p)
    q = queue_series(res.timeseries, res.cluster)
    ready = res.cluster.groupby("t")["ready"].sum()
    return pd.DataFrame({"t": q.index, "queue_len": q.to_numpy(), "ready_replicas": ready.reindex(q.index).to_numpy(),
                         "workload": p.workload, "system": p.system})


def run(quick: bool, seed: int, out: Path, jobs: int = 1) -> pd.DataFrame:
    points = [Point(w, REFERENCE_LOAD[w], s, duration(quick), seed, burst_arrivals(w))
              for w in WORKLOADS for s in SYSTEMS]
    df = pd.concat(parallel_map(_series, points, jobs, desc="simulate"), ignore_index=True)
    df.to_csv(out / "fig9.csv", index=False)
    fig, axes = plt.subplots(2, len(WORKLOADS), figsize=(6.5 * len(WORKLOADS), 6), squeeze=False, sharex="col")
    for j, w in enumerate(WORKLOADS):
        for k, s in enumerate(SYSTEMS):
            d = df[(df["workload"] == w) & (df["system"] == s)]
            axes[0][j].plot(d["t"], d["queue_len"], color=f"C{k}", label=get_system(s).label, lw=1)
            axes[1][j].step(d["t"], d["ready_replicas"], color=f"C{k}", where="post", lw=1)
        axes[0][j].set_title(f"{w}: {burst_arrivals(w)} (jobs/s, s)", fontsize=10)
        axes[0][j].set_ylabel("waiting calls")
        axes[1][j].set_ylabel("ready replicas")
        axes[1][j].set_xlabel("time (s)")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Fig. 9: queue length under bursts")
    fig.tight_layout()
    fig.savefig(out / "fig9.png", dpi=120)
    plt.close(fig)
    return df.groupby(["workload", "system"], as_index=False).agg(max_queue=("queue_len", "max"),
                                                                  mean_queue=("queue_len", "mean"))
