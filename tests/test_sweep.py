"""Sweeps over a grid of what-if scenarios: the grid file, its refusals, one Parquet row per point, resuming,
failed points reported by their point; and the local worker pool stopping on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

import experiments.sweep as sweep
from experiments.common import RunsFailed, parallel_map
from experiments.run import main
from experiments.sweep import GridError, load_grid, point_id
from frontend.engine_args import EngineArgs
from sim import scenario
from sim.scenario import Scenario

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "experiments" / "grids"
SMALL = (Path(__file__).resolve().parent / "grids" / "four-points.yaml").read_text()


def grid_file(tmp_path: Path, text: str, name: str = "g.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_grid_is_every_combination_of_its_lists(tmp_path):
    g = load_grid(grid_file(tmp_path, SMALL + "engine: {max_num_seqs: [64, 128], block_size: 32}\n"))
    assert g.axes == {"system": ["vllm", "pythia"], "seed": [0, 1], "engine.max_num_seqs": [64, 128]}
    assert len(g.points) == 8 and len({point_id(p) for p in g.points}) == 8
    assert g.points[0] == Scenario(workload="coding-assistant-chat", rate=0.5, duration_s=20.0, gpus=2, system="vllm",
                                   seed=0, engine=EngineArgs(max_num_seqs=64, block_size=32))
    assert [p.system for p in g.points[:4]] == ["vllm"] * 4  # the first axis outermost
    assert g.points[-1].engine.max_num_seqs == 128 and g.points[-1].seed == 1
    assert (g.x, g.columns) == ("system", None)  # the other axis: one line per value


def test_the_shipped_grids_load(tmp_path):
    grids = sorted(SHIPPED.glob("*.yaml"))
    assert grids
    for path in grids:
        g = load_grid(path)
        assert len(g.points) == len({point_id(p) for p in g.points}) > 1
    g = load_grid(SHIPPED / "gpus-sizes-systems.yaml")
    assert len(g.points) == 3 * 3 * 4 * 3
    assert len(load_grid(SHIPPED / "gpus-sizes-systems.yaml", quick=True).points) == 2 ** 4


@pytest.mark.parametrize("text, message", [
    ("workload: coding-assistant\nsystm: vllm\n", r"g.yaml:2: unknown field 'systm'"),
    ("system: vllm\ngpus: [2, four]\n", r"g.yaml:2: field 'gpus': 'four' is not int"),
    ("system: vllm\ngpus: [2, true]\n", r"g.yaml:2: field 'gpus': True is not int"),
    ("system: vllm\nrate: .nan\n", r"g.yaml:2: field 'rate': nan is not a finite number"),
    ("system: vllm\ngpu:\n  - a100-40gb\n  - h900\n", r"g.yaml:4: field 'gpu': .*h900"),
    ("system: [vllm, nosuch]\n", r"g.yaml:1: field 'system': .*'nosuch'"),
    ("system: vllm\nengine:\n  max_num_seqs: [64, 0]\n", r"g.yaml:3: field 'engine.max_num_seqs': .*max_num_seqs=0"),
    ("system: vllm\nengine: {max_seqs: 4}\n", r"g.yaml:2: unknown field 'engine.max_seqs'"),
    ("system: vllm\nseed: 1\nseed: 2\n", r"g.yaml:3: field 'seed' given twice \(first on line 2\)"),
    ("system: vllm\nseed: []\n", r"g.yaml:2: field 'seed' lists no values"),
    ("system: vllm\nrouter: round_robin\n", r"g.yaml:2: field 'router': .*exactly one of system"),
    ("workload: coding-assistant\n", r"g.yaml:1: field 'system' or 'router' is missing"),
    ("system: vllm\nworkload: no-such-workflow\n", r"g.yaml:2: field 'workload': .*'no-such-workflow'"),
    ("system: vllm\nseed: [1, 1]\n", r"g.yaml:2: field 'seed' lists a value twice"),
    ("system: vllm\ngpus: [2, 4]\nplot: {x: gpu}\n", r"g.yaml:3: field 'plot.x': 'gpu' is not an axis"),
    ("- system: vllm\n", r"g.yaml:1: a grid is a mapping"),
    ("system: [vllm\n", r"g.yaml:2: not valid YAML"),
])
def test_bad_grids_are_refused_naming_file_line_and_field(tmp_path, text, message):
    with pytest.raises(GridError, match=message):
        load_grid(grid_file(tmp_path, text))


def test_a_combination_that_cannot_run_is_refused_naming_its_values(tmp_path):
    """Each value alone is fine on the first point (8 GPUs, 1 replica); 4 replicas on 2 GPUs are not."""
    with pytest.raises(GridError, match=r"the point gpus=2 \(line 2\), replicas=4 \(line 3\) cannot run: .*"
                                        r"need 4 GPUs"):
        load_grid(grid_file(tmp_path, "system: vllm\ngpus: [8, 2]\nreplicas: [1, 4]\n"))


def test_the_command_refuses_a_bad_grid_before_any_work(tmp_path, capsys):
    with pytest.raises(GridError, match="unknown field 'systm'"):
        main(["sweep", str(grid_file(tmp_path, "systm: vllm\n")), "--out", str(tmp_path / "out")])
    assert not list((tmp_path / "out").glob("*.parquet"))
    assert main(["sweep", "--out", str(tmp_path)]) == 2
    assert "'sweep' needs a grid file" in capsys.readouterr().err
    assert main(["fig7", str(grid_file(tmp_path, SMALL))]) == 2
    assert "a grid file applies to sweep, not 'fig7'" in capsys.readouterr().err


def _counting(monkeypatch, fail: set[str] = frozenset()) -> list[Scenario]:
    """Replace the sweep's runner by one that records each scenario it runs (and fails on ``fail`` systems)."""
    ran: list[Scenario] = []
    real = scenario.summarize_scenario

    def run(s: Scenario) -> dict:
        ran.append(s)
        if s.system in fail:
            raise RuntimeError(f"broken system {s.system}")
        return real(s)

    monkeypatch.setattr(sweep, "summarize_scenario", run)
    return ran


