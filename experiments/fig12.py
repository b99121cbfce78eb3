"""Figure 12: the learned (PPO) scaler: its training curves, and SLO attainment vs GPU-seconds on held-out
trace windows against static provisioning, Kubernetes HPA, Knative KPA and the Pythia heuristic scaler.

The policy is the shipped checkpoint (``policies/checkpoints/ppo-scaler``, trained by
``python -m experiments.run train-scaler``); when it was trained with several seeds (its JSON lists them),
every seed's checkpoint (``ppo-scaler-seedN``) plays, because one seed can be lucky. Test episodes come from the
``test`` split of the environment it was trained on (trace windows and workflow jobs that training and
validation never saw, see ``sim/episodes.py``), each replayed to completion with ``simulate`` under every scaler;
all dynamic scalers start from the same ``INITIAL_REPLICAS``.

Per scaler: the mean over test episodes with its 95 % interval (Student's t over episodes); for the learned
scaler also the mean over seeds with its 95 % interval across seeds (each seed's mean over the episodes is one
sample). Against the heuristic, paired by episode: the mean difference in GPU-seconds and in SLO attainment,
its 95 % interval, and the p-value of a Wilcoxon signed-rank test over the episodes (for the seeds together:
on each episode's difference averaged over seeds; the interval is then across seeds). ``advantage_holds``: fewer
GPU-seconds than the heuristic with the interval below zero, at an SLO attainment whose interval stays above
the heuristic's less ``SLO_TOLERANCE``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import stats

from experiments.common import parallel_map, summary_row
from experiments.output import Context, Output
from experiments.plots import figure, plot_curve, setting
from experiments.train_scaler import plot_seeds, seed_stem
from frontend.metrics import gpus_series
from policies.registry import make_router, make_scaler
from policies.rl import DEFAULT_CHECKPOINT, read_checkpoint_meta
from sim.cluster import simulate
from sim.episodes import EnvConfig, sample_episode

INITIAL_REPLICAS = 2  # what the dynamic scalers start from (as experiments.common's scaled systems)
EPISODES = 30  # test episodes (--quick: 2); paired: every scaler plays the same ones
BASELINE = "Pythia heuristic"  # the scaler the learned one is compared with, episode by episode
SLO_TOLERANCE = 0.005  # "as good" attainment in the paired comparison
RL = "RL (PPO)"  # label prefix of the learned scaler's rows: "RL (PPO) seed N", and "RL (PPO) mean of K seeds"
WARMUP_S = 60.0  # gpus_min/gpus_max ignore the first minute (scaling up from INITIAL_REPLICAS)


@dataclass(frozen=True)
class Contender:
    label: str
    scaler: str
    params: dict = field(default_factory=dict)
    initial_replicas: int = INITIAL_REPLICAS


def contenders(num_gpus: int, quick: bool, checkpoint: Path, meta: dict) -> list[Contender]:
    statics = (num_gpus,) if quick else (num_gpus // 2, 3 * num_gpus // 4, num_gpus)
    rl = [Contender(f"{RL} seed {seed}", "rl", {"path": str(seed_stem(checkpoint, seed))}) for seed in meta["seeds"]]
    if not rl:  # a one-seed checkpoint
        rl = [Contender(f"{RL} seed {meta['seed']}", "rl", {"path": str(checkpoint)})]
    return [*(Contender(f"static {n}", "static", {"replicas": n}, n) for n in statics),
            Contender("HPA", "hpa"), Contender("KPA", "kpa"), Contender(BASELINE, "pythia"), *rl]


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
    meta.setdefault("seeds", [])
    cfg = replace(EnvConfig.from_dict(meta["env_config"]), split="test")
    if ctx.quick:
        cfg = replace(cfg, episode_s=120.0)
    episodes = 2 if ctx.quick else EPISODES
    who = contenders(cfg.cluster.num_gpus, ctx.quick, checkpoint, meta)
    work = [Job(cfg, (ctx.seed, k), w) for k in range(episodes) for w in who]
    df = pd.DataFrame(parallel_map(_run, work, ctx.jobs, desc="simulate"))
    summary = summarize(df)
    summary.insert(1, "episodes", episodes)
    return Output(df, plot(meta, summary, df, cfg, checkpoint), tables={"summary": summary}, summary=summary)


METRICS = ("slo_attainment", "gpu_seconds", "p99_latency_s", "mean_jct_s")


def _ci95(values: np.ndarray) -> float:
    """Half-width of the 95 % Student-t interval of the mean (NaN for fewer than two values)."""
    n = len(values)
    return float(stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else math.nan


def _wilcoxon(d: np.ndarray) -> float:
    """Two-sided p-value of the Wilcoxon signed-rank test of paired differences ``d`` (1.0 if all are 0)."""
    return 1.0 if not np.any(d) else float(stats.wilcoxon(d).pvalue)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per scaler (each RL seed its own), then one for the RL seeds together; see the module docstring."""
    by = {m: df.pivot(index="episode", columns="scaler", values=m) for m in ("gpu_seconds", "slo_attainment")}
    rows = []
    for name, g in df.groupby("scaler", sort=False):
        row = {"scaler": name, "seeds": 1}
        for m in METRICS:
            row[m], row[f"{m}_ci95"] = float(g[m].mean()), _ci95(g[m].to_numpy())
        row["gpus_min"], row["gpus_max"] = int(g["gpus_min"].min()), int(g["gpus_max"].max())
        for m, short in (("gpu_seconds", "gpu_s"), ("slo_attainment", "slo")):
            d = (by[m][name] - by[m][BASELINE]).to_numpy()
            row[f"d_{short}"], row[f"d_{short}_ci95"], row[f"d_{short}_p"] = float(d.mean()), _ci95(d), _wilcoxon(d)
        gpu, slo = by["gpu_seconds"], by["slo_attainment"]
        row["fewer_gpu_s_than_pythia"] = float((gpu[name] < gpu[BASELINE]).mean())
        row["slo_as_good_as_pythia"] = float((slo[name] >= slo[BASELINE] - SLO_TOLERANCE).mean())
        rows.append(row)
    table = pd.DataFrame(rows)
    seeds = table[table["scaler"].str.startswith(f"{RL} seed ")]
    if len(seeds) > 1:
        together = {"scaler": f"{RL} mean of {len(seeds)} seeds", "seeds": len(seeds)}
        for m in (*METRICS, "fewer_gpu_s_than_pythia", "slo_as_good_as_pythia"):
            together[m], together[f"{m}_ci95"] = float(seeds[m].mean()), _ci95(seeds[m].to_numpy())
        together["gpus_min"], together["gpus_max"] = int(seeds["gpus_min"].min()), int(seeds["gpus_max"].max())
        names = list(seeds["scaler"])
        for m, short in (("gpu_seconds", "gpu_s"), ("slo_attainment", "slo")):
            per_episode = (by[m][names].mean(axis=1) - by[m][BASELINE]).to_numpy()
            together[f"d_{short}"] = float(seeds[f"d_{short}"].mean())
            together[f"d_{short}_ci95"] = _ci95(seeds[f"d_{short}"].to_numpy())
            together[f"d_{short}_p"] = _wilcoxon(per_episode)
        table = pd.concat([table, pd.DataFrame([together])], ignore_index=True)
    table = table.drop(columns=[c for c in table.columns if c.startswith(("fewer_", "slo_as_")) and c.endswith("ci95")])
    holds = ((table["d_gpu_s"] + table["d_gpu_s_ci95"] < 0)
             & (table["d_slo"] - table["d_slo_ci95"] >= -SLO_TOLERANCE))
    table["advantage_holds"] = holds.where(table["scaler"].str.startswith(RL))
    return table


