"""`python -m sim.run`: one "what if" from the command line: a workload at a load on a simulated cluster, served by
one or more systems side by side.

    python -m sim.run --workload coding-assistant --rate 2 --gpu h100-80gb --gpus 16 --model llama-3.1-70b --tp 4 \\
        --system pythia --system sglang

Every flag is a field of ``sim.scenario.Scenario`` (or of its ``EngineArgs``); each ``--system`` (or ``--router``,
with ``--scaler``) is simulated on the same workload and printed as one column of the summary table
(``frontend.metrics.summarize``). With ``--out DIR`` the per-call, per-job, time-series, cluster, failure,
prefetch and retention tables of each run go to ``DIR/<name>.<table>.parquet``, with ``DIR/summary.parquet`` and
``DIR/meta.json`` (the command, seed, scenario and version); all of them are written beside DIR first and moved in
only once every one was written, so an interrupted run leaves the previous files as they were.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import textwrap
import time
from dataclasses import asdict, fields
from pathlib import Path

import pandas as pd

from frontend.engine_args import EngineArgs, add_flags, from_flags
from frontend.files import check_writable, move_all, package_version, staging_dir
from frontend.metrics import summarize_results
from frontend.results import Results
from policies.registry import ROUTERS, SCALERS
from policies.systems import SYSTEMS
from sim.hardware import GPUS
from sim.models import MODELS
from sim.scenario import MAX_SEED, Scenario, simulate_scenario
from traces.loaders import TRACES
from traces.schema import WorkloadError
from traces.workflow import WORKFLOWS

DEFAULT = Scenario(system="pythia")  # the defaults of every flag
TABLES = ("requests", "jobs", "timeseries", "cluster", "failures", "prefetches", "retention")
# Scenario / EngineArgs fields whose flag is not the field's name with dashes
FLAGS = {"duration_s": "--duration", "slo_s": "--slo"}


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag's help; a flag whose default is None says in words what it means."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def _known() -> str:
    def listed(what: str, names: object, after: str = "") -> str:
        return textwrap.fill(f"{what}: {', '.join(names)}{after}", 110, subsequent_indent="  ",
                             break_on_hyphens=False)

    systems = "\n".join(f"  {name:15s} {s.label}: router {s.router}, scaler {s.scaler or 'none (fixed replicas)'}"
                        for name, s in SYSTEMS.items())
    return "\n".join([listed("GPUs", GPUS), listed("models", MODELS, " (or the path of a config.json)"),
                      listed("routers", ROUTERS), listed("scalers", SCALERS), f"systems:\n{systems}",
                      listed("workflows", WORKFLOWS, " (or the path of a workflow.yaml)"),
                      listed("traces (in ../shared/traces)", TRACES)])


def _parser() -> argparse.ArgumentParser:
    d = DEFAULT
    ap = argparse.ArgumentParser(prog="python -m sim.run", description="\n\n".join(__doc__.split("\n\n")[:2]),
                                 formatter_class=_Formatter, epilog=_known())
    w = ap.add_argument_group("workload")
    w.add_argument("--workload", default=d.workload, help="workflow name, workflow.yaml path or trace name")
    w.add_argument("--rate", type=float, help="workflows: jobs per second (default 1); agent-session traces: sessions "
                                             "per second (default: the trace's own)")
    w.add_argument("--duration", type=float, help=f"workflows: seconds of job arrivals (default {d.duration_s:g}); "
                                                 "a trace has its own length")
    w.add_argument("--seed", type=int, default=d.seed, help=f"random seed of the workload, 0..{MAX_SEED}")
    w.add_argument("--slo", type=float, help="end-to-end latency objective of every call in seconds (default: the "
                                            "workload's own)")
    c = ap.add_argument_group("cluster")
    c.add_argument("--gpu", default=d.gpu, help="GPU kind (see below)")
    c.add_argument("--gpus", type=int, default=d.gpus, help="GPUs in the cluster")
    c.add_argument("--model", default=d.model, help="model name (see below) or config.json path")
    c.add_argument("--tp", type=int, default=d.tp, help="tensor-parallel GPUs per replica")
    c.add_argument("--replicas", type=int, help="replicas at t=0 (default: the system's choice, one per tp GPUs)")
    c.add_argument("--engine-version", help="cost model's engine generation (default: the GPU's, vllm-v1 on GPUs; "
                                            "vllm-v0 is the eager 2023 vLLM)")
    s = ap.add_argument_group("serving systems (each is one column of the summary)")
    s.add_argument("--system", action="append", help="a named system (see below); repeat to compare "
                                                                  f"(default: {DEFAULT.system} when no --router)")
    s.add_argument("--router", action="append", help="a router on its own (see below); repeatable (default: none)")
    s.add_argument("--scaler", help="the scaler of every --router (default: none, fixed replicas)")
    add_flags(ap.add_argument_group("vLLM engine arguments (agent workloads are compacted to fit --max-model-len)"))
    o = ap.add_argument_group("output")
    o.add_argument("--out", type=Path, help="write the tables as Parquet into this folder (default: print only)")
    o.add_argument("--progress", action="store_true", help="show a progress bar per run")
    return ap


def scenarios(args: argparse.Namespace) -> dict[str, Scenario]:
    """One scenario per system or router, by the name its column gets."""
    engine = from_flags(args)
    if args.duration is not None and args.workload in TRACES:
        raise ValueError(f"--duration applies to workflows; the trace '{args.workload}' has its own length")
    if args.scaler is not None and not args.router:
        raise ValueError("--scaler goes with --router; a --system brings its own scaler")
    base = dict(workload=args.workload, rate=args.rate, seed=args.seed, gpu=args.gpu, gpus=args.gpus,
                model=args.model, tp=args.tp, replicas=args.replicas, engine=engine,
                engine_version=args.engine_version, slo_s=args.slo,
                duration_s=DEFAULT.duration_s if args.duration is None else args.duration)
    systems, routers = args.system or [], args.router or []
    names = systems + routers
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{twice} named twice; each --system and --router runs once")
    out = {name: Scenario(system=name, **base) for name in systems or ([] if routers else [DEFAULT.system])}
    out.update({name: Scenario(router=name, scaler=args.scaler, **base) for name in routers})
    return out


def flag_names(message: str) -> str:
    """An error about Scenario / EngineArgs fields, with the fields named as this command's flags."""
    def flag(m: re.Match) -> str:
        return FLAGS.get(m.group(2), "--" + m.group(2).replace("_", "-"))

    names = "|".join(f.name for f in (*fields(Scenario), *fields(EngineArgs)))
    return re.sub(rf"\b(Scenario|EngineArgs)\.({names})\b", flag, message)


