"""The engine-side agent mechanisms on small hand-made workloads whose right answer is known: vLLM's priority
scheduling, KV pins with a time-to-live, admission by predicted KV need, per-agent KV quotas; the KV invariants
with all of them on; and results bit-identical with them off."""

from __future__ import annotations

from dataclasses import astuple

import numpy as np
import pandas as pd
import pytest
import simpy
from hypothesis import given, settings
from hypothesis import strategies as st

from frontend.engine_args import EngineArgs
from sim.engine import RECORD_COLUMNS, Engine, SimRequest


class Cost:
    """Step time linear in the tokens computed (an analytic stand-in for sim.costmodel)."""

    def step_time(self, prefill, num_decode, decode_context_sum):
        return 0.01 + 1e-5 * num_decode + 1e-4 * sum(new for new, _ in prefill)

    def decode_step_times(self, num_decode, context_sum, k):
        return np.full(k, 0.01 + 1e-5 * num_decode)


def req(rid: int, prompt: int, out: int, ids=(), *, priority: int = 0, predicted: int = -1,
        agent: str = "") -> SimRequest:
    return SimRequest(rid, prompt, out, tuple(ids), 16, None, priority, predicted, agent)


def run(arrivals: list[tuple[float, SimRequest]], args: EngineArgs, actions=(), *, check=False,
        coalesce: bool = True) -> tuple[pd.DataFrame, Engine]:
    """One engine; ``arrivals`` (time, request), ``actions`` (time, fn(engine)); ``check``: the KV invariants at
    every event."""
    env = simpy.Environment()
    records = []
    eng = Engine(env, 0, Cost(), args, args.num_gpu_blocks_override, coalesce_steps=coalesce,
                 on_finish=records.append)

    def at(t, fn):
        yield env.timeout(t)
        fn()

    for t, r in arrivals:
        env.process(at(t, lambda r=r: eng.add_request(r)))
    for t, fn in actions:
        env.process(at(t, lambda fn=fn: fn(eng)))
    if check:
        while env.peek() != float("inf"):
            env.step()
            eng.kv.check_invariants()
    else:
        env.run()
    out = pd.DataFrame([astuple(r) for r in records], columns=RECORD_COLUMNS)
    return out.set_index("request_id").sort_index(), eng


# --- priority scheduling (vLLM's scheduling_policy="priority") ------------------------------------------------


def queue_of_calls() -> list[tuple[float, SimRequest]]:
    """One call runs (max_num_seqs 1); four queue behind it with priorities 5, 3, 1, 3."""
    return [(0.0, req(0, 100, 50, priority=9))] + [
        (0.001 * k, req(k, 100, 5, priority=p)) for k, p in ((1, 5), (2, 3), (3, 1), (4, 3))]


def test_priority_scheduling_serves_the_waiting_queue_by_priority_then_arrival():
    args = EngineArgs(num_gpu_blocks_override=200, max_num_seqs=1)
    fcfs, _ = run(queue_of_calls(), args)
    prio, _ = run(queue_of_calls(), EngineArgs(num_gpu_blocks_override=200, max_num_seqs=1,
                                               scheduling_policy="priority"))
    assert list(fcfs.sort_values("finish_s").index) == [0, 1, 2, 3, 4]
    assert list(prio.sort_values("finish_s").index) == [0, 3, 2, 4, 1]  # 1 first, 3s by arrival, 5 last


def test_priority_preemption_takes_the_lowest_priority_not_the_newest():
    """Two decoding calls outgrow the KV cache: FCFS preempts the newest, priority the lowest priority, here the
    older, which runs first in the step: it had its token of the step scheduled when the other's block did not fit,
    and gives it back, as in vLLM."""
    calls = [(0.0, req(0, 160, 300, priority=9)), (0.001, req(1, 160, 300, priority=0))]
    blocks = 2 + (160 + 300) // 16 + 160 // 16  # room for one to finish beside the other's prompt only
    fcfs, _ = run(calls, EngineArgs(num_gpu_blocks_override=blocks))
    prio, eng = run(calls, EngineArgs(num_gpu_blocks_override=blocks, scheduling_policy="priority"), check=True)
    assert fcfs["num_preemptions"].tolist() == [0, 1]
    assert prio["num_preemptions"].tolist() == [1, 0]
    assert prio.at[1, "finish_s"] < prio.at[0, "finish_s"] and eng.num_preemptions == 1


