"""workflow.yaml schema, the generator's prefix and dependency structure, hints, and rescaling."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from traces.arrivals import onoff, poisson
from traces.characterize import burstiness, prefix_hit_bound
from traces.loaders import load_trace
from traces.schema import WorkloadError, validate
from traces.workflow import (
    WORKFLOWS,
    generate,
    load_workflow,
    make_workload,
    parse_workflow,
    scale_to_means,
    scale_workflow,
)


@pytest.mark.parametrize("name", ["coding-assistant", "software-team", "claude-code", "coding-assistant-chat",
                                  "software-team-chat"])
def test_shipped_workflows_generate_valid_deterministic_tables(name):
    assert name in WORKFLOWS
    wf = load_workflow(name)
    df = generate(wf, poisson(0.5), num_jobs=12, seed=4)
    validate(df, name)
    assert df["job_id"].nunique() == 12 and set(df["agent"]) <= set(wf.agents)
    assert (df["workflow"] == name).all() and (df["hash_block_size"] == wf.hash_block_size).all()
    pd.testing.assert_frame_equal(df, generate(wf, poisson(0.5), num_jobs=12, seed=4))
    other = generate(wf, poisson(0.5), num_jobs=12, seed=5)
    assert not df["input_tokens"].equals(other["input_tokens"])


def _rows(df: pd.DataFrame, job: int, agent: str) -> pd.DataFrame:
    return df[(df["job_id"] == job) & (df["agent"] == agent)]


def test_chat_coding_assistant_dag_loop_and_hints():
    wf = load_workflow("coding-assistant-chat")
    df = make_workload("coding-assistant-chat", rate=1.0, num_jobs=40, seed=0)
    pos = {r: k for k, r in enumerate(df["request_id"])}
    agent_of = lambda r: df["agent"].iat[pos[r]]  # noqa: E731
    iterations = []
    for job in range(40):
        coder = _rows(df, job, "coder")
        iterations.append(len(coder))
        assert 1 <= len(coder) <= 4 and len(_rows(df, job, "reviewer")) == len(coder)
        assert len(_rows(df, job, "planner")) == 1
        for k, (_, row) in enumerate(coder.iterrows()):
            assert sorted(map(agent_of, row["parents"])) == (["planner"] if k == 0 else ["reviewer"])
        for _, row in _rows(df, job, "reviewer").iterrows():
            assert sorted(map(agent_of, row["parents"])) == ["linter", "tester"]
    assert np.mean(iterations) == pytest.approx(1.6, abs=0.35)
    hints = df.groupby("agent")["next_agents"].first().to_dict()
    assert hints == {"planner": "coder", "coder": "linter,tester", "linter": "reviewer", "tester": "reviewer",
                     "reviewer": "coder"}
    expected = df.groupby("agent")["expected_output_tokens"].first().to_dict()
    assert expected == {a: round(wf.agents[a].output_tokens.expected()) for a in wf.agents}
    assert df["slo_s"].eq(60).all()


def test_prefix_blocks_follow_the_workflow():
    df = make_workload("coding-assistant-chat", rate=1.0, num_jobs=30, seed=1)
    wf = load_workflow("coding-assistant-chat")
    size = wf.hash_block_size
    # every fresh call of an agent starts with the agent's system prompt blocks, in every job
    for agent in ("planner", "linter", "tester", "reviewer"):
        n = wf.agents[agent].system_prompt_tokens // size
        heads = {tuple(h[:n]) for h in df[df["agent"] == agent]["block_hashes"]}
        assert len(heads) == 1
    # a continuing call (the coder's fix iteration) has the previous prompt and output as its prefix
    pos = {r: k for k, r in enumerate(df["request_id"])}
    checked = 0
    for job in range(30):
        coder = _rows(df, job, "coder")
        for (_, a), (_, b) in zip(coder.iloc[:-1].iterrows(), coder.iloc[1:].iterrows(), strict=True):
            full = a["input_tokens"] // size
            assert b["block_hashes"][:full] == a["block_hashes"][:full]
            assert b["input_tokens"] > a["input_tokens"] + a["output_tokens"]
            checked += 1
    assert checked > 5
    # different jobs share nothing beyond system prompts; the two coder calls of a job share its context
    first = {j: _rows(df, j, "coder")["block_hashes"].iat[0] for j in range(30)}
    n_sys = wf.agents["coder"].system_prompt_tokens // size
    assert len({tuple(first[j][:n_sys]) for j in first}) == 1
    assert len({first[j][n_sys + 1] for j in first}) == 30
    assert pos  # table is in release order (validated), so parents precede


def test_context_first_layout_shares_job_context_across_agents():
    data = yaml.safe_load(open(WORKFLOWS["coding-assistant-chat"]).read())
    wf_sys = parse_workflow(data)
    data["prompt_layout"] = "context-first"
    wf_ctx = parse_workflow(data)
    a = generate(wf_sys, poisson(1.0), num_jobs=20, seed=2)
    b = generate(wf_ctx, poisson(1.0), num_jobs=20, seed=2)
    assert a["input_tokens"].tolist() == b["input_tokens"].tolist()
    assert prefix_hit_bound(b) > prefix_hit_bound(a)
    # with the context first, the planner's and the reviewer's prompts of a job start alike (and differ by job)
    heads = set()
    for job in range(5):
        p, r = _rows(b, job, "planner")["block_hashes"].iat[0], _rows(b, job, "reviewer")["block_hashes"].iat[0]
        assert p[:32] == r[:32]
        heads.add(tuple(p[:32]))
    assert len(heads) == 5


def test_fan_out_skip_and_arrivals():
    df = make_workload("software-team-chat", arrivals=onoff(2.0, 0.05, 60, 240), duration_s=900, seed=3)
    engineers = df[df["agent"] == "engineer"]
    lanes = engineers.groupby("job_id").apply(lambda g: (g["parents"].map(len) > 0).sum(), include_groups=False)
    assert lanes.min() >= 2
    wf = load_workflow("software-team-chat")  # the engineers of a job share system prompt + the job's design
    n_sys = wf.agents["engineer"].system_prompt_tokens // wf.hash_block_size
    for _, g in engineers.groupby("job_id"):
        blocks = np.array([h[:n_sys + 20] for h in g["block_hashes"]])
        assert (blocks == blocks[0]).all()
    firsts = np.array([g["block_hashes"].iat[0][:n_sys + 1] for _, g in engineers.groupby("job_id")])
    assert (firsts[:, :n_sys] == firsts[0, :n_sys]).all() and len(set(firsts[:, n_sys])) == len(firsts)
    assert burstiness(df[df["parents"].map(len) == 0])["interarrival_cv"] > 1.5
    smooth = make_workload("software-team-chat", rate=0.2, duration_s=900, seed=3)
    assert burstiness(smooth[smooth["parents"].map(len) == 0])["interarrival_cv"] == pytest.approx(1, abs=0.3)
    rep = make_workload("coding-assistant-chat", arrivals="replay:azure-code", duration_s=120, seed=0)
    azure = load_trace("azure-code")["arrival_s"].to_numpy()
    roots = np.sort(rep[rep["parents"].map(len) == 0]["arrival_s"].to_numpy())
    assert roots == pytest.approx(azure[azure < 120])  # one job per Azure code request of its first 2 minutes


def test_skipped_agent_passes_dependencies_through():
    wf = parse_workflow({"name": "t", "agents": {
        "a": {"system_prompt_tokens": 32, "input_tokens": 10, "output_tokens": 5},
        "b": {"system_prompt_tokens": 32, "input_tokens": 10, "output_tokens": 5, "depends_on": ["a"],
              "probability": 0.0},
        "c": {"system_prompt_tokens": 32, "input_tokens": 10, "output_tokens": 5, "depends_on": ["b"],
              "calls": 3, "tool_time_s": 2.0}}})
    df = generate(wf, poisson(1.0), num_jobs=2, seed=0)
    assert df["agent"].tolist().count("b") == 0
    job = df[df["job_id"] == 0]
    assert job["agent"].tolist() == ["a", "c", "c", "c"]
    assert [len(p) for p in job["parents"]] == [0, 1, 1, 1]
    assert job["think_s"].tolist() == [0.0, 2.0, 2.0, 2.0]
    assert job["arrival_s"].diff().iloc[1:].tolist() == pytest.approx([2.0] * 3)  # estimate: parents take no time
    assert job["input_tokens"].tolist() == [42, 42, 57, 72]  # 32 + 10, then + 5 output + 10 input per call
    assert wf.next_agents("a") == ["b", "c"] and wf.next_agents("c") == ["c"]


def test_generate_duration_and_options():
    df = generate("coding-assistant-chat", "poisson:0.5", duration_s=120, seed=0)
    roots = df[df["parents"].map(len) == 0]["arrival_s"]
    assert roots.max() < 120 and 30 < len(roots) < 90
    with pytest.raises(WorkloadError, match="exactly one"):
        generate("coding-assistant-chat", "poisson:1", seed=0)
    with pytest.raises(WorkloadError, match="unknown option"):
        make_workload("coding-assistant-chat", window_s=(0, 1))
    with pytest.raises(WorkloadError, match="unknown option"):
        make_workload("coding-assistant-chat", max_input_tokens=2048)  # compaction replaced truncation


def test_scale_workflow_keeps_the_structure():
    wf = load_workflow("coding-assistant")
    half = scale_workflow(wf, input_scale=0.5, output_scale=0.25, tool_time_scale=2.0)
    for a, spec in wf.agents.items():
        s = half.agents[a]
        assert s.system_prompt_tokens == round(spec.system_prompt_tokens / 2)
        assert s.input_tokens.expected() == pytest.approx(spec.input_tokens.expected() / 2)
        assert s.output_tokens.expected() == pytest.approx(spec.output_tokens.expected() / 4)
        assert s.tool_time_s.expected() == pytest.approx(spec.tool_time_s.expected() * 2)
    assert half.agents["main"].compact_at_tokens == round(wf.agents["main"].compact_at_tokens / 2)
    a = make_workload(wf, num_jobs=30, seed=1)
    b = make_workload(half, num_jobs=30, seed=1)
    per_job = lambda d: d.groupby("job_id")["agent"].apply(list).tolist()  # noqa: E731
    assert per_job(a) == per_job(b)  # the same jobs: agents, calls (row order across jobs follows tool times)
    assert b["input_tokens"].mean() == pytest.approx(a["input_tokens"].mean() / 2, rel=0.1)
    with pytest.raises(WorkloadError, match="input_scale=0 must be"):
        scale_workflow(wf, input_scale=0)
    with pytest.raises(WorkloadError, match="geometric distribution"):
        scale_workflow(parse_workflow({"name": "g", "agents": {"a": {
            "system_prompt_tokens": 10, "input_tokens": {"dist": "geometric", "mean": 3}, "output_tokens": 5}}}), 2.0)


def test_scale_to_means_reaches_a_mean_prompt_and_output():
    wf = load_workflow("software-team")
    paper = scale_to_means(wf, mean_input_tokens=2000, mean_output_tokens=20, num_jobs=60, name="team-2k")
    df = make_workload(paper, num_jobs=60, seed=0)  # the sample the scales were fitted on
    assert df["input_tokens"].mean() == pytest.approx(2000, rel=0.02)
    assert df["output_tokens"].mean() == pytest.approx(20, rel=0.02)
    assert (df["workflow"] == "team-2k").all()
    other = make_workload(paper, num_jobs=200, seed=5)  # and other jobs of it: close
    assert other["input_tokens"].mean() == pytest.approx(2000, rel=0.15)
    assert scale_to_means(wf, 2000, 20, num_jobs=60, name="team-2k") == paper  # deterministic
    with pytest.raises(WorkloadError, match="no scale reaches these means"):
        scale_to_means(wf, mean_input_tokens=100, mean_output_tokens=90, num_jobs=20)  # outputs fill the prompts

def _error(data: dict, match: str) -> None:
    with pytest.raises(WorkloadError, match=match):
        parse_workflow(data, "wf.yaml")


def test_schema_errors_name_the_yaml_path(tmp_path):
    ok = yaml.safe_load(open(WORKFLOWS["coding-assistant-chat"]).read())

    def change(path: list, value) -> dict:
        data = yaml.safe_load(yaml.safe_dump(ok))
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return data

    _error(change(["agents", "reviewer", "depends_on"], ["lintr"]), r"agents.reviewer.depends_on.0: 'lintr'")
    _error(change(["agents", "coder", "output_tokens", "cv"], -1), r"agents.coder.output_tokens.cv: .*greater than 0")
    _error(change(["agents", "coder", "output_tokens", "dist"], "normal"), r"agents.coder.output_tokens")
    _error(change(["agents", "coder", "fan_out"], "two"), r"agents.coder.fan_out")
    _error(change(["agents", "coder", "sytem_prompt_tokens"], 5), r"agents.coder.sytem_prompt_tokens: Extra inputs")
    _error(change(["agents", "planner", "depends_on"], ["reviewer"]), r"cycle")
    _error(change(["loops", 0, "last"], "planner"), r"loops.0: 'planner' does not depend")
    _error(change(["loops", 0, "max_iterations"], 0), r"loops.0.max_iterations")
    _error(change(["agents", "coder", "continues"], "nobody"), r"agents.coder.continues: unknown agent")
    _error(change(["agents", "coder", "compact_at_tokens"], 1000), r"agents.coder: .*compacted_tokens")
    _error(change(["agents", "coder", "input_tokens", "min"], 5000), r"min=5000.0 is greater than max")
    two = change(["loops"], ok["loops"] + [{"first": "tester", "last": "reviewer", "iterations": 2,
                                          "max_iterations": 2}])
    _error(two, r"loops.1: agent '(tester|reviewer)' is also in loops\[0\]")

    path = tmp_path / "bad.yaml"
    path.write_text(open(WORKFLOWS["coding-assistant-chat"]).read().replace("cv: 0.6, min: 50, max: 4096}",
                                                                       "cv: -0.6, min: 50, max: 4096}"))
    with pytest.raises(WorkloadError, match=r"bad.yaml:\d+: agents.coder.output_tokens.cv"):
        load_workflow(path)
    line = int(str(pytest.raises(WorkloadError, load_workflow, path).value).split("bad.yaml:")[1].split(":")[0])
    assert "cv: -0.6" in path.read_text().splitlines()[line - 1]
    path.write_text("name: x\nagents: [unclosed\n")
    with pytest.raises(WorkloadError, match=r"bad.yaml:\d+: not valid YAML"):
        load_workflow(path)
    with pytest.raises(WorkloadError, match="no workflow 'nope'"):
        load_workflow("nope")
