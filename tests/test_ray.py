# ruff: noqa: E402  (imports follow the importorskip of the optional packages)
"""Ray (the `ray` extra): a sweep and a multi-seed training on a local Ray cluster on the loopback address give
the same results, bit for bit, as the local worker processes; failed tasks are retried once, then named; and no
Ray process outlives its cluster."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import psutil
import pytest

ray = pytest.importorskip("ray", reason="the Ray tests need the 'ray' extra: pip install -e '.[ray]'")
pytest.importorskip("stable_baselines3", reason="the Ray tests train with the 'rl' extra: pip install -e '.[rl]'")
import torch
from stable_baselines3 import PPO

from experiments.common import RunsFailed, parallel_map, ray_cluster
from experiments.run import main

GRID = Path(__file__).resolve().parent / "grids" / "four-points.yaml"


@pytest.fixture(autouse=True, scope="module")
def _ray_environment():
    """No usage reports from test clusters, and workers at this process's niceness (Ray's default is 15)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setenv("RAY_worker_niceness", "0")
        yield


def _ray_processes() -> list[psutil.Process]:
    """Ray's processes started from this one (GCS server, raylet, workers, monitors)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "ray" in " ".join(p.cmdline()).lower():
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def _assert_no_ray_left() -> None:
    _, alive = psutil.wait_procs(_ray_processes(), timeout=20)
    assert not alive, f"Ray processes left after shutdown: {[p.cmdline() for p in alive]}"


def test_a_sweep_on_ray_auto_equals_the_local_processes_and_stops_its_cluster(tmp_path):
    """`--ray auto` with no cluster running starts one on this machine (loopback), runs the 4 points as tasks
    and stops it again."""
    assert main(["sweep", str(GRID), "--jobs", "2", "--out", str(tmp_path / "local")]) == 0
    assert main(["sweep", str(GRID), "--ray", "auto", "--out", str(tmp_path / "ray")]) == 0
    local = pd.read_parquet(tmp_path / "local" / "sweep-four-points.parquet")
    on_ray = pd.read_parquet(tmp_path / "ray" / "sweep-four-points.parquet")
    assert len(local) == 4
    pd.testing.assert_frame_equal(local, on_ray, check_exact=True)
    assert not ray.is_initialized()
    _assert_no_ray_left()


@pytest.fixture(scope="module")
def head():
    """A Ray head on the loopback address with 2 CPUs, shut down (and checked gone) after the tests."""
    info = ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    try:
        yield info.address_info["gcs_address"]
    finally:
        ray.shutdown()
        _assert_no_ray_left()


def test_two_seeds_trained_on_ray_equal_the_local_processes(head, tmp_path):
    args = ["train-scaler", "--quick", "--seeds", "2", "--timesteps", "512", "--seed", "5"]
    assert main([*args, "--jobs", "2", "--out", str(tmp_path / "local")]) == 0
    assert main([*args, "--ray", head, "--out", str(tmp_path / "ray")]) == 0
    assert ray.is_initialized()  # a process already connected stays connected
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    pd.testing.assert_frame_equal(pd.read_csv(local / "train-scaler.csv"), pd.read_csv(on_ray / "train-scaler.csv"),
                                  check_exact=True)
    seeds = [pd.read_csv(d / "train-scaler_seeds.csv").drop(columns="wall_s") for d in (local, on_ray)]
    pd.testing.assert_frame_equal(*seeds, check_exact=True)
    assert list(seeds[0]["seed"]) == [5, 6]
    for name in ("train-scaler-seed5", "train-scaler-seed6", "train-scaler"):
        a, b = (PPO.load(d / f"{name}.zip", device="cpu").policy.state_dict() for d in (local, on_ray))
        assert all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((on_ray / "train-scaler.json").read_text())
    assert meta["seeds"] == [5, 6] and meta["seed"] in (5, 6)


def _fails_once(marker_and_x: tuple[str, int]) -> int:
    """Fails on its first call for an input (leaving a marker file), succeeds on the second."""
    marker, x = marker_and_x
    path = Path(f"{marker}-{x}")
    if not path.exists():
        path.write_text("tried")
        raise RuntimeError(f"first try of {x}")
    return 10 * x


def _fails_on_two(x: int) -> int:
    if x == 2:
        raise ValueError("two is bad")
    return 10 * x


def test_a_failed_task_is_retried_once_then_named(head, tmp_path):
    marker = str(tmp_path / "tried")
    with ray_cluster(head):
        assert parallel_map(_fails_once, [(marker, x) for x in range(3)]) == [0, 10, 20]
        with pytest.raises(RunsFailed, match=r"1 of 4 runs failed:\n  2:\n.*ValueError: two is bad") as e:
            parallel_map(_fails_on_two, [0, 1, 2, 3])
    assert e.value.results == [0, 10, None, 30]
