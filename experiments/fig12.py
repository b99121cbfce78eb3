"""Figure 12: the learned (PPO) scaler: its training curve, and SLO attainment vs GPU-seconds on held-out
trace windows against static provisioning, Kubernetes HPA, Knative KPA and the Pythia heuristic scaler.

The policy is the shipped checkpoint (``policies/checkpoints/ppo-scaler``, trained by
``python -m experiments.run train-scaler``); its training curve is read from the JSON beside it. Test
episodes come from the ``test`` split of the environment it was trained on (trace windows and workflow
jobs that training and validation never saw, see ``sim/env.py``), each replayed to completion with
``simulate`` under every scaler; all dynamic scalers start from the same ``INITIAL_REPLICAS``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from experiments.common import parallel_map, summary_row
from experiments.output import Context, Output
from experiments.plots import figure, plot_curve, setting
from frontend.metrics import gpus_series
from policies.registry import make_router, make_scaler
from policies.rl import DEFAULT_CHECKPOINT, read_checkpoint_meta
from sim.cluster import simulate
from sim.env import EnvConfig, sample_episode

INITIAL_REPLICAS = 2  # what the dynamic scalers start from (as experiments.common's scaled systems)
EPISODES = 30  # test episodes (--quick: 2); paired: every scaler plays the same ones
BASELINE = "Pythia heuristic"  # the scaler the learned one is compared with, episode by episode
SLO_TOLERANCE = 0.005  # "as good" attainment in the paired comparison
WARMUP_S = 60.0  # gpus_min/gpus_max ignore the first minute (scaling up from INITIAL_REPLICAS)


@dataclass(frozen=True)
class Contender:
    label: str
    scaler: str
    params: dict = field(default_factory=dict)
    initial_replicas: int = INITIAL_REPLICAS


def contenders(num_gpus: int, quick: bool, checkpoint: Path, residual_of: str | None) -> list[Contender]:
    statics = (num_gpus,) if quick else (num_gpus // 2, 3 * num_gpus // 4, num_gpus)
    rl = f"RL (PPO residual on {residual_of})" if residual_of else "RL (PPO)"
    return [*(Contender(f"static {n}", "static", {"replicas": n}, n) for n in statics),
            Contender("HPA", "hpa"), Contender("KPA", "kpa"), Contender(BASELINE, "pythia"),
            Contender(rl, "rl", {"path": str(checkpoint)})]


@dataclass(frozen=True)
class Job:
    cfg: EnvConfig
    episode_seed: tuple[int, int]
    who: Contender


def _run(job: Job) -> dict:
    ep = sample_episode(job.cfg, np.random.default_rng(job.episode_seed))
    cluster = replace(ep.cluster, pools=tuple(replace(p, initial_replicas=job.who.initial_replicas)
                                              for p in ep.cluster.pools))
    scaler = make_scaler(job.who.scaler, **job.who.params)
    res = simulate(ep.table, cluster, make_router(job.cfg.router), scaler)
    # GPUs held once the start-up is over (after WARMUP_S, while arrivals last): does the scaler follow the load?
    c = gpus_series(res.cluster)
    held = c[(c.index >= WARMUP_S) & (c.index <= job.cfg.episode_s)]
    return summary_row(res, scaler=job.who.label, episode=job.episode_seed[1],
                       trace_start_s=ep.about["trace_start_s"], trace_rate_scale=ep.about["trace_rate_scale"],
                       workflow_rate=ep.about["workflow_rate"], gpus_min=int(held.min()), gpus_max=int(held.max()))


def run(ctx: Context) -> Output:
    checkpoint = Path(ctx.options.get("checkpoint", DEFAULT_CHECKPOINT))
    meta = read_checkpoint_meta(checkpoint)
    cfg = replace(EnvConfig.from_dict(meta["env_config"]), split="test")
    if ctx.quick:
        cfg = replace(cfg, episode_s=120.0)
    episodes = 2 if ctx.quick else EPISODES
    who = contenders(cfg.cluster.num_gpus, ctx.quick, checkpoint, meta["residual_of"])
    work = [Job(cfg, (ctx.seed, k), w) for k in range(episodes) for w in who]
    df = pd.DataFrame(parallel_map(_run, work, ctx.jobs, desc="simulate"))
    g = df.groupby("scaler", sort=False)
    summary = g[["slo_attainment", "gpu_seconds", "p99_latency_s", "mean_jct_s"]].mean()
    summary["gpus_min"], summary["gpus_max"] = g["gpus_min"].min(), g["gpus_max"].max()
    summary = summary.join(paired(df)).reset_index()
    summary.insert(1, "episodes", episodes)
    return Output(df, plot(meta, summary, df, cfg), tables={"summary": summary}, summary=summary)


def paired(df: pd.DataFrame) -> pd.DataFrame:
    """Per scaler, the share of episodes where it used fewer GPU-seconds than ``BASELINE`` on the same episode,
    and where its SLO attainment was at least the baseline's less ``SLO_TOLERANCE``: a mean can hide one
    episode that decides it."""
    by = df.pivot(index="episode", columns="scaler")
    gpu, slo = by["gpu_seconds"], by["slo_attainment"]
    return pd.DataFrame({
        "fewer_gpu_s_than_pythia": gpu.lt(gpu[BASELINE], axis=0).mean(),
        "slo_as_good_as_pythia": slo.ge(slo[BASELINE] - SLO_TOLERANCE, axis=0).mean(),
    })


def plot(meta: dict, summary: pd.DataFrame, df: pd.DataFrame, cfg: EnvConfig) -> Figure:
    fig, axes = figure(1, 2, 6, 4.3)
    a, b = axes[0]
    plot_curve(pd.DataFrame(meta["curve"]), a, meta.get("selected_at"))
    a.set_title(f"training: PPO, {meta['timesteps']} steps, reward on validation windows", fontsize=10)
    for k, row in summary.iterrows():
        pts = df[df["scaler"] == row["scaler"]]
        color = f"C{k}"
        b.scatter(pts["gpu_seconds"], pts["slo_attainment"], s=10, alpha=0.3, color=color)
        b.scatter(row["gpu_seconds"], row["slo_attainment"], s=70, color=color, edgecolor="black",
                  label=f"{row['scaler']}: {row['slo_attainment']:.3f}, {row['gpu_seconds']:.0f} GPU-s",
                  marker="*" if row["scaler"].startswith("RL") else "o")
    b.set_xlabel("GPU-seconds per episode")
    b.set_ylabel("SLO attainment")
    b.set_title(f"{len(df['episode'].unique())} held-out test episodes ({cfg.episode_s:.0f} s + drain); "
                "big marker = mean", fontsize=10)
    b.grid(alpha=0.3)
    b.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Fig. 12: a scaling policy learned on the simulator (PPO) vs heuristic scalers, "
                 f"{setting(cfg.cluster)}")
    fig.tight_layout()
    return fig