# --- KV retention (pins with a time-to-live) ----------------------------------------------------------------


A_IDS = list(range(100, 110))  # the call before the tool call: 10 blocks


def tool_call_scenario(ttl_s: float | None) -> tuple[pd.DataFrame, Engine]:
    """A (10 blocks) ends; during its tool call five unique calls cycle through the free queue and evict it; then
    its continuation A' (A's blocks + 5) arrives. ``ttl_s``: pin A's blocks right after it ends."""
    calls = [(0.0, req(0, 160, 1, A_IDS))] + [(1.0 + k, req(10 + k, 160, 1)) for k in range(5)] + [
        (10.0, req(1, 240, 1, A_IDS + list(range(500, 505))))]
    pin = [] if ttl_s is None else [(0.5, lambda e: e.pin(req(0, 160, 1, A_IDS), ttl_s))]
    return run(calls, EngineArgs(num_gpu_blocks_override=49), pin, check=True)


def test_a_pinned_prefix_hits_after_a_tool_call_that_would_have_evicted_it():
    unpinned, eng0 = tool_call_scenario(None)
    pinned, eng = tool_call_scenario(20.0)
    assert unpinned.at[1, "num_cached_tokens"] == 0  # LRU took A's blocks for the unique calls
    assert pinned.at[1, "num_cached_tokens"] == 160
    assert eng.pins == {"pinned": 1, "used": 1, "expired": 0, "yielded": 0} and eng.pinned_hit_tokens == 160
    admitted = pinned.at[1, "scheduled_s"]
    assert eng.pinned_block_seconds() == pytest.approx(10 * (admitted - 0.5))
    assert (eng0.pins["pinned"], eng0.pinned_block_seconds()) == (0, 0.0)


def test_a_pin_expires_at_its_ttl():
    res, eng = tool_call_scenario(0.3)  # gone before the first unique call: LRU as without it
    assert res.at[1, "num_cached_tokens"] == 0
    assert eng.pins == {"pinned": 1, "used": 0, "expired": 1, "yielded": 0}
    assert eng.pinned_block_seconds() == pytest.approx(10 * 0.3)
    res, _ = tool_call_scenario(2.0)  # freed at 2.5 s, A's blocks are the most recently used: they outlast C3-C5
    assert res.at[1, "num_cached_tokens"] == 160


def test_pinned_blocks_count_as_used_and_yield_rather_than_hang():
    """A call that needs every block waits for nothing else to run: the pin yields, the call runs."""
    calls = [(0.0, req(0, 160, 1, A_IDS)), (1.0, req(1, 46 * 16, 1))]
    res, eng = run(calls, EngineArgs(num_gpu_blocks_override=49), [(0.5, lambda e: e.pin(req(0, 160, 1, A_IDS), 60))],
                   check=True)
    assert len(res) == 2 and eng.pins["yielded"] == 1
    held_usage = []
    _, eng2 = run([(0.0, req(0, 160, 1, A_IDS))], EngineArgs(num_gpu_blocks_override=49),
                  [(0.5, lambda e: e.pin(req(0, 160, 1, A_IDS), 60)), (1.0, lambda e: held_usage.append(e.kv_usage))])
    assert held_usage == [pytest.approx(10 / 48)]  # pinned blocks are not free


