"""Error of the cost model against the real A100 profiles in ../shared/profiles, per operator group, model and tp.

    python benchmarks/costmodel_error.py

Uses the constants shipped in sim/hardware.py (refit them with `python -m sim.calibration`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sim.calibration import all_reduce_profile, error_table  # noqa: E402
from sim.hardware import MiB  # noqa: E402

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


def main() -> None:
    table = error_table()
    shown = table.assign(
        mape=(100 * table["mape"]).map("{:.1f}%".format),
        max_ape=(100 * table["max_ape"]).map("{:.1f}%".format),
        ok=np.where(table["target"], np.where(table["mape"] <= TARGET, "yes", "NO"), "(info)"),
    ).drop(columns="target")
    print(shown.to_string(index=False))
    goal = table[table["target"]]
    print(f"\n{(goal['mape'] <= TARGET).sum()}/{len(goal)} targeted rows within MAPE <= {TARGET:.0%}")
    floor = ", ".join(f"tp{tp} {100 * v:.1f}%" for tp, v in noise_floor_small_all_reduce().items())
    print(f"all_reduce <1MiB noise floor (data vs its own 15-point rolling median): {floor}")


if __name__ == "__main__":
    main()
