"""`python -m sim.run`, the what-if command: a small comparison end to end, its Parquet files, its --help and its
errors; and every command line's --help shows its defaults."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from policies.registry import ROUTERS, SCALERS
from policies.systems import SYSTEMS
from sim.costmodel import main as costmodel_main
from sim.hardware import GPUS
from sim.models import MODELS
from sim.run import TABLES, main
from traces.loaders import TRACES
from traces.workflow import WORKFLOWS

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--workload", "coding-assistant-chat", "--rate", "0.2", "--duration", "20", "--gpus", "2",
         "--max-num-seqs", "64"]
COUNTS = ("num_requests", "num_failed", "max_queue_len", "preemptions")


def test_help_lists_what_can_be_named_and_every_default(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    for names in (GPUS, MODELS, ROUTERS, SCALERS, SYSTEMS, WORKFLOWS, TRACES):
        assert all(name in text for name in names)
    for default in ("--workload WORKLOAD workflow name, workflow.yaml path or trace name (default: coding-assistant)",
                    "(default: a100-40gb)", "(default: llama-3.1-8b)", "GPUs in the cluster (default: 8)",
                    "(default: 256)", "(default: 8192)", "tokens per KV block (default: 16)", "(default: 0.9)",
                    "(default: the model's context window)", "(default 300)", "(default: pythia when no --router)"):
        assert default in text, default


def test_a_comparison_runs_end_to_end_and_writes_its_tables_as_parquet(tmp_path, capsys) -> None:
    out = tmp_path / "whatif"
    assert main([*SMALL, "--system", "pythia", "--router", "round_robin", "--scaler", "hpa", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("run "))
    assert header.split() == ["run", "pythia", "round_robin"]  # side by side, in the order given
    summary = pd.read_parquet(out / "summary.parquet").set_index("run")
    assert list(summary.index) == ["pythia", "round_robin"]
    assert all(pd.api.types.is_integer_dtype(summary[c]) for c in COUNTS)  # counts as integers, not 1025.0
    for run in summary.index:
        tables = {t: pd.read_parquet(out / f"{run}.{t}.parquet") for t in TABLES}
        assert len(tables["requests"]) == summary.loc[run, "num_requests"] > 0
        assert (tables["requests"]["status"] == "ok").sum() == len(tables["requests"]) - summary.loc[run, "num_failed"]
        assert tables["jobs"]["num_calls"].sum() == len(tables["requests"])
        assert len(tables["timeseries"]) > 0 and set(tables["cluster"]["pool"]) == {"default"}
        assert f"\n{'num_requests':<20}" in printed or "num_requests" in printed
    meta = json.loads((out / "meta.json").read_text())
    assert meta["seed"] == 0 and "--router round_robin" in meta["command"]
    assert meta["scenarios"]["round_robin"]["scaler"] == "hpa" and meta["scenarios"]["pythia"]["system"] == "pythia"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["meta.json", "summary.parquet", *(f"{r}.{t}.parquet" for r in summary.index for t in TABLES)])  # no leftovers
    # the same command again: the same tables, bit for bit
    first = pd.read_parquet(out / "pythia.requests.parquet")
    assert main([*SMALL, "--system", "pythia", "--out", str(out)]) == 0
    pd.testing.assert_frame_equal(first, pd.read_parquet(out / "pythia.requests.parquet"), check_exact=True)


@pytest.mark.parametrize("flags, message", [
    (["--gpus", "0"], "error: --gpus=0 must be in [1, 65536] (an integer)"),
    (["--max-model-len", "1000000"], "error: pool 'default': max_model_len=1000000 tokens do not fit its KV cache"),
    (["--max-model-len", "1000000"], "); set --max-model-len <= "),
    (["--block-size", "0"], "error: --block-size=0 must be in [1, 2147483647]"),
    (["--slo", "-5"], "error: --slo=-5.0 must be > 0 (a finite number)"),
    (["--system", "nope"], "error: --system='nope' must be one of vllm, vllm-hpa, production-stack, sglang, autellix"),
    (["--replicas", "3"], "error: --replicas=3: 3 replicas of tp=1 need 3 GPUs but the cluster has gpus=2"),
    (["--workload", "azure-code"], "error: --duration applies to workflows; the trace 'azure-code' has its own length"),
    (["--scaler", "hpa"], "error: --scaler goes with --router"),
    (["--system", "sglang", "--system", "sglang"], "error: ['sglang'] named twice"),
    (["--model", "llama-3.1-70b"], "error: model 'llama-3.1-70b' does not fit on tp=1 x a100-40gb"),
])
def test_an_impossible_what_if_names_the_flag_to_change(flags, message, capsys) -> None:
    assert main([*SMALL, *flags]) == 2
    assert message in capsys.readouterr().err


def test_an_unwritable_out_is_refused_before_any_simulation(tmp_path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main([*SMALL, "--out", str(blocker / "sub")]) == 2
    captured = capsys.readouterr()
    assert f"error: --out {blocker / 'sub'}: cannot write there" in captured.err and "run " not in captured.out


def test_costmodel_without_work_says_so_instead_of_zero_ms(capsys) -> None:
    assert costmodel_main([]) == 0
    out = capsys.readouterr().out
    assert "no step time, the step has no work; give --prefill N" in out and " 0.000 ms" not in out
    assert "KV capacity: " in out


# Every command line; the speed benchmarks sim_speed, env_speed and engine_speed belong to the speed work.
MODULES = ["sim.run", "sim.costmodel", "sim.calibration", "sim.characterize", "traces.characterize", "traces.fit",
           "experiments.run", "experiments.calibrate_cpu"]
SCRIPTS = ["benchmarks/costmodel_error.py", "benchmarks/policy_overhead.py"]


@pytest.mark.parametrize("command", [["-m", m] for m in MODULES] + [[s] for s in SCRIPTS])
def test_every_command_line_help_shows_its_defaults(command) -> None:
    r = subprocess.run([sys.executable, *command, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    blocks: list[str] = []  # one per option: its line and the help lines under it
    for line in r.stdout.split("\n\n", 1)[1].splitlines():
        if re.match(r"^  -", line):
            blocks.append(line)
        elif blocks and line.startswith("    "):
            blocks[-1] += line
    options = [b for b in blocks if "--help" not in b]
    assert options and all("default" in b for b in options), [b for b in options if "default" not in b]


def test_the_documented_workflow_example_loads_and_runs(tmp_path, capsys) -> None:
    """docs/workflow-yaml.md's example (the format's reference) is a valid workflow."""
    text = (ROOT / "docs" / "workflow-yaml.md").read_text()
    yaml_text = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    path = tmp_path / "my-agents.yaml"
    path.write_text(yaml_text)
    assert main(["--workload", str(path), "--rate", "0.5", "--duration", "20", "--gpus", "2", "--router",
                 "cache_aware", "--router", "round_robin", "--scaler", "hpa"]) == 0
    assert "run " in capsys.readouterr().out