def format_summary(summary: pd.DataFrame) -> str:
    """The summary (a row per run) with the runs side by side: counts as integers, the rest to 4 digits."""
    def column(c: pd.Series) -> pd.Series:
        if pd.api.types.is_integer_dtype(c):
            return c.map(str)
        return c.map(lambda v: f"{v:.0f}" if abs(v) >= 1e4 else f"{v:.4g}")

    return summary.apply(column).T.to_string()


def describe(s: Scenario, table: pd.DataFrame) -> str:
    load = f"{s.rate:g}/s" if s.rate is not None else "the default rate"
    span = f"{s.duration_s:g} s of arrivals" if s.workload not in TRACES else "the whole trace"
    jobs = table.loc[table["job_id"] >= 0, "job_id"].nunique()
    return (f"{s.workload} at {load}, {span}, seed {s.seed}: {len(table)} calls in {jobs} jobs; "
            f"{s.gpus} x {s.gpu}, {s.model} tp={s.tp}, window {s.window()} tokens")


def write_tables(out: Path, runs: dict[str, Results], summary: pd.DataFrame, about: dict) -> list[Path]:
    """Every table of every run, the summary and the provenance, written as one set (``frontend.files``)."""
    stage = staging_dir(out, "sim-run")
    try:
        for name, res in runs.items():
            for t in TABLES:
                getattr(res, t).to_parquet(stage / f"{name}.{t}.parquet", index=False)
        summary.reset_index().to_parquet(stage / "summary.parquet", index=False)
        (stage / "meta.json").write_text(json.dumps(about, indent=1, default=str) + "\n")
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return move_all(stage, out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    try:
        runs = scenarios(args)
        if args.out is not None:
            check_writable(args.out)
        first = next(iter(runs.values()))
        table = first.table()
        print(describe(first, table))
        results, summaries = {}, {}
        for name, s in runs.items():
            t0 = time.perf_counter()
            res = simulate_scenario(s, progress=args.progress, table=table)
            results[name] = res
            summaries[name] = {**summarize_results(res),
                               "wall_s": round(time.perf_counter() - t0, 2)}
    except (ValueError, KeyError, WorkloadError) as e:
        print(f"error: {flag_names(str(e.args[0] if isinstance(e, KeyError) else e))}", file=sys.stderr)
        return 2
    summary = pd.DataFrame.from_dict(summaries, orient="index").rename_axis("run")
    print(format_summary(summary))
    if args.out is not None:
        about = {"command": " ".join([Path(sys.executable).name, "-m", "sim.run", *argv]),
                 "seed": args.seed, "version": package_version(), "scenarios": {n: asdict(s) for n, s in runs.items()}}
        written = write_tables(args.out, results, summary, about)
        print(f"wrote {len(written)} files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
