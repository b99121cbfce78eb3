"""What an experiment gets (``Context``) and gives back (``Output``), and how its files are written.

An experiment computes its data and draws its figure; it writes nothing itself. ``write_output`` renders the
PNG and the CSVs into a staging folder beside the output folder and moves them in only once all of them were
written, so a run that fails (or is interrupted) leaves the previous files as they were, never a CSV of one
run beside the PNG of another. Every CSV has a JSON sidecar (``NAME.meta.json``) saying which command, seed,
mode and package version made it.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from frontend.files import check_writable, move_all, package_version
from sim.cluster import ClusterConfig


@dataclass(frozen=True)
class Context:
    """How to run an experiment: its size, seed, parallelism and the simulated cluster's base configuration."""

    quick: bool = False
    seed: int = 0
    jobs: int = 1
    cluster: ClusterConfig = ClusterConfig()
    out: Path = Path("figures")  # the output folder (logs that are not results go below it)
    stage: Path | None = None  # where an experiment writes files of its own (e.g. a checkpoint); moved with the rest
    options: dict = field(default_factory=dict)  # experiment-specific (timesteps, real servers, ...)


@dataclass
class Output:
    """One experiment's result: the figure's data (NAME.csv), the figure (NAME.png), further tables
    (NAME_<key>.csv) and what to print (default: the data)."""

    data: pd.DataFrame
    figure: Figure
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    summary: pd.DataFrame | None = None


def check_out_dir(out: Path) -> None:
    """Refuse an output folder that cannot be written, before any work is done."""
    try:
        check_writable(out)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def write_output(out: Path, name: str, output: Output, stage: Path, about: dict) -> list[Path]:
    """Render ``output`` into ``stage`` (from ``staging_dir``), then move every file of ``stage`` into ``out``.
    Returns the paths written."""
    try:
        output.figure.savefig(stage / f"{name}.png", dpi=120)
        tables = {name: output.data, **{f"{name}_{k}": t for k, t in output.tables.items()}}
        for stem, table in tables.items():
            table.to_csv(stage / f"{stem}.csv", index=False)
            (stage / f"{stem}.meta.json").write_text(json.dumps({**about, "table": f"{stem}.csv"}, indent=1) + "\n")
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return move_all(stage, out)


def provenance(name: str, ctx: Context) -> dict:
    """What made a result file: the command, seed, mode and package version."""
    return {"experiment": name, "command": " ".join([Path(sys.executable).name, "-m", "experiments.run",
                                                     *sys.argv[1:]]),
            "seed": ctx.seed, "quick": ctx.quick, "version": package_version()}
