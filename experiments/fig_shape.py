"""fig-shape: where predictability pays. The throughput gain of cache-aware serving (SGLang-style routing, Pythia)
over round-robin vLLM as a function of the call shape (mean prompt x mean output tokens), and of how much prefix
reuse a workload offers.

Every cell is the `coding-assistant` agent workflow rescaled to the cell's mean prompt and output
(``traces.workflow.scale_to_means``: same agents, turns and fan-out). Throughput is measured saturated, as a
batch of agent programs is served: ``JOBS`` jobs start together with their tool times shrunk ``TOOL_TIME_SCALE``
(so that each program always has a call in the cluster and the batch keeps every replica busy: a capacity
measurement, not a latency one), and the rate is the calls completed between the 10th and the 60th percentile
of finish times (past the start-up, before the last long jobs trail off) per second. The gain is that rate
relative to round-robin vLLM's on the same jobs. The second panel does the same for each shipped workflow at its
own shape, against its prefix-hit bound (the share of prompt tokens an infinite cache would hold).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from experiments.common import parallel_map, run_system
from experiments.output import Context, Output
from experiments.plots import color_of, figure, setting
from policies.systems import system
from sim.cluster import ClusterConfig
from traces.characterize import prefix_hits
from traces.workflow import Workflow, load_workflow, make_workload, scale_to_means, scale_workflow

SYSTEMS = ("vllm", "sglang", "pythia")
BASE = "coding-assistant"
PROMPTS = (512, 2048, 8192, 32768)  # mean prompt tokens per call
OUTPUTS = (16, 64, 256, 1024)  # mean output tokens per call
SHIPPED = ("coding-assistant", "software-team", "coding-assistant-chat", "software-team-chat")
PAPER_POINT = (2048, 20)  # the paper's operating point as MISSION.md derives it: ~2K prompts, tens of outputs
JOBS = 128  # programs started together (--quick: 48): 16 per replica on 8 GPUs
TOOL_TIME_SCALE = 1e-3
WINDOW = (10, 60)  # percentiles of finish times between which the completion rate is measured


@dataclass(frozen=True)
class Cell:
    label: str  # "cell" or a shipped workflow's name
    target: tuple[float, float]  # the cell's (mean prompt, mean output); NaN for a shipped workflow
    workflow: Workflow
    jobs: int
    seed: int
    cluster: ClusterConfig


def _rate(requests: pd.DataFrame) -> float:
    done = np.sort(requests.loc[requests["status"] == "ok", "finish_s"].to_numpy())
    lo, hi = np.percentile(done, WINDOW)
    inside = ((done >= lo) & (done <= hi)).sum()
    return float(inside / (hi - lo)) if hi > lo else float("nan")


def _run(cell: Cell) -> list[dict]:
    table = make_workload(cell.workflow, arrivals="poisson:1000", num_jobs=cell.jobs, seed=cell.seed)
    inp = table["input_tokens"].to_numpy()
    shape = {"case": cell.workflow.name, "label": cell.label, "target_prompt": cell.target[0],
             "target_output": cell.target[1], "mean_prompt": float(inp.mean()),
             "mean_output": float(table["output_tokens"].mean()),
             "hit_bound": float(prefix_hits(table).sum() / inp.sum()), "calls": len(table)}
    rows = []
    for s in SYSTEMS:
        res = run_system(table, s, cell.cluster)
        r = res.requests
        rows.append({**shape, "system": s, "calls_per_s": _rate(r),
                     "hit_rate": float(r["cached_tokens"].sum() / r["input_tokens"].sum()),
                     "failed": int((r["status"] != "ok").sum())})
    return rows


def run(ctx: Context) -> Output:
    prompts, outputs = ((2048, 8192), (16, 256)) if ctx.quick else (PROMPTS, OUTPUTS)
    jobs = 48 if ctx.quick else JOBS

    def saturating(wf: Workflow) -> Workflow:
        return scale_workflow(wf, tool_time_scale=TOOL_TIME_SCALE)

    base = load_workflow(BASE)
    cells = [Cell("cell", (p, o), saturating(scale_to_means(base, p, o, num_jobs=60, seed=ctx.seed,
                                                               name=f"{BASE}@{p}/{o}")), jobs, ctx.seed, ctx.cluster)
             for p in prompts for o in outputs]
    nan = float("nan")
    cells += [Cell(name, (nan, nan), saturating(load_workflow(name)), jobs, ctx.seed, ctx.cluster) for name in SHIPPED]
    df = pd.DataFrame([row for rows in parallel_map(_run, cells, ctx.jobs, desc="shapes") for row in rows])
    vllm = df["calls_per_s"].where(df["system"] == "vllm").groupby(df["case"]).transform("max")
    df["gain"] = df["calls_per_s"] / vllm
    summary = df.pivot_table(index=["case", "mean_prompt", "mean_output", "hit_bound"], columns="system",
                             values="gain", sort=False).reset_index()
    return Output(df, plot(df, prompts, outputs, setting(ctx.cluster)), summary=summary)


def plot(df: pd.DataFrame, prompts, outputs, where: str) -> Figure:
    others = [s for s in SYSTEMS if s != "vllm"]
    fig, axes = figure(1, len(others) + 1, 5, 4.3)
    cells = df[df["label"] == "cell"]
    shipped = df[df["label"] != "cell"]
    vmax = max(2.0, float(np.nanmax(df["gain"])))
    for ax, s in zip(axes[0], others, strict=False):
        d = cells[cells["system"] == s]
        grid = np.full((len(outputs), len(prompts)), np.nan)
        for i, o in enumerate(outputs):
            for j, p in enumerate(prompts):
                v = d[(d["target_prompt"] == p) & (d["target_output"] == o)]
                if len(v):
                    grid[i, j] = v["gain"].iloc[0]
        im = ax.imshow(grid, origin="lower", cmap="RdYlGn", norm=LogNorm(1 / vmax, vmax), aspect="auto")
        for i in range(len(outputs)):
            for j in range(len(prompts)):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}x", ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(prompts)), [f"{p:,}" for p in prompts])
        ax.set_yticks(range(len(outputs)), [str(o) for o in outputs])
        ax.set_xlabel("mean prompt (tokens)")
        ax.set_ylabel("mean output (tokens)")
        ax.set_title(f"{system(s).label} / vLLM round-robin: throughput", fontsize=10)
        for _, w in shipped[shipped["system"] == s].iterrows():  # shipped workloads on the log grid (edge: beyond it)
            ax.plot(np.interp(np.log(w["mean_prompt"]), np.log(prompts), range(len(prompts))),
                    np.interp(np.log(w["mean_output"]), np.log(outputs), range(len(outputs))), "k^", ms=6)
            ax.annotate(w["label"], (np.interp(np.log(w["mean_prompt"]), np.log(prompts), range(len(prompts))),
                                     np.interp(np.log(w["mean_output"]), np.log(outputs), range(len(outputs)))),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
        px = np.interp(np.log(PAPER_POINT[0]), np.log(prompts), range(len(prompts)))
        py = np.interp(np.log(PAPER_POINT[1]), np.log(outputs), range(len(outputs)))
        ax.plot(px, py, "k*", ms=12)
        ax.annotate("paper's point", (px, py), fontsize=8, xytext=(4, -10), textcoords="offset points")
        bar = fig.colorbar(im, ax=ax, fraction=0.046)
        ticks = [t for t in (0.25, 0.5, 1, 2, 4, 8, 16) if 1 / vmax <= t <= vmax]
        bar.set_ticks(ticks, labels=[f"{t:g}x" for t in ticks])
        bar.minorticks_off()
    ax = axes[0][-1]
    colors = color_of(SYSTEMS)
    for s in others:
        d = shipped[shipped["system"] == s]
        ax.scatter(d["hit_bound"], d["gain"], color=colors[s], label=system(s).label)
        for _, w in d.iterrows():
            ax.annotate(w["label"], (w["hit_bound"], w["gain"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xlabel("prefix-hit bound (infinite cache)")
    ax.set_ylabel("throughput / vLLM round-robin")
    ax.set_title("shipped workflows at their own shape", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"fig-shape: where cache-aware, predictive serving pays, {where} (saturated, simulated)")
    fig.tight_layout()
    return fig
