"""Result files written as a set: into a staging folder inside the output folder, then moved in one by one only
once every one of them was written, so a run that fails or is interrupted leaves the previous files as they were
(never a table of one run beside a figure of another). Used by ``python -m sim.run`` and ``experiments.run``."""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path


def package_version() -> str:
    """pythia-sim's installed version, for the provenance of result files."""
    try:
        return metadata.version("pythia-sim")
    except metadata.PackageNotFoundError:
        return "unknown"


def check_writable(out: Path) -> None:
    """Create ``out`` if needed and write a file there, before any work; ValueError naming the folder if not."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def staging_dir(out: Path, name: str) -> Path:
    """A fresh hidden folder inside ``out`` (same file system, so moving out of it is an atomic rename)."""
    return Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out))


def move_all(stage: Path, out: Path) -> list[Path]:
    """Move every file of ``stage`` into ``out`` (replacing files of the same name), then remove ``stage``; returns
    the paths written."""
    try:
        written = []
        for path in sorted(stage.iterdir()):
            os.replace(path, out / path.name)
            written.append(out / path.name)
        return written
    finally:
        shutil.rmtree(stage, ignore_errors=True)
