"""Agent call shapes fitted from sessions: a known workflow is recovered, the shipped agent workflows are the fit
of the Claude Code v8 sessions and look like them, and a trace without the fields a fit needs is named."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import yaml

from traces.arrivals import poisson
from traces.characterize import prefix_hit_bound
from traces.fit import HEADER, fit_shapes, fit_workflows, to_yaml_dict
from traces.loaders import TRACES, load_trace, read_sessions
from traces.schema import WorkloadError
from traces.workflow import WORKFLOWS, generate, load_workflow, parse_workflow, sample_jobs

B = {"min": 1, "max": 100_000}  # token sizes must be bounded (a workflow's every sample lies in its field's range)
KNOWN = {"name": "known", "hash_block_size": 16, "agents": {
    "main": {"system_prompt_tokens": 2000, "initial_input_tokens": {"dist": "lognormal", "mean": 800, "cv": 0.5, **B},
             "input_tokens": {"dist": "lognormal", "mean": 300, "cv": 1.0, **B},
             "output_tokens": {"dist": "lognormal", "mean": 60, "cv": 1.0, **B},
             "tool_time_s": {"dist": "exponential", "mean": 5.0}, "continues": "main"},
    "sub": {"system_prompt_tokens": 1000, "input_tokens": {"dist": "lognormal", "mean": 900, "cv": 0.5, **B},
            "output_tokens": 40, "tool_time_s": 2.0, "depends_on": ["main"], "probability": 0.05,
            "fan_out": {"dist": "uniform", "low": 0.5, "high": 3.5, "min": 1},
            "calls": {"dist": "uniform", "low": 2.5, "high": 8.5}}},
    "loops": [{"first": "main", "last": "sub", "iterations": {"dist": "uniform", "low": 10, "high": 40},
               "max_iterations": 40}]}


def test_fit_recovers_a_known_workflow():
    sessions = sample_jobs(parse_workflow(KNOWN), 300, seed=0, context_limit_tokens=None)
    shapes = fit_shapes(sessions)
    main, sub = shapes["main"], shapes["subagent"]
    assert set(main.system) == {2000} and set(sub.system) == {1000}
    assert np.mean(main.initial) == pytest.approx(800, rel=0.06)
    assert np.mean(main.growth) == pytest.approx(300, rel=0.05)  # what a turn appends beyond prompt + reply
    assert np.mean(sub.growth) == pytest.approx(900, rel=0.05)
    assert np.mean(main.output) == pytest.approx(60, rel=0.05) and set(sub.output) == {40}
    assert np.mean(main.tool_s) == pytest.approx(5.0, rel=0.05) and set(sub.tool_s) == {2.0}
    assert not main.user_s  # generated jobs have no human turns
    assert np.mean(main.turns) == pytest.approx(25, rel=0.05) and min(main.turns) >= 10
    assert np.mean(sub.turns) == pytest.approx(5.5, rel=0.06)
    assert sub.spawned_by == "main"
    assert len(sub.batches) / sub.spawning_calls == pytest.approx(0.05, rel=0.15)
    assert np.mean(sub.batches) == pytest.approx(2.0, rel=0.1)
    by_agent = fit_shapes(sessions, by_agent=True)
    assert set(by_agent) == {"main", "sub"} and by_agent["sub"].turns == sub.turns


@pytest.fixture(scope="module")
def v8():
    sessions, _ = read_sessions("claude-code-v8")
    return sessions


def test_shipped_agent_workflows_are_the_fit_of_the_v8_sessions(v8):
    for name, wf in fit_workflows(v8, "claude-code-v8").items():
        text = WORKFLOWS[name].read_text()
        assert text.startswith(HEADER)
        assert to_yaml_dict(wf) == yaml.safe_load(text), f"{name}.yaml is not the fit: run python -m traces.fit"


def _growth(df):
    """Per main turn: prompt minus the previous prompt and its output (compactions left out)."""
    main = df[df["agent"] == "main"]
    return np.array([b - a - o for (_, g) in main.groupby("job_id")
                     for a, b, o in zip(g["input_tokens"].iloc[:-1], g["input_tokens"].iloc[1:],
                                        g["output_tokens"].iloc[:-1], strict=True) if b >= 0.7 * a])


def test_fitted_claude_code_reproduces_the_trace():
    """Jobs of the fitted workflow against the sessions they were fitted to, both in Llama-3.1-8B's window."""
    trace = load_trace("claude-code-v8")
    df = generate("claude-code", poisson(0.01), num_jobs=300, seed=0)
    ratio = lambda d: d["input_tokens"].sum() / d["output_tokens"].sum()  # noqa: E731
    assert ratio(df) == pytest.approx(ratio(trace), rel=0.25)  # 130 vs 161
    assert df["input_tokens"].median() == pytest.approx(trace["input_tokens"].median(), rel=0.15)
    assert df["output_tokens"].median() == pytest.approx(trace["output_tokens"].median(), rel=0.1)
    quartiles = lambda d: np.percentile(_growth(d), [25, 50, 75, 90])  # noqa: E731
    assert quartiles(df) == pytest.approx(quartiles(trace), rel=0.1)
    # the top 1 % of tool results (10-600 K tokens) are thinner: they often force a compaction first
    assert np.mean(_growth(df)) == pytest.approx(np.mean(_growth(trace)), rel=0.25)  # 995 vs 1259
    calls = lambda d: d.groupby("job_id").size().median()  # noqa: E731
    assert calls(df) == pytest.approx(calls(trace), rel=0.3)
    assert prefix_hit_bound(df, within_session=True) == pytest.approx(prefix_hit_bound(trace, True), abs=0.03)


