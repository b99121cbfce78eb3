"""`python -m experiments.run sweep GRID.yaml [--jobs N | --ray auto|HOST:PORT] [--out DIR] [--quick]`: every
point of a grid of what-if scenarios (``sim.scenario.Scenario``), one Parquet row per point.

A grid file names ``Scenario`` fields (``engine`` and ``workload_options`` as mappings of their own fields); a
list is an axis, anything else a fixed value, and the points are every combination of the axes (the first axis
outermost)::

    workload: coding-assistant
    rate: 0.5
    gpu: [a100-40gb, a100-80gb, h100-80gb]
    gpus: [2, 4, 8]
    system: [vllm, vllm-hpa, sglang, pythia]
    engine: {max_num_seqs: [128, 256]}
    seed: [0, 1, 2]
    plot: {x: gpus, columns: gpu, metrics: [gpu_seconds, p99_latency_s]}   # optional

The whole grid is checked before anything runs (types, every value on a cluster and with its policies, every
point), and a bad one is refused naming the file, the line and the field. Rows go to ``OUT/sweep-STEM.parquet``
(STEM: the grid file's name) while the runs complete, so an interrupted or partly failed sweep keeps what it has;
the same command then runs only the points the Parquet lacks. A point is identified by every field of its
``Scenario`` (column ``point``), so a Parquet made by another grid (other fixed values, other defaults) is
refused rather than mixed in. The figure shows each metric against ``x``, one panel per value of ``columns`` and
one line per combination of the other axes, as the mean over seeds with its 95 % interval; its data is
``OUT/sweep-STEM.csv``. ``--quick`` keeps the first two values of every axis and at most 30 s of arrivals.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
import types
import typing
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import simpy
import yaml
from matplotlib.figure import Figure
from scipy import stats

from experiments.common import completions
from experiments.output import Context, Output
from experiments.plots import color_of, figure
from frontend.engine_args import EngineArgs
from policies.registry import make_router, make_scaler
from policies.systems import make_system
from sim.cluster import SimBackend
from sim.scenario import Scenario, summarize_scenario
from traces.loaders import TRACES
from traces.workflow import load_workflow

NESTED = {"engine": EngineArgs, "workload_options": None}  # mapping fields (None: free keys, make_workload's)
METRICS = ("throughput_rps", "p99_latency_s", "slo_attainment", "gpu_seconds")  # plotted unless `plot` says
QUICK_VALUES, QUICK_DURATION_S = 2, 30.0
FLUSH_S = 10.0  # rows are written at most this often while runs complete (and always at the end)


class GridError(ValueError):
    """A grid file that cannot be run; the message names the file, line and field."""


@dataclass(frozen=True)
class Grid:
    path: Path
    axes: dict[str, list]  # swept field ("gpu", "engine.max_num_seqs") -> its values, in file order
    points: list[Scenario]  # every combination, the first axis outermost
    settings: list[dict]  # per point: the axes' values
    x: str
    columns: str | None
    metrics: tuple[str, ...]


def point_id(s: Scenario) -> str:
    """Every field of the scenario as canonical JSON: what identifies a point in the Parquet."""
    return json.dumps(flat(s), sort_keys=True)


def flat(s: Scenario) -> dict:
    """The scenario's fields as columns: nested engine arguments as ``engine.NAME``, workload options as JSON."""
    row: dict = {}
    for f in fields(Scenario):
        v = getattr(s, f.name)
        if f.name == "engine":
            row.update({f"engine.{k.name}": getattr(v, k.name) for k in fields(EngineArgs)})
        elif f.name == "workload_options":
            row[f.name] = json.dumps(v, sort_keys=True)
        else:
            row[f.name] = v
    return row


# --- the grid file ---------------------------------------------------------------------------------------