def test_a_pin_yields_before_a_running_call_is_preempted():
    calls = [(0.0, req(0, 160, 1, A_IDS)), (1.0, req(1, 16 * 20, 16 * 20))]  # 40 blocks: 2 more than are free
    res, eng = run(calls, EngineArgs(num_gpu_blocks_override=49), [(0.5, lambda e: e.pin(req(0, 160, 1, A_IDS), 60))],
                   check=True)
    assert res.at[1, "num_preemptions"] == 0 and eng.pins["yielded"] == 1


# --- admission by predicted KV need ---------------------------------------------------------------------------


def admission_scenario(policy: str) -> tuple[pd.DataFrame, Engine]:
    """R0 runs and will grow by its predicted 300 tokens; R1 (prompt 160, predicts 280) would fit now, but not
    beside R0's growth: 40 blocks, R0 to hold 25, R1 28."""
    calls = [(0.0, req(0, 100, 300, predicted=300)), (0.05, req(1, 160, 280, predicted=280))]
    return run(calls, EngineArgs(num_gpu_blocks_override=41, admission_policy=policy), check=True)


def test_a_request_that_does_not_fit_its_predicted_need_is_not_admitted():
    greedy, g = admission_scenario("greedy")
    predicted, p = admission_scenario("predicted")
    assert greedy.at[1, "scheduled_s"] < greedy.at[0, "finish_s"]  # vLLM admits it, and later preempts
    assert g.num_preemptions >= 1
    assert predicted.at[1, "scheduled_s"] >= predicted.at[0, "finish_s"]  # waits for R0 instead
    assert p.num_preemptions == 0


def test_predicted_admission_admits_what_fits():
    calls = [(0.0, req(0, 100, 30, predicted=30)), (0.05, req(1, 160, 10, predicted=10))]
    res, _ = run(calls, EngineArgs(num_gpu_blocks_override=41, admission_policy="predicted"))
    assert res.at[1, "scheduled_s"] < res.at[0, "finish_s"]


# --- per-agent KV quotas ------------------------------------------------------------------------------------


def test_an_agent_over_its_quota_waits_and_others_overtake_it():
    calls = [(0.0, req(0, 240, 200, agent="long")), (0.05, req(1, 160, 5, agent="long")),
             (0.06, req(2, 160, 5, agent="short"))]
    free, _ = run(calls, EngineArgs(num_gpu_blocks_override=101))
    capped, _ = run(calls, EngineArgs(num_gpu_blocks_override=101, kv_quotas={"long": 0.25}), check=True)
    assert free.at[1, "scheduled_s"] < free.at[0, "finish_s"]
    assert capped.at[1, "scheduled_s"] >= capped.at[0, "finish_s"]  # 15 + 10 blocks > 25: waits
    assert capped.at[2, "scheduled_s"] < capped.at[1, "scheduled_s"]  # the short agent is not held up


def test_an_agent_over_its_quota_is_preempted_first():
    """Both decode past the cache; the long agent, over its share, is the victim though it is the older."""
    calls = [(0.0, req(0, 160, 300, agent="long")), (0.001, req(1, 160, 300, agent="short"))]
    blocks = 2 + (160 + 300) // 16 + 160 // 16
    fcfs, _ = run(calls, EngineArgs(num_gpu_blocks_override=blocks))
    capped, _ = run(calls, EngineArgs(num_gpu_blocks_override=blocks, kv_quotas={"long": 0.3}), check=True)
    assert fcfs["num_preemptions"].tolist() == [0, 1]
    assert capped["num_preemptions"].tolist() == [1, 0]


def test_a_call_larger_than_its_agents_quota_still_runs():
    res, _ = run([(0.0, req(0, 800, 4, agent="long"))], EngineArgs(num_gpu_blocks_override=101,
                                                                    kv_quotas={"long": 0.1}))
    assert len(res) == 1


