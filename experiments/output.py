"""What an experiment gets (``Context``) and gives back (``Output``), and how its files are written.

An experiment computes its data and draws its figure; it writes nothing itself. ``write_output`` renders the
PNG and the CSVs into a staging folder beside the output folder and moves them in only once all of them were
written, so a run that fails (or is interrupted) leaves the previous files as they were, never a CSV of one
run beside the PNG of another. Every CSV has a JSON sidecar (``NAME.meta.json``) saying which command, seed,
mode and package version made it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

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
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise SystemExit(f"--out {out}: cannot write there ({e.strerror or e})") from None


def staging_dir(out: Path, name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out))


def write_output(out: Path, name: str, output: Output, stage: Path, about: dict) -> list[Path]:
    """Render ``output`` into ``stage`` (from ``staging_dir``), then move every file of ``stage`` into ``out``.
    Returns the paths written."""
    try:
        output.figure.savefig(stage / f"{name}.png", dpi=120)
        tables = {name: output.data, **{f"{name}_{k}": t for k, t in output.tables.items()}}
        for stem, table in tables.items():
            table.to_csv(stage / f"{stem}.csv", index=False)
            (stage / f"{stem}.meta.json").write_text(json.dumps({**about, "table": f"{stem}.csv"}, indent=1) + "\n")
        written = []
        for path in sorted(stage.iterdir()):
            os.replace(path, out / path.name)
            written.append(out / path.name)
        return written
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def provenance(name: str, ctx: Context) -> dict:
    """What made a result file: the command, seed, mode and package version."""
    try:
        version = metadata.version("pythia-sim")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {"experiment": name, "command": " ".join([Path(sys.executable).name, "-m", "experiments.run",
                                                     *sys.argv[1:]]),
            "seed": ctx.seed, "quick": ctx.quick, "version": version}