def load_grid(path: Path, quick: bool = False) -> Grid:
    """Read and check a grid file; ``GridError`` names file:line: field for anything wrong."""
    try:
        text = path.read_text()
    except OSError as e:
        raise GridError(f"{path}: cannot read the grid file ({e.strerror or e})") from None
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise GridError(f"{path}{f':{mark.line + 1}' if mark else ''}: not valid YAML: "
                        f"{getattr(e, 'problem', e)}") from None
    if not isinstance(root, yaml.MappingNode):
        raise GridError(f"{path}:1: a grid is a mapping of Scenario fields to values or lists of values")
    entries, plot = _entries(path, root)
    axes = {k: [v for v, _ in vs] for k, (vs, is_axis) in entries.items() if is_axis}
    if quick:
        axes = {k: vs[:QUICK_VALUES] for k, vs in axes.items()}
    fixed = {k: vs[0][0] for k, (vs, is_axis) in entries.items() if not is_axis}
    if quick and "duration_s" not in axes:
        fixed["duration_s"] = min(fixed.get("duration_s") or QUICK_DURATION_S, QUICK_DURATION_S)
    line = {k: vs[0][1] for k, (vs, _) in entries.items()}
    where = lambda key, value=None: _where(path, entries, key, value)

    # The first point, built a field at a time in file order, so a failure names the field that caused it.
    first = {k: vs[0] for k, vs in axes.items()} | fixed
    if not {"system", "router"} & set(first):
        raise GridError(f"{path}:1: field 'system' or 'router' is missing: a point needs a named system "
                        "(policies.systems) or a router")
    policy = {k: first[k] for k in ("system", "router", "scaler") if k in first}
    s = _start(policy, path, line)
    for key in sorted(first, key=lambda k: line.get(k, 0)):
        s = _checked(s, key, first[key], where(key))
    base = s
    for key, values in axes.items():  # every other value of every axis, on the first point
        for v in values[1:]:
            _checked(base, key, v, where(key, v))
    points, settings = [], []
    for combo in itertools.product(*axes.values()):
        setting = dict(zip(axes, combo, strict=True))
        p = base
        try:
            for key, v in setting.items():
                p = _apply(p, key, v)
            _check(p)
        except (ValueError, KeyError, TypeError) as e:
            at = ", ".join(f"{k}={v!r} (line {_where_line(entries, k, v)})" for k, v in setting.items())
            raise GridError(f"{path}: the point {at} cannot run: {_message(e)}") from None
        points.append(p)
        settings.append(setting)
    ids = [point_id(p) for p in points]
    if len(set(ids)) < len(ids):
        dup = next((k for k in axes if len(set(map(repr, axes[k]))) < len(axes[k])), None)
        if dup is not None:
            raise GridError(f"{where(dup)} lists a value twice: {axes[dup]}")
        raise GridError(f"{path}: two combinations of the axes make the same scenario")
    x, columns, metrics = _plot_spec(path, plot, axes)
    return Grid(path, axes, points, settings, x, columns, metrics)


def _entries(path: Path, root: yaml.MappingNode) -> tuple[dict[str, tuple[list[tuple[object, int]], bool]], dict]:
    """field -> ([(value, line)], is an axis); nested mappings flattened to ``engine.NAME``; and the plot spec."""
    out: dict[str, tuple[list[tuple[object, int]], bool]] = {}
    plot: dict = {}
    hints = typing.get_type_hints(Scenario)
    known = [f.name for f in fields(Scenario)]
    for key_node, value_node in _pairs(path, root):
        key = key_node.value
        if key == "plot":
            plot = {"node": value_node, "value": yaml.safe_load(yaml.serialize(value_node))}
            continue
        if key not in known:
            raise GridError(f"{path}:{key_node.start_mark.line + 1}: unknown field '{key}'; a grid names Scenario "
                            f"fields: {', '.join(known)} (and 'plot')")
        if key in NESTED:
            if not isinstance(value_node, yaml.MappingNode):
                raise GridError(f"{path}:{value_node.start_mark.line + 1}: field '{key}' is a mapping of its own "
                                "fields to values or lists")
            cls = NESTED[key]
            sub_hints = typing.get_type_hints(cls) if cls else {}
            for sub_key, sub_node in _pairs(path, value_node):
                name = f"{key}.{sub_key.value}"
                if cls and sub_key.value not in sub_hints:
                    raise GridError(f"{path}:{sub_key.start_mark.line + 1}: unknown field '{name}'; {key} has "
                                    f"{', '.join(sub_hints)}")
                out[name] = _values(path, name, sub_node, sub_hints.get(sub_key.value))
        else:
            out[key] = _values(path, key, value_node, hints[key])
    return out, plot


