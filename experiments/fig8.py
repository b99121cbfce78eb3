"""Figure 8: ablation of Pythia's two mechanisms at each workload's reference load and at its highest load."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from experiments.common import REFERENCE_LOAD, WORKLOADS, Point, duration, loads, sweep, system, write

SYSTEMS = ("vllm", "pythia-routing", "pythia-scaling", "pythia")
METRICS = (("prefix_hit_rate", "prefix-cache hit rate"), ("p99_latency_s", "p99 call latency (s)"),
           ("mean_jct_s", "mean JCT (s)"), ("gpu_seconds", "GPU-seconds"))


def run(quick: bool, seed: int, out: Path, jobs: int = 1) -> pd.DataFrame:
    rates = {w: sorted({REFERENCE_LOAD[w], loads(w, quick)[-1]}) for w in WORKLOADS}
    points = [Point(w, r, s, duration(quick), seed) for w in WORKLOADS for r in rates[w] for s in SYSTEMS]
    df = sweep(points, jobs)
    write(df, out, "fig8")
    fig, axes = plt.subplots(len(WORKLOADS), len(METRICS), figsize=(4 * len(METRICS), 3.3 * len(WORKLOADS)),
                             squeeze=False)
    for i, w in enumerate(WORKLOADS):
        d = df[df["workload"] == w]
        for j, (col, title) in enumerate(METRICS):
            ax = axes[i][j]
            width = 0.8 / len(SYSTEMS)
            for k, s in enumerate(SYSTEMS):
                v = d[d["system"] == s].sort_values("rate")
                ax.bar([x + k * width for x in range(len(v))], v[col], width, color=f"C{k}", label=system(s).label)
            ax.set_xticks([x + width * (len(SYSTEMS) - 1) / 2 for x in range(len(rates[w]))])
            ax.set_xticklabels([f"{r:g} jobs/s" for r in rates[w]])
            ax.set_title(f"{w}: {title}" if j == 0 else title, fontsize=10)
            ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Fig. 8: ablation (cache-aware routing only, scaling only, both)")
    fig.tight_layout()
    fig.savefig(out / "fig8.png", dpi=120)
    plt.close(fig)
    return df[["workload", "rate", "system"] + [c for c, _ in METRICS]]
