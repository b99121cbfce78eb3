"""Loaders of the shared traces: every trace loads into a validated table; knobs; bad files are refused."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from traces.arrivals import Replay, parse_arrivals, poisson
from traces.loaders import TRACES, load_trace, read_sessions, resolve_arrivals
from traces.schema import WorkloadError, validate
from traces.sessions import Session, sessions_to_table
from traces.shared import shared_dir

SHARED = shared_dir() / "traces"
MANIFEST = SHARED / "claude_code_weka" / "manifest_{}.csv"

# rows stated in ../shared/traces/README.md (request traces; TraceLab rounds)
README_ROWS = {"mooncake-conversation": 12031, "mooncake-synthetic": 3993, "azure-code": 8819,
               "azure-conv": 19366, "tracelab": 19}


@pytest.mark.parametrize("name", list(TRACES))
def test_every_trace_loads_validated(name):
    df = load_trace(name, max_sessions=25 if name.startswith("claude") else None)
    validate(df, name)
    assert len(df) == README_ROWS.get(name, len(df)) and len(df) > 0
    assert (df["arrival_s"].to_numpy() >= 0).all()
    if TRACES[name].sessions:
        assert df["session_id"].nunique() == df["job_id"].nunique()
        roots = df[df["parents"].map(len) == 0]
        assert roots["arrival_s"].is_monotonic_increasing


def test_request_trace_fields_match_the_files():
    moon = load_trace("mooncake-conversation")
    assert moon["hash_block_size"].eq(512).all()
    assert (moon["block_hashes"].map(len) == -(-moon["input_tokens"] // 512)).all()
    assert moon["block_hashes"].map(lambda h: h[0]).eq(0).all()  # README: every request starts with block 0
    assert moon["arrival_s"].iloc[-1] == pytest.approx(3536.999)
    azure = load_trace("azure-code")
    assert azure["block_hashes"].map(len).eq(0).all()  # no prefix information
    assert azure["input_tokens"].max() == 7437 and azure["output_tokens"].max() == 1899
    assert azure["arrival_s"].iloc[-1] == pytest.approx(3435.95, abs=0.01)


@pytest.mark.parametrize("version,scope", [("v8", "local"), ("v6", "global")])
def test_claude_code_keeps_every_call(version, scope):
    """v8: one row per call; v6: one row per call minus the merged stream/non-stream copies."""
    n = 40
    sessions, attrs = read_sessions(f"claude-code-{version}", max_sessions=n)
    manifest = pd.read_csv(str(MANIFEST).format(f"{version}_{scope}"))
    expected = int(manifest[manifest["included"] == "yes"]["requests_total"].iloc[:n].sum())
    assert sum(len(s) for s in sessions) == expected - attrs["merged_duplicates"]
    assert (attrs["merged_duplicates"] == 0) == (version == "v8")


def test_claude_code_v8_all_sessions_counted():
    sessions, attrs = read_sessions("claude-code-v8")
    assert len(sessions) == 710 and sum(len(s) for s in sessions) == 49334  # README section 3
    assert sum(a != "main" and not ps for s in sessions for a, ps in zip(s.agent, s.parents, strict=True)) == 0


def test_claude_code_v6_duplicates_merged():
    df = load_trace("claude-code-v6", max_sessions=40)
    assert df.attrs["merged_duplicates"] > 1000
    pos = {r: k for k, r in enumerate(df["request_id"])}
    for k, ps in enumerate(df["parents"]):
        if len(ps) == 1 and df["agent"].iat[pos[ps[0]]] == df["agent"].iat[k]:
            p = pos[ps[0]]
            assert not (df["input_tokens"].iat[p] == df["input_tokens"].iat[k]
                        and df["block_hashes"].iat[p] == df["block_hashes"].iat[k])


def test_claude_code_structure():
    df = load_trace("claude-code-v8", max_sessions=12, session_rate=0.01, seed=3)
    assert (df["hash_block_size"] == 64).all()
    assert (df["parents"].map(len) == 0).sum() == 12  # one root per session
    ids = [set(h) for h in df.groupby("job_id")["block_hashes"].sum()]
    assert all(not (a & b) for i, a in enumerate(ids) for b in ids[i + 1:])  # local ids made disjoint
    pos = {r: k for k, r in enumerate(df["request_id"])}
    sub = df[df["agent"] != "main"]
    assert len(sub) > 0  # sessions 3, 4 and 10 have sub-agents
    firsts = [k for k in sub.index if all(df["agent"].iat[pos[p]] == "main" for p in df["parents"].iat[k])]
    assert firsts and all(len(df["parents"].iat[k]) == 1 for k in firsts)  # spawned by one main call
    waits = [k for k in df.index if df["agent"].iat[k] == "main" and len(df["parents"].iat[k]) > 1]
    assert waits  # the main turn after a sub-agent completed waits for it
    assert df["think_s"].ge(0).all() and df["think_s"].median() < 60


def test_session_placement_and_knobs():
    base = load_trace("claude-code-v8", max_sessions=30, session_rate=0.05, seed=1)
    again = load_trace("claude-code-v8", max_sessions=30, session_rate=0.05, seed=1)
    pd.testing.assert_frame_equal(base, again)
    other = load_trace("claude-code-v8", max_sessions=30, session_rate=0.05, seed=2)
    starts = lambda d: np.sort(d[d["parents"].map(len) == 0]["arrival_s"].to_numpy())  # noqa: E731
    assert not np.array_equal(starts(base), starts(other))
    assert np.mean(np.diff(starts(base))) == pytest.approx(20, rel=0.5)  # Poisson at 0.05 sessions/s

    capped = load_trace("claude-code-v8", max_sessions=30, session_rate=0.05, seed=1, context_limit_tokens=65536,
                        max_think_s=30)
    assert (capped["input_tokens"] + capped["output_tokens"]).max() <= 65536 and capped["think_s"].max() <= 30
    assert capped.attrs["over_limit_calls"] == 0
    assert [h[:5] for h in capped["block_hashes"]] == [h[:5] for h in base["block_hashes"]]  # the system prompt

    faster = load_trace("claude-code-v8", max_sessions=30, session_rate=0.05, seed=1, rate_scale=2.0)
    assert starts(faster) == pytest.approx(starts(base) / 2)
    half = load_trace("claude-code-v8", max_sessions=30, sample_frac=0.5, seed=1)
    assert 5 <= half["job_id"].nunique() <= 25
    replayed = load_trace("claude-code-v8", max_sessions=30, arrivals="replay:azure-code")
    azure = load_trace("azure-code")["arrival_s"].to_numpy()
    assert starts(replayed) == pytest.approx(azure[:30])


def test_request_trace_knobs():
    full = load_trace("azure-conv")
    win = load_trace("azure-conv", window_s=(600, 1200))
    t = full["arrival_s"].to_numpy()
    assert len(win) == ((t >= 600) & (t < 1200)).sum()
    assert win["arrival_s"].min() >= 0 and win["arrival_s"].max() < 600
    fast = load_trace("azure-conv", window_s=(600, 1200), rate_scale=3.0)
    assert fast["arrival_s"].to_numpy() == pytest.approx(win["arrival_s"].to_numpy() / 3)
    a = load_trace("mooncake-synthetic", sample_frac=0.25, seed=7)
    b = load_trace("mooncake-synthetic", sample_frac=0.25, seed=7)
    pd.testing.assert_frame_equal(a, b)
    assert 0.2 * 3993 < len(a) < 0.3 * 3993
    capped = load_trace("mooncake-conversation", context_limit_tokens=8192)
    raw = load_trace("mooncake-conversation", context_limit_tokens=None)
    long = (raw["input_tokens"] + raw["output_tokens"] > 8192).to_numpy()
    assert (capped["input_tokens"] + capped["output_tokens"])[~long].equals((raw["input_tokens"] +
                                                                             raw["output_tokens"])[~long])
    assert capped["input_tokens"][long].max() <= 8192 and capped.attrs["over_limit_calls"] == 0
    validate(capped)


@pytest.mark.parametrize("knobs,match", [
    ({"window_s": (10, 5)}, "window_s"), ({"rate_scale": 0}, "rate_scale"), ({"sample_frac": 1.5}, "sample_frac"),
    ({"context_limit_tokens": 0}, "context_limit_tokens"), ({"session_rate": 1.0}, "agent-session traces only"),
])
def test_bad_knobs(knobs, match):
    with pytest.raises(WorkloadError, match=match):
        load_trace("azure-code", **knobs)


def test_unknown_and_missing_traces(tmp_path, monkeypatch):
    with pytest.raises(WorkloadError, match="known traces: mooncake-conversation"):
        load_trace("mooncake")
    monkeypatch.setenv("PYTHIA_TRACES_DIR", str(tmp_path))
    with pytest.raises(WorkloadError, match="PYTHIA_TRACES_DIR") as e:
        load_trace("azure-code")
    assert str(tmp_path) in str(e.value)
    with pytest.raises(WorkloadError, match="agent-session traces have no common clock"):
        resolve_arrivals(Replay("tracelab"))
    with pytest.raises(WorkloadError, match="resolve the process with traces.loaders.resolve_arrivals"):
        Replay("azure-code").times(np.random.default_rng(0), n=3)


def _put(root: Path, name: str, text: str) -> None:
    path = root / TRACES[name].path
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        f.write(text)


def test_malformed_request_traces_name_file_line_field(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHIA_TRACES_DIR", str(tmp_path))
    good = '{"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [0, 1]}\n'
    _put(tmp_path, "mooncake-conversation", good + good + '{"timestamp": 5, "output_length": 5, "hash_ids": []}\n')
    with pytest.raises(WorkloadError, match=r"conversation_trace.jsonl.gz:3: field 'input_length' is missing"):
        load_trace("mooncake-conversation")
    _put(tmp_path, "mooncake-conversation", good + '{"timestamp": 5, "input_length": 600, "output_length": 5,')
    with pytest.raises(WorkloadError, match=r":2: not valid JSON"):
        load_trace("mooncake-conversation")
    _put(tmp_path, "mooncake-conversation", good.replace("[0, 1]", "[0, 1, 2]"))
    with pytest.raises(WorkloadError, match=r":1: field 'hash_ids' has 3 blocks"):
        load_trace("mooncake-conversation")
    _put(tmp_path, "mooncake-conversation", good.replace('"output_length": 5', '"output_length": -5'))
    with pytest.raises(WorkloadError, match=r":1: field 'output_length'=-5 must be >= 0"):
        load_trace("mooncake-conversation")

    header = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
    _put(tmp_path, "azure-code", header + "2023-11-16 18:17:03.9799600,4808,10\n2023-11-16 18:17:04.03,x,8")
    with pytest.raises(WorkloadError, match=r"AzureLLMInferenceTrace_code.csv.gz:3: field 'ContextTokens'='x'"):
        load_trace("azure-code")
    _put(tmp_path, "azure-code", header + "yesterday,4808,10")
    with pytest.raises(WorkloadError, match=r":2: field 'TIMESTAMP'"):
        load_trace("azure-code")
    _put(tmp_path, "azure-code", "time,in,out\n")
    with pytest.raises(WorkloadError, match=r":1: header"):
        load_trace("azure-code")


def _session_tar(root: Path, name: str, sessions: dict[str, dict]) -> None:
    path = root / TRACES[name].path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for member, doc in sessions.items():
            data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _call(t, n_in, ids, **extra):
    return {"t": t, "type": "n", "in": n_in, "out": 10, "hash_ids": ids, "api_time": 1.0, "think_time": 0.5, **extra}


def test_malformed_claude_code_names_member_and_field(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHIA_TRACES_DIR", str(tmp_path))
    ok = {"id": "trace_0001", "block_size": 64, "hash_id_scope": "local", "tool_tokens": 100, "system_tokens": 10,
          "requests": [_call(0.0, 200, [1, 2, 3]), _call(2.0, 300, [1, 2, 3, 4])]}
    _session_tar(tmp_path, "claude-code-v8", {"traces/trace_0001.json": ok})
    df = load_trace("claude-code-v8")
    assert df["parents"].tolist() == [[], [0]] and df["think_s"].tolist() == [0.0, 0.5]

    bad_in = dict(ok, requests=[_call(0.0, 200, [1, 2, 3]), {k: v for k, v in _call(2.0, 300, [1]).items()
                                                                 if k != "in"}])
    _session_tar(tmp_path, "claude-code-v8", {"traces/trace_0001.json": ok, "traces/trace_0002.json": bad_in})
    with pytest.raises(WorkloadError, match=r"trace_0002.json: requests\[1\]: field 'in' is missing"):
        load_trace("claude-code-v8")
    bad_ids = json.dumps(ok).replace("[1, 2, 3, 4]", '[1, 2, "x"]').encode()
    _session_tar(tmp_path, "claude-code-v8", {"traces/trace_0001.json": bad_ids})
    with pytest.raises(WorkloadError, match=r"trace_0001.json:1: field 'hash_ids' holds"):
        load_trace("claude-code-v8")
    too_many = dict(ok, requests=[_call(0.0, 64, [1, 2, 3])])
    _session_tar(tmp_path, "claude-code-v8", {"traces/trace_0001.json": too_many})
    with pytest.raises(WorkloadError, match=r"requests\[0\]: field 'hash_ids' has 3 blocks of 64"):
        load_trace("claude-code-v8")
    _session_tar(tmp_path, "claude-code-v8", {"traces/trace_0001.json": b'{"id": "trace_0001", "requests": [}'})
    with pytest.raises(WorkloadError, match=r"trace_0001.json: not valid JSON"):
        load_trace("claude-code-v8")


def test_claude_code_subagent_and_duplicate_rules(tmp_path, monkeypatch):
    """Sub-agent t is its completion time (start = t - duration); v6 s/n copies merge into one call."""
    monkeypatch.setenv("PYTHIA_TRACES_DIR", str(tmp_path))
    sub = {"t": 40.0, "type": "subagent", "agent_id": "agent_001", "subagent_type": "Explore", "duration_ms": 30000,
           "requests": [_call(0.0, 100, [50]), _call(20.0, 150, [50, 51])]}
    doc = {"id": "trace_0001", "block_size": 64, "hash_id_scope": "global",
           "requests": [_call(0.0, 200, [1, 2, 3]), _call(5.0, 300, [1, 2, 3, 4]), _call(7.0, 300, [1, 2, 3, 4]),
                        sub, _call(44.0, 400, [1, 2, 3, 4, 5, 6])]}
    _session_tar(tmp_path, "claude-code-v6", {"traces/trace_0001.json": doc})
    df = load_trace("claude-code-v6", session_rate=1.0)
    assert df.attrs["merged_duplicates"] == 1
    assert df["agent"].tolist() == ["main", "main", "Explore", "Explore", "main"]
    # the sub-agent starts at 40 - 30 = 10 s, after the merged call (5 s .. 7 + 1 s); the last main call
    # waits for both the previous main call and the sub-agent's last call
    assert df["parents"].tolist() == [[], [0], [1], [2], [1, 3]]
    t0 = df["arrival_s"].iat[0]
    assert (df["arrival_s"] - t0).tolist() == pytest.approx([0.0, 5.0, 10.0, 30.0, 44.0])
    assert df["think_s"].tolist() == pytest.approx([0.0, 0.5, 2.0, 0.5, 13.0])  # 44 - (30 + 1)
    assert df["output_tokens"].tolist() == [10, 10, 10, 10, 10]


def test_sessions_merge_in_release_order():
    """A parent listed after its child, at the same time: the parent still comes first."""
    s = Session("s", t=np.array([5.0, 5.0, 0.0]), input_tokens=np.array([10, 10, 10]),
                output_tokens=np.array([1, 1, 1]), think_s=np.zeros(3), parents=[[2], [0], []],
                agent=["a", "b", "a"], hashes=[np.array([1]), np.array([1, 2]), np.array([])], hash_block_size=8)
    df = sessions_to_table([s, s], np.array([3.0, 1.0]), "test")
    assert df["job_id"].tolist() == [0, 1, 0, 0, 1, 1]  # job ids follow start order
    assert df["arrival_s"].tolist() == [1.0, 3.0, 6.0, 6.0, 8.0, 8.0]
    assert df["parents"].tolist() == [[], [], [0], [2], [1], [4]]
    assert df["agent"].tolist() == ["a", "a", "a", "b", "a", "b"]
    loop = Session("s", t=np.zeros(2), input_tokens=np.ones(2, int), output_tokens=np.ones(2, int),
                   think_s=np.zeros(2), parents=[[1], [0]], agent=["a", "a"], hashes=[], hash_block_size=8)
    with pytest.raises(WorkloadError, match="cycle"):
        sessions_to_table([loop], np.zeros(1), "test")


def test_arrival_processes():
    rng = np.random.default_rng(0)
    t = poisson(2.0).times(rng, duration_s=1000)
    assert len(t) == pytest.approx(2000, rel=0.1) and t.max() < 1000
    gaps = np.diff(t)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.1)
    burst = parse_arrivals("onoff:10,0.2,20,80").times(np.random.default_rng(0), n=3000)
    g = np.diff(burst)
    assert len(burst) == 3000 and g.std() / g.mean() > 2
    assert parse_arrivals({"kind": "replay", "trace": "azure-code", "rate_scale": 2}) == Replay("azure-code", 2.0)
    rep = resolve_arrivals("replay:azure-code").times(rng, n=20000)  # longer than the trace: repeated end to end
    assert len(rep) == 20000 and (np.diff(rep) >= 0).all()
    for bad in ("gauss:1", "poisson", "poisson:x", "onoff:1,2", {"kind": "poisson", "lambda": 1}, 3):
        with pytest.raises(WorkloadError):
            parse_arrivals(bad)
    with pytest.raises(WorkloadError, match="rate"):
        poisson(-1).times(rng, n=3)