def _pairs(path: Path, node: yaml.MappingNode) -> list[tuple[yaml.ScalarNode, yaml.Node]]:
    seen: dict[str, int] = {}
    for k, _ in node.value:
        if not isinstance(k, yaml.ScalarNode):
            raise GridError(f"{path}:{k.start_mark.line + 1}: a key must be a field name")
        if k.value in seen:
            raise GridError(f"{path}:{k.start_mark.line + 1}: field '{k.value}' given twice (first on line "
                            f"{seen[k.value]})")
        seen[k.value] = k.start_mark.line + 1
    return node.value


def _values(path: Path, name: str, node: yaml.Node, hint: object) -> tuple[list[tuple[object, int]], bool]:
    is_axis = isinstance(node, yaml.SequenceNode)
    items = node.value if is_axis else [node]
    if is_axis and not items:
        raise GridError(f"{path}:{node.start_mark.line + 1}: field '{name}' lists no values")
    out = []
    for item in items:
        line = item.start_mark.line + 1
        value = yaml.safe_load(yaml.serialize(item))
        out.append((_typed(value, hint, f"{path}:{line}: field '{name}'"), line))
    return out, is_axis


def _typed(value: object, hint: object, where: str) -> object:
    """``value`` as the field's type (an int where a float goes becomes a float), or GridError."""
    if hint is None:  # a make_workload keyword: any YAML scalar
        if isinstance(value, list | dict):
            raise GridError(f"{where}: {value!r} is not a single value")
        return value
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    if float in allowed and isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise GridError(f"{where}: {value!r} is not a finite number")
        return float(value)
    for t in (int, str, bool):
        if t in allowed and type(value) is t:
            return value
    names = " or ".join("null" if t is type(None) else getattr(t, "__name__", str(t)) for t in allowed)
    raise GridError(f"{where}: {value!r} is not {names}")


def _start(policy: dict, path: Path, line: dict) -> Scenario:
    """A first scenario with the grid's first system (or router and scaler), on Scenario's other defaults."""
    try:
        return Scenario(**policy)
    except (ValueError, KeyError) as e:
        key = max(policy, key=lambda k: line[k])  # the field that clashes with those before it
        raise GridError(f"{path}:{line[key]}: field '{key}': {_message(e)}") from None


def _apply(s: Scenario, key: str, value: object) -> Scenario:
    head, _, sub = key.partition(".")
    if head == "engine":
        return replace(s, engine=replace(s.engine, **{sub: value}))
    if head == "workload_options":
        return replace(s, workload_options={**s.workload_options, sub: value})
    return replace(s, **{key: value})


def _checked(s: Scenario, key: str, value: object, where: str) -> Scenario:
    try:
        p = _apply(s, key, value)
        _check(p)
        return p
    except (ValueError, KeyError, TypeError) as e:
        raise GridError(f"{where}: {_message(e)}") from None


def _check(s: Scenario) -> None:
    """What a run would refuse at its start: the cluster (GPU, model, tp, engine arguments, initial replicas), the
    policies and the workload's name; cheap, so the whole grid is checked before anything runs."""
    SimBackend(simpy.Environment(), s.cluster())
    if s.system is not None:
        make_system(s.system)
    else:
        make_router(s.router)
        if s.scaler:
            make_scaler(s.scaler)
    if s.workload not in TRACES:
        _workflow(s.workload)


@lru_cache(maxsize=32)
def _workflow(name: str) -> object:
    return load_workflow(name)