@pytest.mark.parametrize("name", ["coding-assistant", "software-team"])
def test_agent_workflows_look_like_coding_agent_steps(name):
    df = generate(name, poisson(0.1), num_jobs=100, seed=2)
    assert df["input_tokens"].sum() / df["output_tokens"].sum() >= 100  # prefill-heavy, as agent traffic is
    assert df["output_tokens"].median() < 50  # short outputs (tool calls)
    assert prefix_hit_bound(df) > 0.9  # a long, growing, shared context
    grows = []
    conversation = "main" if name == "coding-assistant" else "coder"
    for _, g in df[df["agent"] == conversation].groupby("job_id"):
        steps = np.diff(g["input_tokens"].to_numpy())
        grows.append((steps > 0).mean())
    assert np.mean(grows) > 0.9  # contexts grow from turn to turn (compaction aside)
    wf = load_workflow(name)
    assert all(spec.tool_time_s.expected() < 60 for spec in wf.agents.values())  # tool time, not human time


def _tar(root, name, doc):
    path = root / TRACES[name].path
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(doc).encode()
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo("traces/trace_0001.json")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))


def _calls(kinds):
    return [{"t": 2.0 * k, "type": "n", "in": 200 + 100 * k, "out": 10, "hash_ids": list(range(1, 4 + k)),
             "think_time": 1.0, **({"input_types": kinds} if kinds is not None else {})} for k in range(3)]


def test_a_trace_without_the_fields_a_fit_needs_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHIA_TRACES_DIR", str(tmp_path))
    doc = {"id": "trace_0001", "block_size": 64, "tool_tokens": 100, "system_tokens": 20,
           "requests": _calls(["tool_result"])}
    _tar(tmp_path, "claude-code-v8", doc)
    shapes = fit_shapes(read_sessions("claude-code-v8")[0])
    assert shapes["main"].system == [120] and shapes["main"].growth == [90, 90]
    _tar(tmp_path, "claude-code-v8", {k: v for k, v in doc.items() if k not in ("tool_tokens", "system_tokens")})
    with pytest.raises(WorkloadError, match=r"trace_0001.json: field 'tool_tokens' and 'system_tokens' is missing"):
        fit_shapes(read_sessions("claude-code-v8")[0])
    _tar(tmp_path, "claude-code-v8", dict(doc, requests=_calls(None)))
    with pytest.raises(WorkloadError, match=r"trace_0001.json: field 'input_types' is missing"):
        fit_shapes(read_sessions("claude-code-v8")[0])
    _tar(tmp_path, "claude-code-v8", doc)
    with pytest.raises(WorkloadError, match="no subagent conversations"):
        fit_workflows(read_sessions("claude-code-v8")[0], "claude-code-v8")


def test_a_request_trace_cannot_be_fitted():
    with pytest.raises(WorkloadError, match=r"AzureLLMInferenceTrace_code.csv.gz: trace 'azure-code' is a request "
                                            r"trace \(one row per call, no session"):
        read_sessions("azure-code")
