"""Figure 2 (characterization): cached tokens per call, the infinite-cache bound vs round-robin vLLM.

The paper's motivation: agents reuse the same system prompts and context, yet production caches hit little.
For each workload the infinite-cache bound (traces.characterize) is set against what vanilla vLLM
(round-robin over 8 replicas, each with its own finite prefix cache) achieves in the simulator.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from experiments.common import REFERENCE_LOAD, parallel_map, run_system, system
from traces.characterize import prefix_hits
from traces.workflow import make_workload


@dataclass(frozen=True)
class Spec:
    name: str
    label: str
    kwargs: tuple  # make_workload keyword arguments, as sorted items


def _specs(quick: bool, seed: int) -> list[Spec]:
    dur = 120.0 if quick else 600.0
    return [
        Spec("coding-assistant-chat", "coding-assistant (workflow)",
             (("duration_s", dur), ("rate", REFERENCE_LOAD["coding-assistant-chat"]), ("seed", seed))),
        Spec("software-team-chat", "software-team (workflow)",
             (("duration_s", dur), ("rate", REFERENCE_LOAD["software-team-chat"]), ("seed", seed))),
        Spec("mooncake-conversation", "Mooncake conversation (trace)",
             (("rate_scale", 0.5), ("seed", seed), ("window_s", (0.0, dur)))),
        Spec("claude-code-v8", "Claude Code v8 sessions (trace)",
             (("context_limit_tokens", 32768), ("max_sessions", 20 if quick else 80), ("max_think_s", 60.0),
              ("rate", 0.05), ("seed", seed))),
    ]


def _one(spec: Spec) -> dict:
    table = make_workload(spec.name, **dict(spec.kwargs))
    bound = prefix_hits(table)
    res = run_system(table, system("vllm"))
    got = res.requests.set_index("request_id").loc[table["request_id"], "cached_tokens"].to_numpy()
    inp = table["input_tokens"].to_numpy()
    return {"workload": spec.label, "calls": len(table), "input_tokens": int(inp.sum()),
            "bound_frac": bound / inp, "vllm_frac": got / inp,
            "bound_hit_rate": float(bound.sum() / inp.sum()), "vllm_hit_rate": float(got.sum() / inp.sum()),
            "zero_hit_calls_vllm": float(np.mean(got == 0))}


def run(quick: bool, seed: int, out: Path, jobs: int = 1) -> pd.DataFrame:
    rows = parallel_map(_one, _specs(quick, seed), jobs, desc="workloads")
    fig, axes = plt.subplots(1, len(rows) + 1, figsize=(4 * (len(rows) + 1), 3.6))
    for ax, r in zip(axes, rows, strict=False):
        for key, label, color in (("bound_frac", "infinite cache", "C2"), ("vllm_frac", "vLLM round-robin", "C0")):
            v = np.sort(r[key])
            ax.plot(v, np.arange(1, len(v) + 1) / len(v), color=color, label=label)
        ax.set_title(r["workload"], fontsize=9)
        ax.set_xlabel("cached share of the prompt")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("CDF over calls")
    axes[0].legend(fontsize=8)
    summary = pd.DataFrame([{k: v for k, v in r.items() if not k.endswith("_frac")} for r in rows])
    ax = axes[-1]
    x = np.arange(len(summary))
    ax.bar(x - 0.2, summary["bound_hit_rate"], 0.4, color="C2", label="infinite-cache bound")
    ax.bar(x + 0.2, summary["vllm_hit_rate"], 0.4, color="C0", label="vLLM round-robin")
    ax.set_xticks(x)
    ax.set_xticklabels([w.split(" (")[0] for w in summary["workload"]], rotation=20, fontsize=8)
    ax.set_ylabel("prefix-cache hit rate (tokens)")
    ax.legend(fontsize=8)
    fig.suptitle("Fig. 2: prefix reuse the workloads offer vs what round-robin vLLM gets (8 x A100-40GB)")
    fig.tight_layout()
    fig.savefig(out / "fig2.png", dpi=120)
    plt.close(fig)
    summary.to_csv(out / "fig2.csv", index=False)
    return summary
