"""One replica: vLLM v1 scheduling, prefix hits where the trace says, preemption, coalescing, determinism."""

from __future__ import annotations

from dataclasses import astuple

import numpy as np
import pandas as pd
import pytest
import simpy

from frontend.engine_args import EngineArgs
from sim.engine import RECORD_COLUMNS, Engine, SimRequest, simulate_replica
from traces.schema import make_table


class LinearCost:
    """Analytic stand-in for sim.costmodel.CostModel; records every step it is asked about."""

    base, per_seq, per_ctx, per_token, per_attn = 0.004, 1e-5, 1e-8, 5e-5, 1e-10

    def __init__(self, **coefficients: float):
        self.__dict__.update(coefficients)
        self.steps: list[tuple[list[tuple[int, int]], int]] = []  # (prefill chunks, num_decode)
        self.decode_runs: list[tuple[int, int]] = []  # (num_decode, k) of each decode_step_times call

    def step_time(self, prefill, num_decode, decode_context_sum):
        self.steps.append((list(prefill), num_decode))
        t = self.base + self.per_seq * num_decode + self.per_ctx * decode_context_sum
        for new, done in prefill:
            t += self.per_token * new + self.per_attn * new * (done + new)
        return t

    def decode_step_times(self, num_decode, context_sum, k):
        self.decode_runs.append((num_decode, k))
        ctx = context_sum + num_decode * np.arange(k, dtype=np.int64)
        return self.base + self.per_seq * num_decode + self.per_ctx * ctx


def table(rows: list[dict]) -> pd.DataFrame:
    return make_table(pd.DataFrame(rows))


def row(rid: int, t: float, prompt: int, out: int, ids=(), hbs: int = 16) -> dict:
    return dict(request_id=rid, arrival_s=t, input_tokens=prompt, output_tokens=out, block_hashes=list(ids),
                hash_block_size=hbs)


def random_table(n: int, seed: int, max_prompt: int = 2000, max_out: int = 300, gap: float = 0.05) -> pd.DataFrame:
    """Requests with shared prefixes (5 families), unique tails, zero outputs, bursts and lulls."""
    rng = np.random.default_rng(seed)
    families = [list(rng.integers(0, 10**6, 40)) for _ in range(5)]
    rows, t = [], 0.0
    for i in range(n):
        prompt = int(rng.integers(1, max_prompt))
        nb = -(-prompt // 64)
        shared = families[int(rng.integers(5))][: int(rng.integers(0, nb + 1))]
        ids = (shared + [10**7 + 1000 * i + j for j in range(nb)])[:nb]
        rows.append(row(i, t, prompt, int(rng.integers(0, max_out)), ids, 64))
        t += float(rng.exponential(gap)) if rng.random() < 0.9 else float(rng.exponential(20 * gap))
    return table(rows)


class OneByOne(Engine):
    """The engine with every running request on the per-request path in every step: the steady decodes are
    handed to it before each step, as the engine itself does when they cannot advance as a group."""

    def _schedule(self):
        self._dissolve_steady()
        return super()._schedule()


def drive(tab: pd.DataFrame, cfg: EngineArgs, sample_every: float = 0.0137, cost: LinearCost | None = None,
          coalesce: bool = True, engine: type[Engine] = Engine):
    """simulate_replica plus a sampler reading the /metrics equivalents, as the cluster does."""
    env = simpy.Environment()
    cost = cost or LinearCost()
    records = []
    rep = engine(env, 0, cost, cfg, cfg.num_gpu_blocks_override, coalesce_steps=coalesce, on_finish=records.append)
    samples = []

    def arrivals():
        for r in tab.itertuples():
            if r.arrival_s > env.now:
                yield env.timeout(r.arrival_s - env.now)
            rep.add_request(SimRequest(r.request_id, r.input_tokens, r.output_tokens, tuple(r.block_hashes),
                                       r.hash_block_size))

    def sampler():
        while len(records) < len(tab):
            samples.append((env.now, rep.num_running, rep.num_waiting, rep.kv_usage, rep.prefix_cache_hits))
            yield env.timeout(sample_every)

    env.process(arrivals())
    env.process(sampler())
    env.run()
    return pd.DataFrame([astuple(r) for r in records], columns=RECORD_COLUMNS), samples, rep, cost


# --- prefix caching -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size,hbs,shared,expect", [
    (16, 64, 3, 3 * 64),  # k full trace blocks shared -> k * hash_block_size cached tokens
    (16, 512, 2, 2 * 512),  # Mooncake-sized trace blocks
    (32, 16, 5, 64),  # trace blocks smaller than engine blocks: whole engine blocks only (80 -> 64)
    (32, 48, 2, 96),  # neither divides the other
    (16, 64, 8, 8 * 64 - 16),  # identical prompt: capped so the last token is recomputed
])
def test_prefix_hit_exactly_where_the_trace_says(block_size, hbs, shared, expect):
    prompt = 8 * hbs
    a_ids = list(range(1, 9))
    b_ids = a_ids[:shared] + [99] * (8 - shared)
    tab = table([row(0, 0.0, prompt, 3, a_ids, hbs), row(1, 50.0, prompt, 3, b_ids, hbs)])
    res = simulate_replica(tab, LinearCost(), EngineArgs(num_gpu_blocks_override=1000, block_size=block_size))
    assert res["num_cached_tokens"].tolist() == [0, expect]


