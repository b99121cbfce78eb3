"""End-to-end: every registered experiment runs in --quick mode and writes its figure and data."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from experiments.registry import EXPERIMENTS
from experiments.run import main


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("figures")


GRID = Path(__file__).resolve().parents[1] / "experiments" / "grids" / "gpus-sizes-systems.yaml"


@pytest.mark.parametrize("name", [n for n, e in EXPERIMENTS.items() if e.needs != "vllm"])
def test_quick_experiment_writes_png_and_csv(name, out):
    if EXPERIMENTS[name].needs == "rl":
        pytest.importorskip("stable_baselines3", reason=f"{name} needs the 'rl' extra: pip install -e '.[rl]'")
    grid = [str(GRID)] if "grid" in EXPERIMENTS[name].options else []  # a sweep: the shipped example grid
    assert main([name, *grid, "--quick", "--out", str(out), "--seed", "3"]) == 0
    if grid:
        name = f"{name}-{GRID.stem}"
        assert len(pd.read_parquet(out / f"{name}.parquet")) == 16  # the first 2 values of each of 4 axes
    assert (out / f"{name}.png").stat().st_size > 10_000
    assert len(pd.read_csv(out / f"{name}.csv")) > 0
    about = json.loads((out / f"{name}.meta.json").read_text())
    assert about["quick"] is True and about["seed"] == 3 and about["experiment"] == name
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_quick_runs_never_write_into_the_shipped_figures_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["fig10", "--quick"]) == 0
    assert (tmp_path / "figures/quick/fig10.csv").exists() and not (tmp_path / "figures/fig10.csv").exists()


def test_a_failing_run_leaves_the_previous_files_untouched(tmp_path, monkeypatch):
    (tmp_path / "fig10.csv").write_text("old\n")
    import experiments.fig10 as fig10

    def broken_plot(df, where):
        raise RuntimeError("the plot failed")

    monkeypatch.setattr(fig10, "plot", broken_plot)
    with pytest.raises(RuntimeError, match="the plot failed"):
        main(["fig10", "--quick", "--out", str(tmp_path)])
    assert (tmp_path / "fig10.csv").read_text() == "old\n" and not (tmp_path / "fig10.png").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["fig10.csv"]  # nothing half-written, no staging folder


def test_bad_out_and_seed_are_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="cannot write there"):
        main(["table1", "--out", str(blocker / "sub")])
    assert main(["table1", "--seed", "-1"]) == 2
    assert "--seed -1: must be in 0.." in capsys.readouterr().err


def test_table1_columns(out):
    if not (out / "table1.csv").exists():
        main(["table1", "--quick", "--out", str(out)])
    t = pd.read_csv(out / "table1.csv")
    assert list(t.columns) == ["workload", "system", "throughput_rps", "p99_latency_s", "prefix_hit_rate",
                               "mem_util_cv", "burst_queue_len", "mean_jct_s", "p95_jct_s", "gpu_seconds",
                               "slo_attainment"]
    assert t["prefix_hit_rate"].between(0, 1).all()
    assert len(t) == 16  # 2 agent workloads x 8 systems (vLLM, HPA, production-stack, SGLang, Autellix, Continuum,
    #                       ThunderAgent, Pythia)


def test_fig_baselines_compares_every_baseline_on_both_agent_workloads(out):
    if not (out / "fig-baselines.csv").exists():
        main(["fig-baselines", "--quick", "--out", str(out), "--seed", "3"])
    t = pd.read_csv(out / "fig-baselines.csv")
    systems = ["vllm", "production-stack", "sglang", "autellix", "continuum", "thunderagent", "pythia"]
    for w in ("coding-assistant", "software-team"):
        assert t.loc[t["workload"] == w, "system"].tolist() == systems
    assert (t["num_failed"] == 0).all() and t["prefix_hit_rate"].between(0, 1).all()
    assert (t[["mean_jct_s", "p99_latency_s", "gpu_seconds"]] > 0).all().all()
    assert (t.loc[~t["system"].isin(["continuum", "pythia"]), "pinned_block_s"] == 0).all()  # only they pin


def test_unknown_experiment_lists_known(capsys):
    assert main(["fig99"]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'fig99'" in err and "fig7" in err


def test_list_names_every_experiment(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in EXPERIMENTS)


def test_timesteps_and_seeds_only_for_training(capsys):
    assert main(["fig7", "--timesteps", "100"]) == 2
    assert "--timesteps applies to train-scaler, not 'fig7'" in capsys.readouterr().err
    assert main(["fig7", "--seeds", "2"]) == 2
    assert "--seeds applies to train-scaler, not 'fig7'" in capsys.readouterr().err


def test_jobs_and_ray_are_one_or_the_other(capsys):
    assert main(["fig7", "--jobs", "2", "--ray", "auto"]) == 2
    err = capsys.readouterr().err
    assert "--jobs 2 and --ray auto" in err or "--ray needs Ray" in err


def test_real_backend_flags_are_checked(capsys):
    assert main(["fig7", "--backend", "real", "--gpus", "0-7"]) == 2
    assert "--backend real applies to table1, not 'fig7'" in capsys.readouterr().err
    assert main(["table1", "--gpus", "0-7"]) == 2
    assert "apply to --backend real" in capsys.readouterr().err


def test_real_backend_servers_take_the_simulated_clusters_engine_knobs():
    """`table1 --backend real --gpus 0-7 --tp 2`: four 2-GPU servers of the simulated model (its config.json,
    dummy weights) with the simulator's block size, batch limits and prefix caching."""
    import json
    from pathlib import Path

    from experiments.backend import device_ids, real_config
    from sim.cluster import ClusterConfig

    base = ClusterConfig()
    cfg = real_config(gpus="0-7", tp=2)
    assert cfg.placements == ("0,1", "2,3", "4,5", "6,7") and cfg.capacity == 4 and cfg.load_format == "dummy"
    assert cfg.engine == replace(base.engine, max_model_len=cfg.engine.max_model_len)
    assert json.loads((Path(cfg.model) / "config.json").read_text())["model_type"] == "llama"
    assert real_config(cores="0,1").engine.block_size == 32  # vLLM's CPU attention needs multiples of 32
    assert device_ids("0-2,5", "--gpus") == (0, 1, 2, 5)
    for bad in ("0-x", "1,1", ""):
        with pytest.raises(SystemExit, match="--gpus"):
            device_ids(bad, "--gpus")
    with pytest.raises(SystemExit, match="exactly one of --gpus"):
        real_config(gpus="0-3", cores="0")
    with pytest.raises(SystemExit, match="3 gpus do not split into servers of tensor_parallel_size=2"):
        real_config(gpus="0-2", tp=2)
