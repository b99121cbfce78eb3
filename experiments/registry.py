"""Every figure, table and training run by name: ``python -m experiments.run NAME``.

Each experiment is a module whose ``run(ctx: Context) -> Output`` computes the figure's data and draws it; the
runner (``experiments.run``) writes the files. ``needs`` names the optional extra it cannot run without;
``options`` the command-line options it takes beyond the common ones.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from experiments.output import Context, Output


@dataclass(frozen=True)
class Experiment:
    module: str
    description: str
    needs: str | None = None  # "rl" (stable-baselines3, torch) or "vllm" (real servers)
    options: tuple[str, ...] = ()  # "timesteps", "seeds", "real" (--backend real), "grid" (a grid file)

    def runner(self) -> Callable[[Context], Output]:
        return importlib.import_module(self.module).run


EXPERIMENTS: dict[str, Experiment] = {
    "fig2": Experiment("experiments.fig2", "characterization: cached tokens per call, infinite-cache bound vs "
                                           "round-robin vLLM"),
    "fig7": Experiment("experiments.fig7", "end-to-end: throughput, p99 latency, mean/p95 JCT vs offered load"),
    "fig8": Experiment("experiments.fig8", "ablation: Pythia minus each mechanism, vLLM plus each mechanism alone"),
    "fig9": Experiment("experiments.fig9", "queue length over time under a burst"),
    "fig10": Experiment("experiments.fig10", "GPU memory utilization per GPU over time and its spread"),
    "fig-shape": Experiment("experiments.fig_shape", "where predictability pays: throughput gain over vLLM vs "
                                                     "mean prompt x output, and vs the prefix-reuse bound"),
    "fig-baselines": Experiment("experiments.fig_baselines", "the strong baselines (production-stack, SGLang, "
                                                             "Autellix, Continuum, ThunderAgent) vs vLLM and Pythia "
                                                             "on the agent workloads: JCT, p99, hits, GPU-seconds"),
    "table1": Experiment("experiments.table1", "the paper's table: every baseline vs Pythia on the agent workloads",
                         options=("real",)),
    "validate": Experiment("experiments.validate", "fig. 13: simulator vs real vLLM (tiny CPU model): TTFT, E2E, "
                                                   "hits, queues", needs="vllm"),
    "train-scaler": Experiment("experiments.train_scaler", "train the RL scaler (PPO on the simulator); writes a "
                                                           "checkpoint", needs="rl", options=("timesteps", "seeds")),
    "sweep": Experiment("experiments.sweep", "a grid of what-if scenarios (GRID.yaml): one Parquet row per "
                                           "point, resumable; a summary plot", options=("grid",)),
    "fig12": Experiment("experiments.fig12", "the RL scaler: training curve, SLO attainment vs GPU-seconds on "
                                             "held-out windows", needs="rl"),
}