def test_no_hits_without_trace_ids_or_with_caching_off():
    same = [row(0, 0.0, 300, 2), row(1, 10.0, 300, 2)]  # no block ids: unique prompts
    res = simulate_replica(table(same), LinearCost(), EngineArgs(num_gpu_blocks_override=100))
    assert res["num_cached_tokens"].tolist() == [0, 0]
    shared = [row(0, 0.0, 300, 2, range(19)), row(1, 10.0, 300, 2, range(19))]
    cfg = EngineArgs(num_gpu_blocks_override=100, enable_prefix_caching=False)
    assert simulate_replica(table(shared), LinearCost(), cfg)["num_cached_tokens"].tolist() == [0, 0]


def lru_scenario(probe_ids: list[int]) -> int:
    """A and B (10 blocks each) finish, C (25 unique blocks) evicts 5: LRU takes A's, tail first."""
    a, b = list(range(100, 110)), list(range(200, 210))
    rows = [row(0, 0.0, 160, 1, a), row(1, 10.0, 160, 1, b), row(2, 20.0, 400, 1), row(3, 30.0, 160, 1, probe_ids)]
    res = simulate_replica(table(rows), LinearCost(), EngineArgs(num_gpu_blocks_override=41))
    return int(res["num_cached_tokens"].iloc[3])


def test_lru_eviction_order():
    assert lru_scenario(list(range(100, 110))) == 5 * 16  # A was freed first: its last 5 blocks are gone
    assert lru_scenario(list(range(200, 210))) == 9 * 16  # B intact (capped at prompt_len - 1)


def test_prefix_cache_metrics_count_tokens_at_first_scheduling():
    tab = random_table(80, seed=3)
    res, _, rep, _ = drive(tab, EngineArgs(num_gpu_blocks_override=300, max_num_batched_tokens=512))
    assert rep.prefix_cache_queries == int(res["prompt_len"].sum())
    assert rep.prefix_cache_hits == int(res["num_cached_tokens"].sum()) > 0
    assert (res["num_cached_tokens"] <= res["prompt_len"] - 1).all()


# --- scheduling -----------------------------------------------------------------------------------------------


def test_preemption_under_memory_pressure_and_everyone_finishes():
    rows = [row(i, 0.01 * i, 200, 300) for i in range(12)]  # each grows to 32 blocks; 64 fit
    res, _, rep, _ = drive(table(rows), EngineArgs(num_gpu_blocks_override=65))
    assert len(res) == 12 and (res["output_len"] == 300).all()
    assert rep.num_preemptions == int(res["num_preemptions"].sum()) > 0
    assert res.loc[res["num_preemptions"] > 0, "request_id"].min() > 0  # the oldest request is never preempted
    assert rep.num_unfinished() == 0 and rep.kv_usage == 0.0


