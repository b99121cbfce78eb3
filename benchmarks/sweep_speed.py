"""Wall time of one sweep run three ways, side by side: serially in one process, on ``--jobs N`` local worker
processes, and as tasks on a Ray cluster (``--ray``, default ``auto``: a fresh local one unless one runs).

`python benchmarks/sweep_speed.py [GRID.yaml] [--jobs 2] [--ray auto] [--quick]`: each way writes its own
Parquet (into a temporary folder, so none resumes another's); the three must be equal, bit for bit. Prints each
way's wall time (Ray's with and without starting its cluster: `ray.init` is timed apart) and the speed-ups over
the serial run. Needs the ``ray`` extra for the third way (skipped, and said so, without it).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import tempfile
import time
from pathlib import Path

import pandas as pd

from experiments.run import main as run_experiment

SHIPPED = Path(__file__).resolve().parents[1] / "experiments" / "grids" / "gpus-sizes-systems.yaml"


def timed_sweep(grid: Path, out: Path, flags: list[str], quick: bool) -> tuple[float, pd.DataFrame]:
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the summary table, printed once below
        code = run_experiment(["sweep", str(grid), "--out", str(out), *flags, *(["--quick"] if quick else [])])
    if code != 0:
        raise SystemExit(f"sweep {' '.join(flags)} failed with exit code {code}")
    return time.perf_counter() - t0, pd.read_parquet(out / f"sweep-{grid.stem}.parquet")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("grid", nargs="?", type=Path, default=SHIPPED, help="grid file")
    ap.add_argument("--jobs", type=int, default=2, help="local worker processes")
    ap.add_argument("--ray", default="auto", help="Ray cluster address ('auto': this machine's, else a new one)")
    ap.add_argument("--quick", action="store_true", help="the grid's --quick version (first 2 values per axis)")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ways: list[tuple[str, list[str]]] = [("serial", []), (f"--jobs {args.jobs}", ["--jobs", str(args.jobs)])]
    if importlib.util.find_spec("ray") is None:
        print("ray is not installed (pip install -e '.[ray]'): the Ray run is skipped")
    else:
        ways.append((f"--ray {args.ray}", ["--ray", args.ray]))
    results = {}
    with tempfile.TemporaryDirectory(prefix="sweep-speed-") as tmp:
        for name, flags in ways:
            load = os.getloadavg()[0]
            results[name] = timed_sweep(args.grid, Path(tmp) / name.replace(" ", "_"), flags, args.quick)
            print(f"{name}: {results[name][0]:.1f} s (1-min load average before: {load:.1f}, after: "
                  f"{os.getloadavg()[0]:.1f}; other work on the machine slows every way)", flush=True)
    serial_s, serial_rows = results["serial"]
    for name, (_, rows) in results.items():
        pd.testing.assert_frame_equal(serial_rows, rows, check_exact=True, obj=f"the rows of {name}")
    start_s = None
    if len(ways) == 3:  # Ray's cluster start, timed on its own
        import ray

        t0 = time.perf_counter()
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
        start_s = time.perf_counter() - t0
        ray.shutdown()
    print(f"\n{args.grid.name}{' (--quick)' if args.quick else ''}: {len(serial_rows)} points, rows equal in all "
          f"{len(ways)} runs; {os.cpu_count()} CPUs")
    print(f"{'way':<16}{'wall s':>9}{'speed-up':>10}")
    for name, (wall, _) in results.items():
        print(f"{name:<16}{wall:>9.1f}{serial_s / wall:>9.2f}x")
    if start_s is not None:
        ray_s = results[ways[2][0]][0]
        print(f"Ray less its cluster start ({start_s:.1f} s, timed apart): {ray_s - start_s:.1f} s, "
              f"{serial_s / (ray_s - start_s):.2f}x")


if __name__ == "__main__":
    main()