def _message(e: Exception) -> str:
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def _where(path: Path, entries: dict, key: str, value: object = None) -> str:
    return f"{path}:{_where_line(entries, key, value)}: field '{key}'"


def _where_line(entries: dict, key: str, value: object) -> int:
    if key not in entries:  # not in the file: the duration --quick sets
        return 1
    values = entries[key][0]
    return next((line for v, line in values if v == value), values[0][1])


def _plot_spec(path: Path, plot: dict, axes: dict[str, list]) -> tuple[str, str | None, tuple[str, ...]]:
    spec = plot.get("value") or {}
    line = plot["node"].start_mark.line + 1 if plot else 1
    if not isinstance(spec, dict) or set(spec) - {"x", "columns", "metrics"}:
        raise GridError(f"{path}:{line}: field 'plot' takes x, columns and metrics, got {spec!r}")
    shown = [k for k in axes if k != "seed"]
    x = spec.get("x", shown[0] if shown else "seed")
    columns = spec.get("columns", shown[2] if len(shown) > 2 and x == shown[0] else None)
    for name, v in (("x", x), ("columns", columns)):
        if v is not None and v not in axes:
            raise GridError(f"{path}:{line}: field 'plot.{name}': {v!r} is not an axis of the grid "
                            f"({', '.join(axes) or 'none'})")
    metrics = spec.get("metrics", list(METRICS))
    if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) for m in metrics):
        raise GridError(f"{path}:{line}: field 'plot.metrics': {metrics!r} is not a list of metric names")
    return x, columns, tuple(metrics)


# --- running -------------------------------------------------------------------------------------------

def store_path(out: Path, grid: Path) -> Path:
    return out / f"sweep-{grid.stem}.parquet"  # beside experiments.run's sweep-STEM.csv / .png


def read_store(store: Path, grid: Grid) -> pd.DataFrame:
    """The rows a previous run of this grid wrote (none if there is no store); refuses a store of another grid."""
    if not store.exists():
        return pd.DataFrame()
    try:
        done = pd.read_parquet(store)
    except Exception as e:  # pyarrow's errors have no common base
        raise GridError(f"{store}: cannot read the sweep's Parquet ({e}); move it away to start afresh") from None
    if "point" not in done.columns:
        raise GridError(f"{store}: has no 'point' column, so it was not written by a sweep; use another --out")
    ids = {point_id(p) for p in grid.points}
    foreign = done.loc[~done["point"].isin(ids), "point"]
    if len(foreign):
        raise GridError(f"{store}: {len(foreign)} of its {len(done)} rows are points {grid.path} does not name "
                        f"(e.g. {foreign.iloc[0]}); it was written by another grid (or other defaults): pass "
                        "another --out or remove it")
    return done


def write_store(store: Path, rows: pd.DataFrame) -> None:
    """Atomically: a temporary file beside the store, then renamed over it."""
    tmp = store.with_name(f".{store.name}.tmp")
    rows.to_parquet(tmp, index=False)
    os.replace(tmp, store)


