"""What pythia-sim reads from the shared data folder beside the repository (``../shared``: traces, profiles,
benchmark inputs), and the one mixing function every layer uses to turn ids into well-spread 64-bit values."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"


def shared_dir() -> Path:
    """$PYTHIA_SHARED_DIR, else ``../shared`` next to the repository."""
    return Path(os.environ.get("PYTHIA_SHARED_DIR", SHARED_DIR))


GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 on uint64 (wrapping): ``x + GOLDEN``, then its finalizer. A bijection that spreads nearby
    inputs apart, so sequential ids give independent-looking hashes and token values."""
    x = x + GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))