def test_a_sweep_writes_a_row_per_point_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "out"
    ran = _counting(monkeypatch)
    first = grid_file(tmp_path, SMALL.replace("seed: [0, 1]", "seed: [0]"), "g.yaml")
    assert main(["sweep", str(first), "--out", str(out)]) == 0
    rows = pd.read_parquet(out / "sweep-g.parquet")
    assert len(ran) == 2 and list(rows["system"]) == ["vllm", "pythia"] and (rows["num_requests"] > 0).all()
    assert (out / "sweep-g.png").stat().st_size > 10_000 and len(pd.read_csv(out / "sweep-g.csv")) == 2
    # the same grid with one more seed: only the two new points run, and the rows come out in grid order
    ran.clear()
    first.write_text(SMALL)
    assert main(["sweep", str(first), "--out", str(out)]) == 0
    rows = pd.read_parquet(out / "sweep-g.parquet")
    assert [(s.system, s.seed) for s in ran] == [("vllm", 1), ("pythia", 1)]
    assert list(zip(rows["system"], rows["seed"], strict=True)) == [("vllm", 0), ("vllm", 1), ("pythia", 0),
                                                                    ("pythia", 1)]
    summary = pd.read_csv(out / "sweep-g.csv")
    assert list(summary["system"]) == ["vllm", "pythia"] and (summary["seeds"] == 2).all()
    assert summary["gpu_seconds_ci95"].notna().all()
    # a rerun runs nothing and leaves the rows as they were
    ran.clear()
    assert main(["sweep", str(first), "--out", str(out)]) == 0
    assert ran == [] and pd.read_parquet(out / "sweep-g.parquet").equals(rows)