def plot(meta: dict, summary: pd.DataFrame, df: pd.DataFrame, cfg: EnvConfig, checkpoint: Path) -> Figure:
    fig, axes = figure(1, 2, 6, 4.3)
    a, b = axes[0]
    seeds = [seed_stem(checkpoint, s) for s in meta["seeds"]]
    if meta["seeds"] and all(p.with_suffix(".json").exists() for p in seeds):
        plot_seeds([read_checkpoint_meta(p) for p in seeds], a)
    else:
        plot_curve(pd.DataFrame(meta["curve"]), a, meta.get("selected_at"))
        a.set_title(f"training: PPO, {meta['timesteps']} steps, reward on validation windows", fontsize=10)
    for k, row in summary.iterrows():
        is_rl, together = row["scaler"].startswith(RL), row["seeds"] > 1
        color = "black" if together else f"C{k % 10}"
        if not together:
            pts = df[df["scaler"] == row["scaler"]]
            b.scatter(pts["gpu_seconds"], pts["slo_attainment"], s=6 if is_rl else 10, alpha=0.25, color=color)
        b.errorbar(row["gpu_seconds"], row["slo_attainment"], xerr=row["gpu_seconds_ci95"],
                   yerr=row["slo_attainment_ci95"], color=color, capsize=2, lw=1, ms=14 if together else 7,
                   marker="*" if is_rl else "o", mec="black",
                   label=f"{row['scaler']}: {row['slo_attainment']:.3f}, {row['gpu_seconds']:.0f} GPU-s")
    pad = lambda lo, hi: (lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
    b.set_xlim(*pad(df["gpu_seconds"].min(), df["gpu_seconds"].max()))  # the episodes' range, whatever the bars
    b.set_ylim(*pad(df["slo_attainment"].min(), 1.0))
    b.set_xlabel("GPU-seconds per episode")
    b.set_ylabel("SLO attainment")
    b.set_title(f"{len(df['episode'].unique())} held-out test episodes ({cfg.episode_s:.0f} s + drain); "
                "markers: means, bars: 95 % intervals", fontsize=9)
    b.grid(alpha=0.3)
    b.legend(fontsize=6, loc="lower right")
    fig.suptitle(f"Fig. 12: a scaling policy learned on the simulator (PPO) vs heuristic scalers, "
                 f"{setting(cfg.cluster)}")
    fig.tight_layout()
    return fig
