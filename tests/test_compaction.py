"""Contexts longer than the model's window are compacted as agent harnesses do, never cut to their first tokens."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from traces.arrivals import poisson
from traces.characterize import prefix_hits
from traces.compaction import DEFAULT_CONTEXT_LIMIT, Plan, plan
from traces.loaders import TRACES, load_trace
from traces.schema import WorkloadError, validate
from traces.workflow import WORKFLOWS, generate, parse_workflow


def test_the_rule_keeps_head_summary_and_recent_turns():
    assert plan(1000, 10, head=300, block=16, limit=2000) is None
    # body = 4096 // 8 = 512: a 256-token summary and the last 248 tokens from a block boundary (4752 = 297 x 16)
    assert plan(5000, 100, head=300, block=16, limit=4096) == Plan(head=288, summary=256, recent=248)
    # the agent's own earlier trigger and body size; without a window limit
    assert plan(3000, 10, head=100, block=16, limit=None, trigger=2000, body=1000) == Plan(96, 496, 504)
    assert plan(1900, 10, head=100, block=16, limit=None, trigger=2000, body=1000) is None
    assert plan(1100, 10, head=100, block=16, limit=None, trigger=1000, body=1100) is None  # would not shorten
    assert plan(30, 5, head=0, block=64, limit=None, trigger=1, body=1) is None  # a summary is at least one block
    # a body larger than the window allows is capped at limit // 8
    assert plan(5000, 100, head=300, block=16, limit=4096, body=100_000) == Plan(288, 256, 248)
    with pytest.raises(WorkloadError, match=r"call 7: prompt 5000 \+ output 4000 tokens exceed the context limit "
                                            r"of 4096 tokens, and compacted \(head 288"):
        plan(5000, 4000, head=300, block=16, limit=4096, where="call 7")
    with pytest.raises(WorkloadError, match="context limit of 4096"):
        plan(9000, 10, head=8000, block=16, limit=4096)


def _loop_workflow(system: int = 1000) -> dict:
    return {"name": "t", "hash_block_size": 16, "agents": {"a": {
        "system_prompt_tokens": system, "input_tokens": 500, "output_tokens": 50, "calls": 30, "tool_time_s": 1.0}}}


def test_generated_conversation_is_compacted_like_an_agent():
    wf = parse_workflow(_loop_workflow())
    df = generate(wf, poisson(1.0), num_jobs=1, seed=0, context_limit_tokens=8192)
    raw = generate(wf, poisson(1.0), num_jobs=1, seed=0, context_limit_tokens=None)
    n_in, blocks = df["input_tokens"].to_numpy(), df["block_hashes"].tolist()
    assert raw["input_tokens"].tolist() == [1500 + 550 * k for k in range(30)]  # grows by input + output per call
    assert (df["input_tokens"] + df["output_tokens"]).max() <= 8192 < (raw["input_tokens"] + raw["output_tokens"]).max()
    drops = np.flatnonzero(np.diff(n_in) < 0) + 1
    assert len(drops) >= 2  # compacted more than once over 30 calls
    assert (np.diff(n_in)[np.diff(n_in) >= 0] == 550).all()  # between compactions the context grows as before
    hits = prefix_hits(df)
    head = 1000 // 16
    for c in drops:
        assert blocks[c][:head] == blocks[0][:head]  # the system prompt is kept ...
        assert blocks[c][head] != blocks[c - 1][head]  # ... then a new summary: the prefix changes
        assert hits[c] == head * 16  # the cache misses once, after the system prompt
        full = n_in[c] // 16
        assert blocks[c + 1][:full] == blocks[c][:full] and hits[c + 1] == full * 16  # later calls extend it
    recent = n_in[drops] - 992 - 512  # head (1000 in whole blocks) + summary (half of 8192 // 8) + recent turns
    assert ((recent > 0) & (recent <= 512)).all()
    pd.testing.assert_frame_equal(df, generate(wf, poisson(1.0), num_jobs=1, seed=0, context_limit_tokens=8192))


def test_a_workflow_that_cannot_fit_the_window_is_refused():
    with pytest.raises(WorkloadError, match=r"workflow 't', job t-0, agent 'a', call 0: prompt 9500 \+ output 50 "
                                            r"tokens exceed the context limit of 8192"):
        generate(parse_workflow(_loop_workflow(system=9000)), poisson(1.0), num_jobs=1, context_limit_tokens=8192)
    with pytest.raises(WorkloadError, match=r"context_limit_tokens=0 must be an integer in \[1, 16777216\]"):
        generate(parse_workflow(_loop_workflow()), poisson(1.0), num_jobs=1, context_limit_tokens=0)


def test_claude_code_sessions_are_compacted_not_truncated():
    raw = load_trace("claude-code-v8", max_sessions=60, session_rate=0.01, context_limit_tokens=None)
    df = load_trace("claude-code-v8", max_sessions=60, session_rate=0.01, context_limit_tokens=32768)
    validate(df)
    assert df["request_id"].tolist() == raw["request_id"].tolist()  # same calls in the same order
    total = (df["input_tokens"] + df["output_tokens"]).to_numpy()
    raw_total = (raw["input_tokens"] + raw["output_tokens"]).to_numpy()
    over = total > 32768  # outputs too long for a 32 K window even after compaction: kept for the engine to refuse
    assert over.sum() == df.attrs["over_limit_calls"] and over.mean() < 0.01 < (raw_total > 32768).mean()
    assert (df["output_tokens"][over] > 32768 - 16000 - 4096).all()  # head (<= 16 K here) + body (32768 // 8)
    roots = (raw["parents"].map(len) == 0).to_numpy() & (raw_total <= 32768)
    assert df[roots]["block_hashes"].tolist() == raw[roots]["block_hashes"].tolist()  # calls that fit: unchanged
    changed = np.flatnonzero(df["input_tokens"].to_numpy() != raw["input_tokens"].to_numpy())
    assert len(changed) > 0.5 * len(df)  # most of these long sessions outgrow 32 K
    # a compacted call keeps the agent's system prompt (tool definitions + system prompt, >= 7 K tokens here)
    assert all(df["block_hashes"].iat[k][:100] == raw["block_hashes"].iat[k][:100] for k in changed)
    # unlike keep-the-first-32K truncation (95 % of calls at the cap, nothing new to compute), a compacted
    # conversation keeps computing new tokens and still reuses most of its context
    hits = prefix_hits(df)
    assert (df["input_tokens"] - hits).median() > 100
    assert hits.sum() / df["input_tokens"].sum() > 0.85


def test_request_rows_are_compacted_on_their_own():
    raw = load_trace("mooncake-synthetic", context_limit_tokens=None)
    df = load_trace("mooncake-synthetic")  # the default window: Llama-3.1-8B's 131,072 tokens
    long = ((raw["input_tokens"] + raw["output_tokens"]) > DEFAULT_CONTEXT_LIMIT).to_numpy()
    assert long.sum() > 0 and (df["input_tokens"] + df["output_tokens"]).max() <= DEFAULT_CONTEXT_LIMIT
    assert df[~long]["block_hashes"].tolist() == raw[~long]["block_hashes"].tolist()
    seen = {h for hs in raw["block_hashes"] for h in hs}
    for k in np.flatnonzero(long):  # a new summary run, then the prompt's last blocks
        summary = df["block_hashes"].iat[k][:16384 // 2 // 512]
        assert not seen & set(summary)
        assert df["block_hashes"].iat[k][-3:] == raw["block_hashes"].iat[k][-3:]


@pytest.mark.parametrize("name", [*WORKFLOWS, "claude-code-v8", "claude-code-v6", "tracelab", "mooncake-synthetic"])
def test_no_shipped_workload_exceeds_the_model_window(name):
    df = load_trace(name) if name in TRACES else generate(name, poisson(0.1), num_jobs=40, seed=1)
    assert (df["input_tokens"] + df["output_tokens"]).max() <= DEFAULT_CONTEXT_LIMIT
