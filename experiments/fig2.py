"""Figure 2 (characterization): cached tokens per call, the infinite-cache bound vs round-robin vLLM.

The paper's motivation: agents reuse the same system prompts and context, yet production caches hit little.
For each workload the infinite-cache bound (traces.characterize) is set against what vanilla vLLM
(round-robin over the cluster's replicas, each with its own finite prefix cache) achieves in the simulator.
The data is one row per call: its prompt tokens, the tokens an infinite cache would hold, and what vLLM hit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from experiments.common import REFERENCE_LOAD, duration, parallel_map, run_system
from experiments.output import Context, Output
from experiments.plots import figure, setting
from sim.cluster import ClusterConfig
from traces.characterize import prefix_hits
from traces.workflow import make_workload


@dataclass(frozen=True)
class Spec:
    name: str
    label: str
    kwargs: tuple  # make_workload keyword arguments, as sorted items
    cluster: ClusterConfig


def _specs(ctx: Context) -> list[Spec]:
    dur = duration(ctx.quick)
    seed, c = ctx.seed, ctx.cluster
    return [
        Spec("coding-assistant-chat", "coding-assistant (workflow)",
             (("duration_s", dur), ("rate", REFERENCE_LOAD["coding-assistant-chat"]), ("seed", seed)), c),
        Spec("software-team-chat", "software-team (workflow)",
             (("duration_s", dur), ("rate", REFERENCE_LOAD["software-team-chat"]), ("seed", seed)), c),
        Spec("mooncake-conversation", "Mooncake conversation (trace)",
             (("rate_scale", 0.5), ("seed", seed), ("window_s", (0.0, dur))), c),
        Spec("claude-code-v8", "Claude Code v8 sessions (trace)",
             (("context_limit_tokens", 32768), ("max_sessions", 20 if ctx.quick else 80), ("max_think_s", 60.0),
              ("rate", 0.05), ("seed", seed)), c),
    ]


def _one(spec: Spec) -> pd.DataFrame:
    table = make_workload(spec.name, **dict(spec.kwargs))
    res = run_system(table, "vllm", spec.cluster)
    got = res.requests.set_index("request_id").loc[table["request_id"], "cached_tokens"].to_numpy()
    return pd.DataFrame({"workload": spec.label, "request_id": table["request_id"].to_numpy(),
                         "input_tokens": table["input_tokens"].to_numpy(), "bound_tokens": prefix_hits(table),
                         "vllm_cached_tokens": got})


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    g = df.groupby("workload", sort=False)
    out = g[["input_tokens", "bound_tokens", "vllm_cached_tokens"]].sum()
    return pd.DataFrame({"calls": g.size(), "input_tokens": out["input_tokens"],
                         "bound_hit_rate": out["bound_tokens"] / out["input_tokens"],
                         "vllm_hit_rate": out["vllm_cached_tokens"] / out["input_tokens"],
                         "zero_hit_calls_vllm": g["vllm_cached_tokens"].agg(lambda v: float(np.mean(v == 0)))
                         }).reset_index()


def run(ctx: Context) -> Output:
    df = pd.concat(parallel_map(_one, _specs(ctx), ctx.jobs, desc="workloads"), ignore_index=True)
    return Output(df, plot(df, setting(ctx.cluster)), summary=summarize(df))


def plot(df: pd.DataFrame, where: str) -> Figure:
    summary = summarize(df)
    fig, axes = figure(1, len(summary) + 1, 4, 3.6)
    axes = axes[0]
    for ax, (w, d) in zip(axes, df.groupby("workload", sort=False), strict=False):
        for key, label, color in (("bound_tokens", "infinite cache", "C2"),
                                  ("vllm_cached_tokens", "vLLM round-robin", "C0")):
            v = np.sort(d[key] / d["input_tokens"])
            ax.plot(v, np.arange(1, len(v) + 1) / len(v), color=color, label=label)
        ax.set_title(w, fontsize=9)
        ax.set_xlabel("cached share of the prompt")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("CDF over calls")
    axes[0].legend(fontsize=8)
    ax = axes[-1]
    x = np.arange(len(summary))
    ax.bar(x - 0.2, summary["bound_hit_rate"], 0.4, color="C2", label="infinite-cache bound")
    ax.bar(x + 0.2, summary["vllm_hit_rate"], 0.4, color="C0", label="vLLM round-robin")
    ax.set_xticks(x, [w.split(" (")[0] for w in summary["workload"]], rotation=20, fontsize=8)
    ax.set_ylabel("prefix-cache hit rate (tokens)")
    ax.legend(fontsize=8)
    fig.suptitle(f"Fig. 2: prefix reuse the workloads offer vs what round-robin vLLM gets ({where})")
    fig.tight_layout()
    return fig
