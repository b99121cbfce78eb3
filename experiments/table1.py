"""Table 1: the paper's headline table: every system (vLLM round-robin, vLLM + HPA, production-stack, SGLang,
Autellix, Continuum, ThunderAgent, Pythia) on the two agent workloads (``--gpu a100-80gb`` for the paper's 80 GB
GPUs).

Definitions (also in the README):
- throughput_rps: the highest completed-calls/s over the swept offered loads (0.5-4x the reference) at which
  >= 90 % of calls met their SLO (``AGENT_SLO_S``: 10 s end to end per call);
- p99_latency_s, prefix_hit_rate, mem_util_cv, mean_jct_s, p95_jct_s, gpu_seconds: at the reference load;
- burst_queue_len: the largest number of waiting calls (engine queues + front-end pending) under on/off bursts.

Every load point's summary goes to ``table1_loads.csv`` (where the systems separate: above the reference load).

With ``--backend real`` (``python -m experiments.run table1 --backend real --gpus 0-7``) every point runs on
real vLLM servers instead, in wall-clock time (about 2 hours for the full table), and the files are named
``table1-real.*``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pandas as pd
from matplotlib.figure import Figure

from experiments.common import (
    AGENT_REFERENCE_LOAD,
    AGENT_SLO_S,
    AGENT_WORKLOADS,
    Point,
    agent_duration,
    agent_load_factor,
    agent_loads,
    burst_arrivals,
    sweep,
)
from experiments.output import Context, Output
from experiments.plots import figure, grouped_bars, setting
from policies.systems import system

if TYPE_CHECKING:
    from real import RealConfig

SYSTEMS = ("vllm", "vllm-hpa", "production-stack", "sglang", "autellix", "continuum", "thunderagent", "pythia")
COLUMNS = ["workload", "system", "throughput_rps", "p99_latency_s", "prefix_hit_rate", "mem_util_cv",
           "burst_queue_len", "mean_jct_s", "p95_jct_s", "gpu_seconds", "slo_attainment"]
WORKLOADS, REFERENCE_LOAD = AGENT_WORKLOADS, AGENT_REFERENCE_LOAD
LOAD_COLUMNS = ["workload", "rate", "load_factor", "system", "throughput_rps", "p99_latency_s", "mean_latency_s",
                "mean_jct_s", "p95_jct_s", "prefix_hit_rate", "slo_attainment", "preemptions", "max_queue_len",
                "mem_util_cv", "gpu_seconds"]
SLO_ATTAINMENT = 0.9


def run(ctx: Context) -> Output:
    real: RealConfig | None = ctx.options.get("real")
    dur, seed, c = agent_duration(ctx.quick), ctx.seed, ctx.cluster
    load_points = [Point(w, r, s, dur, seed, cluster=c, slo_s=AGENT_SLO_S) for w in WORKLOADS
                   for r in agent_loads(w, ctx.quick) for s in SYSTEMS]
    burst_points = [Point(w, REFERENCE_LOAD[w], s, dur, seed, burst_arrivals(w), c, AGENT_SLO_S) for w in WORKLOADS
                    for s in SYSTEMS]
    df = sweep(load_points + burst_points, ctx.jobs, real)
    bursts = df.iloc[len(load_points):]
    df = df.iloc[: len(load_points)]
    rows = []
    for w in WORKLOADS:
        for s in SYSTEMS:
            d = df[(df["workload"] == w) & (df["system"] == s)]
            ok = d[d["slo_attainment"] >= SLO_ATTAINMENT]
            ref = d[d["rate"] == REFERENCE_LOAD[w]].iloc[0]
            burst = bursts[(bursts["workload"] == w) & (bursts["system"] == s)].iloc[0]
            rows.append({
                "workload": w, "system": system(s).label,
                "throughput_rps": float(ok["throughput_rps"].max()) if len(ok) else math.nan,
                "p99_latency_s": ref["p99_latency_s"], "prefix_hit_rate": ref["prefix_hit_rate"],
                "mem_util_cv": ref["mem_util_cv"], "burst_queue_len": burst["max_queue_len"],
                "mean_jct_s": ref["mean_jct_s"], "p95_jct_s": ref["p95_jct_s"], "gpu_seconds": ref["gpu_seconds"],
                "slo_attainment": ref["slo_attainment"],
            })
    table = pd.DataFrame(rows, columns=COLUMNS)
    where = f"simulated, {setting(c)}" if real is None else _servers(real)
    loads = df.assign(load_factor=agent_load_factor(df))
    return Output(table, plot(table, where), tables={"loads": loads[LOAD_COLUMNS]})


def _servers(real: RealConfig) -> str:
    where = (f"GPUs {','.join(real.placements)}" if real.on_gpus else
             f"CPU cores {','.join(real.placements)}" if real.launch else f"{len(real.urls)} attached servers")
    return f"real vLLM on {where}"


def plot(table: pd.DataFrame, where: str) -> Figure:
    """The table as a picture: each metric relative to vanilla vLLM on the same workload."""
    metrics = COLUMNS[2:]
    workloads = list(dict.fromkeys(table["workload"]))
    fig, axes = figure(1, len(workloads), 7, 4)
    for ax, w in zip(axes[0], workloads, strict=True):
        t = table[table["workload"] == w].set_index("system")
        base = t.iloc[0]
        grouped_bars(ax, [m.replace("_", "\n") for m in metrics],
                     {name: [row[m] / base[m] if base[m] else math.nan for m in metrics] for name, row in t.iterrows()})
        ax.tick_params(axis="x", labelsize=8)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylabel("relative to vanilla vLLM")
        ax.set_title(w)
        ax.legend(fontsize=8)
    fig.suptitle(f"Table 1 ({where}): throughput and hit rate higher is better, the rest lower")
    fig.tight_layout()
    return fig