def test_quotas_and_policies_are_checked_at_construction():
    with pytest.raises(ValueError, match=r"EngineArgs.kv_quotas\['a'\]=1.5 must be in \(0, 1\]"):
        EngineArgs(kv_quotas={"a": 1.5})
    with pytest.raises(ValueError, match="EngineArgs.scheduling_policy='lifo' must be one of fcfs, priority"):
        EngineArgs(scheduling_policy="lifo")
    with pytest.raises(ValueError, match="EngineArgs.admission_policy='x' must be one of greedy, predicted"):
        EngineArgs(admission_policy="x")
    assert EngineArgs(scheduling_policy="priority").server_args()[-2:] == ["--scheduling-policy", "priority"]
    assert "--scheduling-policy" not in EngineArgs().server_args()
    assert EngineArgs(kv_quotas={"a": 0.5}, admission_policy="predicted").simulator_only() == [
        "admission_policy='predicted'", "kv_quotas={'a': 0.5}"]


# --- invariants with everything on, and nothing changed with everything off ---------------------------------


calls_st = st.lists(st.tuples(st.floats(0, 3), st.integers(1, 400), st.integers(1, 60), st.integers(0, 3),
                              st.integers(0, 6), st.integers(-1, 80), st.sampled_from(["a", "b", ""])),
                    min_size=1, max_size=25)


@settings(max_examples=60, deadline=None)
@given(calls=calls_st, pins=st.lists(st.tuples(st.floats(0, 3), st.integers(0, 3), st.floats(0.01, 2)), max_size=6),
       quotas_at=st.none() | st.floats(0, 3), blocks=st.integers(30, 90), coalesce=st.booleans())
def test_kv_invariants_hold_and_every_call_finishes_with_every_mechanism_on(calls, pins, quotas_at, blocks, coalesce):
    families = [list(range(1000 * f, 1000 * f + 25)) for f in range(4)]
    arrivals = [(t, req(i, n, o, families[f][:-(-n // 16)], priority=p, predicted=pr, agent=a))
                for i, (t, n, o, f, p, pr, a) in enumerate(calls)]
    actions = [(t, lambda e, f=f, ttl=ttl: e.pin(req(-1, 160, 1, families[f][:10]), ttl)) for t, f, ttl in pins]
    if quotas_at is not None:  # a scaler's ScaleAction.memory_quotas arriving mid-run
        actions.append((quotas_at, lambda e: e.set_quotas({"a": 0.3, "b": 0.4})))
    args = EngineArgs(num_gpu_blocks_override=blocks, max_num_seqs=8, max_num_batched_tokens=256,
                      scheduling_policy="priority", admission_policy="predicted", kv_quotas={"a": 0.5})
    res, eng = run(arrivals, args, actions, check=True, coalesce=coalesce)
    assert len(res) == len(calls) and eng.num_unfinished() == 0
    again, _ = run(arrivals, args, actions, coalesce=coalesce)
    pd.testing.assert_frame_equal(res, again)  # deterministic
    if not coalesce:
        coalesced, eng2 = run(arrivals, args, actions, coalesce=True)
        pd.testing.assert_frame_equal(res, coalesced)  # coalescing changes nothing
        assert (eng2.pins, eng2.pinned_block_seconds(), eng2.pinned_hit_tokens) == (
            eng.pins, eng.pinned_block_seconds(), eng.pinned_hit_tokens)


@settings(max_examples=40, deadline=None)
@given(calls=calls_st, blocks=st.integers(30, 90))
def test_with_every_mechanism_off_the_new_request_fields_change_nothing(calls, blocks):
    """Priorities, predictions and agents on the requests are ignored unless the engine is asked to use them."""
    families = [list(range(1000 * f, 1000 * f + 25)) for f in range(4)]
    rich = [(t, req(i, n, o, families[f][:-(-n // 16)], priority=p, predicted=pr, agent=a))
            for i, (t, n, o, f, p, pr, a) in enumerate(calls)]
    plain = [(t, req(r.request_id, r.prompt_len, r.output_len, r.block_hashes)) for t, r in rich]
    args = EngineArgs(num_gpu_blocks_override=blocks, max_num_seqs=8, max_num_batched_tokens=256)
    pd.testing.assert_frame_equal(run(rich, args)[0], run(plain, args)[0])
