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
    arr = np.asarray(values)
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"row {i}: {col}={arr[i]!r} is not an integer")
    return arr.astype(np.int64)


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
    ids = df["request_id"].to_numpy()
    _refuse(pd.Index(ids).duplicated(), source, lambda i: f"request_id {ids[i]} appears twice; ids must be unique")
    for col, low in (("input_tokens", 1), ("output_tokens", 0)):
        v = df[col].to_numpy()
        _refuse(v < low, source, lambda i: f"{col}={v[i]} must be >= {low}")  # noqa: B023 (called at once)
    arr = df["arrival_s"].to_numpy()
    _refuse(~np.isfinite(arr) | (arr < 0), source, lambda i: f"arrival_s={arr[i]} must be a finite time >= 0")
    roots = np.flatnonzero(np.fromiter((len(p) == 0 for p in df["parents"]), bool, len(df)))
    back = np.zeros(len(df), bool)
    back[roots[1:][np.diff(arr[roots]) < 0]] = True
    _refuse(back, source, lambda i: f"arrival_s={arr[i]} is earlier than an earlier call's; calls without parents "
                                    "must be in arrival order (sort them)")
    think = df["think_s"].to_numpy()
    _refuse(~np.isfinite(think) | (think < 0), source, lambda i: f"think_s={think[i]} must be finite and >= 0")
    hbs = df["hash_block_size"].to_numpy()
    _refuse(hbs < 1, source, lambda i: f"hash_block_size={hbs[i]} must be >= 1")
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
