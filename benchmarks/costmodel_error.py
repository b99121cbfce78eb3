"""Error of the cost model against real timings, per operator group, model and tp, and per public source.

    python benchmarks/costmodel_error.py                      # vLLM v1 (the default engine)
    python benchmarks/costmodel_error.py --engine vllm-v0     # the eager 2023 vLLM of Splitwise's measurements

Both print the GPU-kernel rows (Vidur's A100 profiles; the kernels are the same under either engine). vllm-v0 adds
Splitwise's end-to-end vLLM steps; vllm-v1 adds the public vLLM v1 measurements listed, with their sources, in
sim/calibrations/engine-vllm-v1.json. Uses the shipped data files (refit them with `python -m sim.calibration`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sim.calibration import PROFILES, all_reduce_profile, error_table, v1_error_table  # noqa: E402
from sim.hardware import GPU_ENGINES, MiB  # noqa: E402

TARGET = 0.10


def noise_floor_small_all_reduce() -> pd.Series:
    """MAPE below 1 MiB of the data against its own 15-point rolling median: what no smooth model can beat."""
    df = all_reduce_profile()
    out = {}
    for tp, g in df.groupby("tp"):
        smooth = g["measured"].rolling(15, center=True, min_periods=1).median()
        small = g["bytes"] < MiB
        out[int(tp)] = float(np.mean(np.abs(smooth[small] / g["measured"][small] - 1.0)))
    return pd.Series(out)


def _verdict(error: pd.Series, target: pd.Series) -> np.ndarray:
    return np.where(target, np.where(error <= TARGET, "yes", "NO"), "(info)")


def print_kernel_table(engine: str) -> pd.DataFrame:
    table = error_table()
    if engine != "vllm-v0":  # Splitwise's end-to-end rows measured the 2023 engine
        table = table[~table["group"].str.startswith(("e2e", "cpu_overhead"))]
    shown = table.assign(
        mape=(100 * table["mape"]).map("{:.1f}%".format),
        max_ape=(100 * table["max_ape"]).map("{:.1f}%".format),
        ok=_verdict(table["mape"], table["target"]),
    ).drop(columns="target")
    print(shown.to_string(index=False))
    floor = ", ".join(f"tp{tp} {100 * v:.1f}%" for tp, v in noise_floor_small_all_reduce().items())
    print(f"all_reduce <1MiB noise floor (data vs its own 15-point rolling median): {floor}")
    return table.assign(error=table["mape"])


def print_v1_table() -> pd.DataFrame:
    table = v1_error_table()
    print("\npublic vLLM v1 measurements (sim/calibrations/engine-vllm-v1.json):")
    for source, rows in table.groupby("source", sort=False):
        first = rows.iloc[0]
        print(f"\n{source}\n  {first['url']}")
        shown = rows.assign(
            predicted_ms=rows["predicted_ms"].map("{:.2f}".format),
            error=(100 * rows["error"]).map("{:+.1f}%".format),
            ok=_verdict(rows["error"].abs(), rows["target"]),
        )[["vllm", "gpu", "model", "tp", "metric", "measured_ms", "predicted_ms", "error", "ok"]]
        print(shown.to_string(index=False))
    return table.assign(error=table["error"].abs())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--engine", choices=GPU_ENGINES, default="vllm-v1", help="engine generation whose step times "
                    "are checked beside the kernels")
    args = ap.parse_args(argv)
    if not PROFILES.is_dir():
        print(f"the measured timings are not here: {PROFILES} does not exist (the shared profiles belong in "
              "../shared/profiles beside the repository, or set PYTHIA_SHARED_DIR)", file=sys.stderr)
        return 2
    tables = [print_kernel_table(args.engine)]
    if args.engine == "vllm-v1":
        tables.append(print_v1_table())
    goal = pd.concat([t[t["target"]] for t in tables])
    print(f"\n{args.engine}: {(goal['error'] <= TARGET).sum()}/{len(goal)} targeted rows within {TARGET:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
