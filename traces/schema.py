"""The canonical workload table: one row per LLM call, shared by every loader, generator and backend.

Both backends (``sim`` and ``real``) and every policy read only these columns, so a workload is
defined once and replayed anywhere. ``validate`` is called by every loader and generator; it names
the offending row and column instead of letting a bad value fail deep inside a backend.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

# column -> (kind, meaning). Kinds: int, float, str, list (list of ints).
COLUMNS: dict[str, tuple[str, str]] = {
    "request_id": ("int", "unique id of the call"),
    "arrival_s": ("float", "release time in seconds for calls without parents; for calls with parents, "
                           "the time the trace recorded (the backend releases them after parents + think_s)"),
    "input_tokens": ("int", "prompt length in tokens"),
    "output_tokens": ("int", "tokens generated (the backends force exactly this many)"),
    "block_hashes": ("list", "prefix block ids, one per hash_block_size tokens of the prompt; equal ids at "
                             "equal positions mean equal content. Empty: no prefix information (unique prompt)"),
    "hash_block_size": ("int", "tokens per entry of block_hashes (512 Mooncake, 64 Claude Code)"),
    "session_id": ("str", "conversation / agent session; '' when unknown"),
    "job_id": ("int", "workflow instance the call belongs to (JCT is measured per job); -1 when none"),
    "workflow": ("str", "workflow name; '' for unstructured traces"),
    "agent": ("str", "agent (role) that issues the call; '' for unstructured traces"),
    "parents": ("list", "request ids that must finish before this call is released"),
    "think_s": ("float", "tool / think time between the last parent finishing and this call's release"),
    "slo_s": ("float", "end-to-end latency objective of the call in seconds (NaN: none)"),
    "expected_output_tokens": ("int", "front-end hint from workflow.yaml: expected output length; "
                                      "-1 when unknown"),
    "next_agents": ("str", "front-end hint from workflow.yaml: comma-separated agents released after "
                           "this call; '' when unknown"),
}
INT_COLS = [c for c, (k, _) in COLUMNS.items() if k == "int"]
FLOAT_COLS = [c for c, (k, _) in COLUMNS.items() if k == "float"]
STR_COLS = [c for c, (k, _) in COLUMNS.items() if k == "str"]
LIST_COLS = [c for c, (k, _) in COLUMNS.items() if k == "list"]

# Bounds on sizes, so that a mistyped 1e12 is refused with its row instead of running out of memory: the longest
# call any model serves (10 M-token windows exist) and far more rows than the largest shared trace.
MAX_TOKENS = 2**24  # 16,777,216 tokens in one call's prompt, output or any token size of a workflow
MAX_ROWS = 10_000_000  # calls in one workload table
INT64_MAX = 2**63 - 1

DEFAULTS = {
    "hash_block_size": 16, "session_id": "", "job_id": -1, "workflow": "", "agent": "",
    "think_s": 0.0, "slo_s": float("nan"), "expected_output_tokens": -1, "next_agents": "",
}


class WorkloadError(ValueError):
    """A workload (file, row or column) that cannot be replayed; the message names where and how to fix."""


def _where(source: str, row: int | None = None) -> str:
    return f"{source}, row {row}" if row is not None else source


def make_table(rows: dict[str, object] | pd.DataFrame, source: str = "workload") -> pd.DataFrame:
    """Build a canonical table from column data, filling optional columns with their defaults.

    Every loader and generator goes through here, so all tables have identical dtypes and order.
    """
    df = pd.DataFrame(rows) if not isinstance(rows, pd.DataFrame) else rows.copy()
    for col in ("request_id", "arrival_s", "input_tokens", "output_tokens"):
        if col not in df.columns:
            raise WorkloadError(f"{source}: required column '{col}' is missing (have: {list(df.columns)})")
    n = len(df)
    if "block_hashes" not in df.columns:
        df["block_hashes"] = [[] for _ in range(n)]
    if "parents" not in df.columns:
        df["parents"] = [[] for _ in range(n)]
    for col, default in DEFAULTS.items():
        if col not in df.columns:
            df[col] = default
    extra = [c for c in df.columns if c not in COLUMNS]
    if extra:
        raise WorkloadError(f"{source}: unknown column(s) {extra}; canonical columns are {list(COLUMNS)}")
    out = pd.DataFrame(index=pd.RangeIndex(n))
    for col, (kind, _) in COLUMNS.items():
        values = df[col].to_numpy() if kind != "list" else df[col].tolist()
        try:
            if kind == "int":
                out[col] = _as_int(values, col)
            elif kind == "float":
                out[col] = np.asarray(values, dtype=np.float64)
            elif kind == "str":
                out[col] = pd.array(["" if v is None else str(v) for v in values], dtype=object)
            else:
                out[col] = [_as_int_list(v) for v in values]
        except (TypeError, ValueError) as e:
            raise WorkloadError(f"{source}: column '{col}' has a value of the wrong type: {e}") from None
    validate(out, source)
    return out


def _as_int(values: np.ndarray, col: str) -> np.ndarray:
    """int64, refusing values that are not whole numbers or do not fit (instead of wrapping around)."""
    arr = np.asarray(values)
    if arr.dtype.kind in "iub" and not (arr.dtype.kind == "u" and arr.dtype.itemsize == 8):
        return arr.astype(np.int64)
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr) | (arr != np.round(arr)) | (np.abs(arr) >= 2.0**63)
    else:  # uint64 or Python objects (e.g. ints beyond int64)
        bad = np.fromiter((not _fits_int64(v) for v in arr), bool, len(arr))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"row {i}: {col}={arr[i]} is not an integer in [-2^63, 2^63)")
    return np.asarray([int(v) for v in arr] if arr.dtype.kind == "O" else arr, dtype=np.int64)


def _fits_int64(v: object) -> bool:
    if isinstance(v, float | np.floating):
        return bool(np.isfinite(v)) and float(v).is_integer() and abs(v) < 2.0**63
    return isinstance(v, int | np.integer) and -INT64_MAX - 1 <= int(v) <= INT64_MAX


def _as_int_list(v: object) -> list[int]:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return []
    return [int(x) for x in v]  # type: ignore[union-attr]


def _refuse(bad: np.ndarray, source: str, message: Callable[[int], str]) -> None:
    """Raise WorkloadError for the first row where ``bad`` holds."""
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise WorkloadError(f"{_where(source, i)}: {message(i)}")


def validate(df: pd.DataFrame, source: str = "workload") -> pd.DataFrame:
    """Check a canonical table; raise WorkloadError naming the first bad row and field."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise WorkloadError(f"{source}: missing column(s) {missing}; build tables with traces.schema.make_table")
    if len(df) > MAX_ROWS:
        raise WorkloadError(f"{source}: {len(df)} calls; a workload may have at most {MAX_ROWS} (a shorter duration, "
                            "a lower rate or a window of the trace)")
    ids = df["request_id"].to_numpy()
    _refuse(pd.Index(ids).duplicated(), source, lambda i: f"request_id {ids[i]} appears twice; ids must be unique")
    for col, low, high in (("request_id", 0, INT64_MAX), ("input_tokens", 1, MAX_TOKENS),
                           ("output_tokens", 0, MAX_TOKENS), ("hash_block_size", 1, MAX_TOKENS),
                           ("job_id", -1, INT64_MAX), ("expected_output_tokens", -1, MAX_TOKENS)):
        v = df[col].to_numpy()
        _refuse((v < low) | (v > high), source,
                lambda i: f"{col}={v[i]} must be in [{low}, {high}]")  # noqa: B023 (called at once)
    arr = df["arrival_s"].to_numpy()
    _refuse(~np.isfinite(arr) | (arr < 0), source, lambda i: f"arrival_s={arr[i]} must be a finite time >= 0")
    roots = np.flatnonzero(np.fromiter((len(p) == 0 for p in df["parents"]), bool, len(df)))
    back = np.zeros(len(df), bool)
    back[roots[1:][np.diff(arr[roots]) < 0]] = True
    _refuse(back, source, lambda i: f"arrival_s={arr[i]} is earlier than an earlier call's; calls without parents "
                                    "must be in arrival order (sort them)")
    think = df["think_s"].to_numpy()
    _refuse(~np.isfinite(think) | (think < 0), source, lambda i: f"think_s={think[i]} must be finite and >= 0")
    slo = df["slo_s"].to_numpy()
    _refuse(~np.isnan(slo) & ~(np.isfinite(slo) & (slo > 0)), source,
            lambda i: f"slo_s={slo[i]} must be a finite number > 0 (or NaN: no objective)")
    hbs = df["hash_block_size"].to_numpy()
    inp = df["input_tokens"].to_numpy()
    for i, (blocks, size) in enumerate(zip(df["block_hashes"], hbs, strict=True)):
        if len(blocks) > -(-int(inp[i]) // int(size)):
            raise WorkloadError(
                f"{_where(source, i)}: {len(blocks)} block_hashes of {size} tokens cover more than "
                f"input_tokens={inp[i]}; expected at most ceil(input_tokens / hash_block_size)")
    pos = {int(r): k for k, r in enumerate(ids)}
    for i, parents in enumerate(df["parents"]):
        for p in parents:
            k = pos.get(int(p))
            if k is None:
                raise WorkloadError(f"{_where(source, i)}: parent {p} of request {ids[i]} is not in the table")
            if k >= i:
                raise WorkloadError(f"{_where(source, i)}: parent {p} of request {ids[i]} must come before "
                                    f"it (rows are in release order)")
    return df


def save(df: pd.DataFrame, path: str | Path) -> None:
    validate(df, str(path))
    df.to_parquet(path, index=False)


def load(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise WorkloadError(f"{path}: no such workload file")
    return make_table(pd.read_parquet(path), str(path))