def test_chunked_prefill_respects_max_num_batched_tokens():
    rows = [row(0, 0.0, 1000, 50), row(1, 0.0, 700, 50), row(2, 0.5, 300, 20)]
    cfg = EngineArgs(num_gpu_blocks_override=500, max_num_batched_tokens=256)
    res, _, _, cost = drive(table(rows), cfg)
    for prefill, num_decode in cost.steps:
        assert sum(new for new, _ in prefill) + num_decode <= 256
    chunks0 = [(new, done) for prefill, _ in cost.steps for new, done in prefill if new > 1][:4]
    assert chunks0 == [(256, 0), (256, 256), (256, 512), (232, 768)]  # request 0 alone first, in order
    assert all(k * n <= 256 * k for n, k in cost.decode_runs)


def test_max_num_seqs_respected():
    rows = [row(i, 0.0, 50, 40) for i in range(20)]
    res, samples, _, cost = drive(table(rows), EngineArgs(num_gpu_blocks_override=500, max_num_seqs=4))
    assert max(len(p) + d for p, d in cost.steps) == 4
    assert max(n for n, _ in cost.decode_runs) <= 4
    assert max(s[1] for s in samples) == 4
    assert res["first_token_s"].is_monotonic_increasing  # FCFS


def test_output_len_zero_is_served_as_one_token():
    res = simulate_replica(table([row(0, 0.0, 40, 0)]), LinearCost(), EngineArgs(num_gpu_blocks_override=10))
    assert res["output_len"].tolist() == [1] and res["first_token_s"].iloc[0] == res["finish_s"].iloc[0]


def test_request_that_can_never_fit_is_refused_clearly():
    tab = table([row(0, 0.0, 50, 5), row(7, 1.0, 5000, 10)])
    with pytest.raises(ValueError, match=r"request 7: prompt_len=5000 .* holds only 99 \(1584 tokens\)"):
        simulate_replica(tab, LinearCost(), EngineArgs(num_gpu_blocks_override=100))


def test_timestamps_are_ordered():
    res = simulate_replica(random_table(150, seed=5), LinearCost(), EngineArgs(num_gpu_blocks_override=400))
    assert (res["arrival_s"] <= res["scheduled_s"]).all()
    assert (res["scheduled_s"] < res["first_token_s"]).all()
    assert (res["first_token_s"] <= res["finish_s"]).all()
    assert ((res["output_len"] == 1) == (res["first_token_s"] == res["finish_s"])).all()


# --- step coalescing and determinism --------------------------------------------------------------------------


COALESCING_CASES = [
    (0, EngineArgs(num_gpu_blocks_override=400, max_num_seqs=32, max_num_batched_tokens=512)),
    (1, EngineArgs(num_gpu_blocks_override=250, block_size=32, max_num_seqs=16, max_num_batched_tokens=1024)),
    (2, EngineArgs(num_gpu_blocks_override=2000, max_num_batched_tokens=2048)),
    (3, EngineArgs(num_gpu_blocks_override=300, enable_prefix_caching=False, enable_chunked_prefill=False,
                     max_num_batched_tokens=4096)),
    (4, EngineArgs(num_gpu_blocks_override=500, max_num_seqs=64, max_num_batched_tokens=24)),  # budget < decodes
]


@pytest.mark.parametrize("seed,cfg", COALESCING_CASES)
def test_coalescing_on_and_off_give_identical_results(seed, cfg):
    tab = random_table(300, seed)
    on, samples_on, rep_on, cost_on = drive(tab, cfg)
    off, samples_off, rep_off, _ = drive(tab, cfg, coalesce=False)
    pd.testing.assert_frame_equal(on, off, check_exact=True)
    assert samples_on == samples_off  # metrics read mid-window match the step-by-step run too
    assert rep_on.num_steps == rep_off.num_steps == rep_off.num_step_events
    assert rep_on.num_step_events < rep_on.num_steps / 2  # and coalescing did coalesce
    assert any(k > 1 for _, k in cost_on.decode_runs)
    if seed < 2:
        assert rep_on.num_preemptions > 0


