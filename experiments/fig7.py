"""Figure 7: end-to-end throughput, p99 latency and job completion time vs offered load."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from experiments.common import WORKLOADS, Point, duration, loads, sweep, system, write

SYSTEMS = ("vllm", "vllm-hpa", "sglang", "pythia")
PANELS = (("throughput_rps", "throughput (calls/s)"), ("p99_latency_s", "p99 call latency (s)"),
          ("mean_jct_s", "job completion time (s)\nmean (solid), p95 (dashed)"),
          ("prefix_hit_rate", "prefix-cache hit rate"))


def run(quick: bool, seed: int, out: Path, jobs: int = 1) -> pd.DataFrame:
    points = [Point(w, r, s, duration(quick), seed) for w in WORKLOADS for r in loads(w, quick) for s in SYSTEMS]
    df = sweep(points, jobs)
    write(df, out, "fig7")
    plot(df, out / "fig7.png")
    return df[["workload", "rate", "system", "throughput_rps", "p99_latency_s", "mean_jct_s", "p95_jct_s",
               "prefix_hit_rate"]]


def plot(df: pd.DataFrame, path: Path) -> None:
    workloads = list(dict.fromkeys(df["workload"]))
    fig, axes = plt.subplots(len(workloads), len(PANELS), figsize=(4.2 * len(PANELS), 3.4 * len(workloads)),
                             squeeze=False)
    for i, w in enumerate(workloads):
        for j, (col, title) in enumerate(PANELS):
            ax = axes[i][j]
            for k, s in enumerate(SYSTEMS):
                d = df[(df["workload"] == w) & (df["system"] == s)].sort_values("rate")
                line, = ax.plot(d["rate"], d[col], marker="o", color=f"C{k}", label=system(s).label)
                if col == "mean_jct_s":
                    ax.plot(d["rate"], d["p95_jct_s"], ls="--", color=line.get_color())
            ax.set_xlabel("offered load (jobs/s)")
            ax.set_title(f"{w}: {title}" if j == 0 else title, fontsize=10)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Fig. 7: end-to-end performance, 8 x A100-40GB, Llama-3.1-8B (simulated)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
