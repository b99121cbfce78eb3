"""Plot pieces the figures share: the cluster as words for titles, grouped bars, one colour per system, and the
learning curve of a trained scaler."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from sim.cluster import ClusterConfig  # noqa: E402

GPU_NAMES = {"a100-40gb": "A100-40GB", "a100-80gb": "A100-80GB", "h100-80gb": "H100-80GB", "h200": "H200",
             "cpu-core": "CPU core"}


def setting(cfg: ClusterConfig) -> str:
    """'8 x A100-40GB, llama-3.1-8b' (tp and pools when there are several): what a figure's numbers ran on."""
    pools = ", ".join(p.model + (f" tp{p.tp}" if p.tp > 1 else "") for p in cfg.pools)
    return f"{cfg.num_gpus} x {GPU_NAMES.get(cfg.gpu, cfg.gpu)}, {pools}"


def figure(rows: int, cols: int, width: float, height: float, **kw) -> tuple[Figure, np.ndarray]:
    """A figure of ``rows`` x ``cols`` panels of ``width`` x ``height`` inches each (axes always 2-D)."""
    return plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, **kw)


def color_of(names: Sequence[str]) -> dict[str, str]:
    """One colour per name, in order (the same system gets the same colour in every panel of a figure)."""
    return {n: f"C{k % 10}" for k, n in enumerate(names)}


def grouped_bars(ax: Axes, groups: Sequence[str], heights: Mapping[str, Sequence[float]],
                 colors: Mapping[str, str] | None = None, labels: Mapping[str, str] | None = None) -> None:
    """One bar per series at each group, side by side; ``heights[series][i]`` is the bar of ``groups[i]``."""
    colors = colors or color_of(list(heights))
    x = np.arange(len(groups))
    width = 0.8 / max(len(heights), 1)
    for k, (series, h) in enumerate(heights.items()):
        ax.bar(x + (k - (len(heights) - 1) / 2) * width, h, width, color=colors[series],
               label=(labels or {}).get(series, series))
    ax.set_xticks(x, groups)


def plot_curve(table: pd.DataFrame, ax: Axes, selected_at: int | None = None) -> None:
    """Reward per episode vs training steps; heuristic references as horizontal lines; a training reward
    relative to a baseline on its own (right) axis; the policy kept (``selected_at``) as a vertical line."""
    for name, g in table.groupby("curve", sort=False):
        if name.startswith("train PPO ("):
            right = ax.twinx()
            right.plot(g["timesteps"], g["reward"], lw=0.8, color="C7", label=name)
            right.axhline(0.0, lw=0.5, color="C7", ls=":")
            right.set_ylabel(name, color="C7", fontsize=8)
            right.legend(fontsize=8, loc="lower right")
        elif name.startswith("val ") and name != "val PPO":
            ax.axhline(g["reward"].iloc[0], ls="--", lw=1, label=f"{name} (reference)",
                       color="C2" if "pythia" in name else "C3")
        else:
            ax.plot(g["timesteps"], g["reward"], marker="o" if name == "val PPO" else None, ms=3,
                    lw=1.5 if name == "val PPO" else 0.8, label=name, color="C0" if name == "val PPO" else "C7")
    if selected_at is not None:
        ax.axvline(selected_at, ls=":", lw=1.2, color="C0", label=f"kept: best on validation ({selected_at} steps)")
    ax.set_xlabel("training steps (control intervals)")
    ax.set_ylabel("reward per episode")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
