"""Range checks for configuration values, shared by every config dataclass of both backends.

Each check refuses a bad value at construction with one message naming the field, the value and the allowed
range, instead of letting it be clamped, wrap around in int64 arithmetic, divide by zero or run out of memory
deep inside a run. Upper bounds are there for that reason: a mistyped 1e18 GPUs or tokens is refused here.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import numpy as np

MAX_COUNT = 2**31 - 1  # the largest count of anything (tokens, sequences, blocks, replicas) a config may name


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 2**63 else f"{x:g}"


def _interval(low: float, high: float, open_low: bool) -> str:
    if high == math.inf:
        return f"{'>' if open_low else '>='} {_number(low)}"
    return f"in {'(' if open_low else '['}{_number(low)}, {_number(high)}]"


def check_int(where: str, value: object, low: int, high: int = MAX_COUNT) -> None:
    """``value`` is an integer (not a bool) in [low, high]; ``where`` names the field, e.g. "EngineArgs.block_size"."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not low <= value <= high:
        raise ValueError(f"{where}={value!r} must be {_interval(low, high, False)} (an integer)")


def check_float(where: str, value: object, low: float, high: float = math.inf, *, open_low: bool = False) -> None:
    """``value`` is a finite real number in [low, high] (``open_low``: (low, high]); NaN and infinities are refused."""
    ok = (not isinstance(value, bool) and isinstance(value, int | float | np.integer | np.floating)
          and math.isfinite(value) and (value > low if open_low else value >= low) and value <= high)
    if not ok:
        raise ValueError(f"{where}={value!r} must be {_interval(low, high, open_low)} (a finite number)")


def check_optional_float(where: str, value: object, low: float, high: float = math.inf, *,
                         open_low: bool = False) -> None:
    if value is not None:
        check_float(where, value, low, high, open_low=open_low)


def check_bool(where: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{where}={value!r} must be True or False")


def check_choice(where: str, value: object, allowed: Collection[object]) -> None:
    if value not in allowed:
        raise ValueError(f"{where}={value!r} must be one of {', '.join(map(str, allowed))}")


def check_name(where: str, value: object) -> None:
    """A non-empty string (a pool, model or policy name)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}={value!r} must be a non-empty string")