def run(ctx: Context) -> Output:
    grid = load_grid(Path(ctx.options["grid"]), ctx.quick)
    store = store_path(ctx.out, grid.path)
    done = read_store(store, grid)
    have = set(done["point"]) if len(done) else set()
    todo = [k for k, p in enumerate(grid.points) if point_id(p) not in have]
    print(f"{grid.path}: {len(grid.points)} points, {len(grid.points) - len(todo)} already in {store}, "
          f"running {len(todo)}")
    order = {point_id(p): k for k, p in enumerate(grid.points)}
    rows, failures, last = [done] if len(done) else [], [], time.monotonic()

    def flush() -> None:
        if rows:
            table = pd.concat(rows, ignore_index=True)
            table = table.iloc[np.argsort([order[i] for i in table["point"]], kind="stable")].reset_index(drop=True)
            write_store(store, table)

    try:
        for i, ok, value in completions(summarize_scenario, [grid.points[k] for k in todo], ctx.jobs, "points"):
            k = todo[i]
            if ok:
                rows.append(pd.DataFrame([{"point": point_id(grid.points[k]), **flat(grid.points[k]), **value}]))
            else:
                failures.append((grid.settings[k], value))
            if time.monotonic() - last > FLUSH_S:
                flush()
                last = time.monotonic()
    finally:  # interrupted too: what completed is kept for the next run
        flush()
    if failures:
        text = "\n".join(f"  {' '.join(f'{k}={v}' for k, v in s.items())}: {e.strip().splitlines()[-1]}"
                         for s, e in failures)
        raise SystemExit(f"sweep: {len(failures)} of {len(grid.points)} points failed (the others are in {store}; "
                         f"the same command reruns only the missing ones):\n{text}\nfirst error:\n{failures[0][1]}")
    table = pd.read_parquet(store)
    summary = summarize_grid(table, grid)
    return Output(summary, plot(summary, grid), summary=summary)


def summarize_grid(table: pd.DataFrame, grid: Grid) -> pd.DataFrame:
    """Per combination of the axes other than ``seed``: each metric's mean over seeds and its 95 % interval
    (Student's t; NaN with one seed)."""
    settings = pd.DataFrame(grid.settings)
    table = pd.concat([settings, table.drop(columns=[c for c in settings.columns if c in table.columns])], axis=1)
    keys = [k for k in grid.axes if k != "seed"]
    groups = table.groupby(keys, sort=False, dropna=False) if keys else [((), table)]
    out = []
    for key, g in groups:
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        row["seeds"] = len(g)
        for m in grid.metrics:
            v = g[m].to_numpy(dtype=float)
            row[m] = float(v.mean())
            row[f"{m}_ci95"] = (float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
                                if len(v) > 1 else math.nan)
        out.append(row)
    return pd.DataFrame(out)


def plot(summary: pd.DataFrame, grid: Grid) -> Figure:
    """Rows: metrics; columns: values of ``grid.columns``; x: values of ``grid.x`` (in grid order); one line per
    combination of the other axes, with 95 % intervals over seeds."""
    xs = grid.axes.get(grid.x, [None])
    cols = grid.axes[grid.columns] if grid.columns else [None]
    hue = [k for k in grid.axes if k not in ("seed", grid.x, grid.columns)]
    combos = list(summary[hue].drop_duplicates().itertuples(index=False, name=None)) if hue else [()]
    colors = color_of([", ".join(map(str, c)) for c in combos])
    fig, axes = figure(len(grid.metrics), len(cols), 4.2, 3.0, sharex=True)
    for c, col in enumerate(cols):
        here = summary if col is None else summary[summary[grid.columns] == col]
        for r, metric in enumerate(grid.metrics):
            ax = axes[r][c]
            for combo in combos:
                label = ", ".join(map(str, combo))
                g = here
                for k, v in zip(hue, combo, strict=True):
                    g = g[g[k] == v]
                if grid.x in g.columns:
                    g = g.set_index(grid.x).reindex(xs)
                ax.errorbar(np.arange(len(g)), g[metric], yerr=g[f"{metric}_ci95"], marker="o", ms=3, capsize=2,
                            lw=1, color=colors[label], label=label or None)
            ax.set_xticks(np.arange(len(xs)), [str(x) for x in xs])
            ax.grid(alpha=0.3)
            if c == 0:
                ax.set_ylabel(metric)
            if r == 0 and col is not None:
                ax.set_title(f"{grid.columns} = {col}", fontsize=10)
            if r == len(grid.metrics) - 1:
                ax.set_xlabel(grid.x)
    if hue:
        axes[0][0].legend(fontsize=7, title=", ".join(hue), title_fontsize=7)
    seeds = len(grid.axes.get("seed", [0]))
    fig.suptitle(f"sweep {grid.path.name}: {len(grid.points)} points, mean over {seeds} seed(s), 95 % interval")
    fig.tight_layout()
    return fig