def test_a_store_of_another_grid_is_refused(tmp_path, monkeypatch):
    _counting(monkeypatch)
    path = grid_file(tmp_path, SMALL.replace("seed: [0, 1]", "seed: [0]"))
    assert main(["sweep", str(path), "--out", str(tmp_path)]) == 0
    path.write_text(SMALL.replace("seed: [0, 1]", "seed: [0]").replace("duration_s: 20", "duration_s: 25"))
    with pytest.raises(GridError, match="2 of its 2 rows are points .* does not name"):
        main(["sweep", str(path), "--out", str(tmp_path)])


def test_a_failed_point_is_reported_by_its_point_and_the_others_are_kept(tmp_path, monkeypatch):
    ran = _counting(monkeypatch, fail={"pythia"})
    path = grid_file(tmp_path, SMALL)
    with pytest.raises(SystemExit, match=r"2 of 4 points failed(.|\n)*system=pythia seed=0: RuntimeError: broken "
                                         r"system pythia(.|\n)*system=pythia seed=1"):
        main(["sweep", str(path), "--out", str(tmp_path)])
    assert len(ran) == 4
    assert list(pd.read_parquet(tmp_path / "sweep-g.parquet")["system"]) == ["vllm", "vllm"]
    assert not (tmp_path / "sweep-g.png").exists()
    ran = _counting(monkeypatch)  # fixed: the rerun runs only the failed points
    assert main(["sweep", str(path), "--out", str(tmp_path)]) == 0
    assert [s.system for s in ran] == ["pythia", "pythia"]


def _fails_on_two(x: int) -> int:
    if x == 2:
        raise ValueError("two is bad")
    return x * 10


@pytest.mark.parametrize("jobs", [1, 2])
def test_parallel_map_finishes_the_other_runs_and_names_the_failed_one(jobs):
    assert parallel_map(_fails_on_two, [0, 1, 3], jobs) == [0, 10, 30]
    with pytest.raises(RunsFailed, match=r"1 of 4 runs failed:\n  2:\n    ValueError: two is bad") as e:
        parallel_map(_fails_on_two, [0, 1, 2, 3], jobs)
    assert e.value.results == [0, 10, None, 30] and list(e.value.failures) == [2]


@pytest.mark.parametrize("where", [["--jobs", "2"], ["--ray", "auto"]], ids=["jobs", "ray"])
def test_sigterm_stops_the_worker_processes(tmp_path, where):
    """SIGTERM to `experiments.run ... --jobs 2` (or `--ray auto`): the command ends and none of its worker
    processes (or of the Ray cluster it started) survives it."""
    if where[0] == "--ray":
        pytest.importorskip("ray", reason="needs the 'ray' extra: pip install -e '.[ray]'")
    grid = grid_file(tmp_path, "workload: coding-assistant\nrate: 1.0\nduration_s: 120\nsystem: [vllm, pythia]\n"
                               "seed: [0, 1, 2, 3]\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "experiments.run", "sweep", str(grid), *where, "--out",
                             str(tmp_path / "out")], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 60
        while len(children := parent.children(recursive=True)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(children) >= 2, "the worker processes never started"
        time.sleep(5.0)  # the workers are simulating
        children = parent.children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        # experiments.run exits with 128 + SIGTERM; inside ray.wait Ray turns that exit into its own SystemExit(1)
        assert code == 128 + signal.SIGTERM if where[0] == "--jobs" else code != 0
        _, alive = psutil.wait_procs(children, timeout=20)
        assert not alive, f"still alive after SIGTERM: {[p.info for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_only_experiments_imports_ray():
    """DESIGN.md: sweeps and training may run on Ray; nothing below experiments/ knows it."""
    import ast

    below = [p for pkg in ("traces", "policies", "frontend", "sim", "real") for p in sorted((REPO / pkg).rglob("*.py"))]
    assert below
    for path in below:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n == "ray" or n.startswith("ray.")], f"{path} imports Ray"