@pytest.mark.parametrize("seed,cfg", COALESCING_CASES)
def test_steady_decodes_advanced_as_a_group_match_one_by_one(seed, cfg):
    """Advancing the leading decodes as one group (lazy counters, blocks by step residue, finishes by step) gives
    the results, metrics and step times of handling every request on its own in every step."""
    tab = random_table(300, seed)
    grouped, samples_grouped, _, cost_grouped = drive(tab, cfg, coalesce=False)
    single, samples_single, rep_single, cost_single = drive(tab, cfg, coalesce=False, engine=OneByOne)
    pd.testing.assert_frame_equal(grouped, single, check_exact=True)
    assert samples_grouped == samples_single
    assert cost_grouped.steps == cost_single.steps
    assert rep_single.num_steps == len(cost_single.steps)


def test_long_prompt_chunks_are_coalesced_with_identical_results():
    """The chunks of a long prompt, with decodes beside them, run as one event until the prompt is done."""
    tab = table([row(0, 0.0, 300, 400), row(1, 0.5, 6000, 20)])
    cfg = EngineArgs(num_gpu_blocks_override=1000, max_num_batched_tokens=512)
    on, samples_on, rep_on, cost_on = drive(tab, cfg)
    off, samples_off, rep_off, _ = drive(tab, cfg, coalesce=False)
    pd.testing.assert_frame_equal(on, off, check_exact=True)
    assert samples_on == samples_off
    chunks = [p for p, _ in cost_on.steps if p and p[0][0] > 1]
    assert len(chunks) >= 12 and all(n == 0 for _, n in cost_on.steps[:1])  # 6000 tokens in chunks beside decodes
    assert rep_on.num_step_events <= rep_off.num_step_events - 10  # the chunks took a few events, not one each


def test_a_preempted_request_hits_its_own_blocks_when_it_comes_back():
    """Its blocks are registered when it is preempted (prompts here share nothing, so only it can hit them):
    coming back it recomputes only what was evicted meanwhile."""
    rows = [row(0, 0.0, 64, 200), row(1, 0.01, 64, 200)]  # each grows to 17 blocks; 30 are usable
    res, _, rep, cost = drive(table(rows), EngineArgs(num_gpu_blocks_override=31))
    assert rep.num_preemptions > 0 and res["num_preemptions"].tolist() == [0, rep.num_preemptions]
    readmitted = [done for prefill, _ in cost.steps for new, done in prefill if done > 0 and new > 1]
    assert readmitted and readmitted[-1] % 16 == 0  # a prefill that starts after cached blocks of its own


@pytest.mark.parametrize("seed", [0, 1])
def test_coalescing_identical_when_arrivals_and_samples_land_on_step_boundaries(seed):
    """Every step takes 1/4 s and arrivals and samples fall on quarter seconds: all ties, both modes alike."""
    tab = random_table(120, seed, max_prompt=600, max_out=60, gap=1.0)
    tab["arrival_s"] = (tab["arrival_s"] * 4).round() / 4
    cfg = EngineArgs(num_gpu_blocks_override=120, max_num_batched_tokens=256)
    flat = dict(base=0.25, per_seq=0.0, per_ctx=0.0, per_token=0.0, per_attn=0.0)
    on, samples_on, rep_on, _ = drive(tab, cfg, 0.25, LinearCost(**flat))
    off, samples_off, _, _ = drive(tab, cfg, 0.25, LinearCost(**flat), coalesce=False)
    pd.testing.assert_frame_equal(on, off, check_exact=True)
    assert samples_on == samples_off
    assert rep_on.num_step_events < rep_on.num_steps
    assert on["scheduled_s"].isin(on["arrival_s"]).any()  # some were admitted at their arrival instant


def test_deterministic_bit_for_bit():
    tab = random_table(200, seed=11)
    cfg = EngineArgs(num_gpu_blocks_override=300, max_num_batched_tokens=512)
    a = simulate_replica(tab, LinearCost(), cfg)
    b = simulate_replica(tab, LinearCost(), cfg)
    pd.testing.assert_frame_equal(a, b, check_exact=True)
