"""Simulator speed at scale: a million calls, and the prefix-heavy Mooncake conversation trace.

1. A million calls. Vidur's 64-stream reference shape (``requests_262144_64replicas.csv.gz`` in
   ``../shared/benchmarks/vidur``: 64 Poisson streams of Splitwise conversation lengths, 1 call/s each) replayed
   ``--copies`` times back to back (each copy shifted past the previous one's last arrival), so 4 copies are
   1,048,576 calls over about 4.4 simulated hours, on 64 replicas of Llama-2-70B (tp 2, A100-80GB) with Vidur's
   engine settings (``benchmarks/vidur_compare.py``), round-robin. Prints the wall time of ``simulate()``
   (set-up, run and result tables), calls per wall-second, and the process's peak memory.
2. Mooncake conversation (12,031 calls, prompts of 12K tokens on average) on 8 A100-40GB replicas of
   Llama-3.1-8B; then its first ``--compare-n`` calls with step coalescing on and off side by side (identical
   results asserted).
3. An agent workload whose prompts share long prefixes (``coding-assistant``, 1 job/s for 300 s, seed 3) on the
   same cluster with the Pythia router: the case where KV-cache bookkeeping, block by block, costs the most.

    python benchmarks/sim_speed.py                 # all three (a few minutes on one core)
    python benchmarks/sim_speed.py --copies 1      # 262,144 calls in the first part
"""

from __future__ import annotations

import argparse
import math
import resource
import time

import pandas as pd
from vidur_compare import config, load  # the same requests and engine settings as the Vidur comparison

from policies.registry import make_router
from sim.cluster import ClusterConfig, PoolConfig, simulate
from traces.loaders import load_trace
from traces.schema import make_table
from traces.workflow import make_workload


def million(copies: int) -> None:
    shape = load(64)
    span = math.ceil(float(shape["arrival_s"].max()))
    n = len(shape)
    table = make_table(pd.DataFrame({
        "request_id": [int(r) + c * n for c in range(copies) for r in shape["request_id"]],
        "arrival_s": [float(a) + c * span for c in range(copies) for a in shape["arrival_s"]],
        "input_tokens": list(shape["input_tokens"]) * copies,
        "output_tokens": list(shape["output_tokens"]) * copies,
    }), f"{copies} x requests_262144_64replicas")
    print(f"== {len(table):,} calls: Vidur's 64-stream shape x {copies}, 64 x Llama-2-70B tp2 A100-80GB (vllm-v0), "
          f"round-robin ==")
    t0, c0 = time.perf_counter(), time.process_time()
    res = simulate(table, config(64), make_router("round_robin"))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    r = res.requests
    assert (r["status"] == "ok").all()
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(f"simulate(): {wall:.1f} s wall ({cpu:.1f} s CPU) = {len(table) / wall:,.0f} calls/s; peak memory "
          f"{peak_gb:.2f} GB (the process, table and results included)")
    print(f"  simulated {r['finish_s'].max() / 3600:.2f} h, mean E2E {(r['finish_s'] - r['release_s']).mean():.2f} s, "
          f"{len(res.timeseries):,} time-series rows")


def run(table: pd.DataFrame, coalesce: bool = True, router: str = "round_robin") -> tuple[float, float, pd.DataFrame]:
    """Wall and CPU seconds of ``simulate()`` on 8 x Llama-3.1-8B A100-40GB, and the per-call results."""
    cfg = ClusterConfig(num_gpus=8, pools=(PoolConfig(initial_replicas=8),), coalesce_steps=coalesce)
    t0, c0 = time.perf_counter(), time.process_time()
    res = simulate(table, cfg, make_router(router))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert (res.requests["status"] == "ok").all()
    return wall, cpu, res.requests


def mooncake(compare_n: int) -> None:
    table = load_trace("mooncake-conversation")
    print(f"== Mooncake conversation: {len(table):,} calls, {int(table['input_tokens'].mean()):,} prompt tokens on "
          f"average, 8 x Llama-3.1-8B A100-40GB, round-robin ==")
    wall, cpu, r = run(table)
    hit = r["cached_tokens"].sum() / r["input_tokens"].sum()
    print(f"whole trace: {wall:.1f} s wall ({cpu:.1f} s CPU) = {len(table) / wall:,.0f} calls/s (prefix hit "
          f"{hit:.1%}, {int(r['num_preemptions'].sum()):,} preemptions)")
    head = table.head(compare_n)
    on, on_cpu, res_on = run(head, True)
    off, off_cpu, res_off = run(head, False)
    pd.testing.assert_frame_equal(res_on, res_off, check_exact=True)
    print(f"first {compare_n:,} calls: coalescing on {on:.1f} s, off {off:.1f} s wall: {off / on:.1f}x "
          f"({off_cpu / on_cpu:.1f}x CPU), identical results")


def agents() -> None:
    table = make_workload("coding-assistant", rate=1.0, duration_s=300, seed=3)
    print(f"== coding-assistant, 1 job/s for 300 s: {len(table):,} calls, {int(table['input_tokens'].mean()):,} "
          f"prompt tokens on average, 8 x Llama-3.1-8B A100-40GB, Pythia router ==")
    wall, cpu, r = run(table, router="pythia")
    hit = r["cached_tokens"].sum() / r["input_tokens"].sum()
    print(f"{wall:.1f} s wall ({cpu:.1f} s CPU) = {len(table) / wall:,.0f} calls/s (prefix hit {hit:.1%})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=4, help="copies of the 262,144-call shape (4: 1,048,576 calls)")
    ap.add_argument("--compare-n", type=int, default=2000, help="Mooncake calls for the coalescing on/off comparison")
    ap.add_argument("--skip-mooncake", action="store_true")
    args = ap.parse_args(argv)
    if args.copies < 1 or args.compare_n < 1:
        ap.error(f"--copies and --compare-n must be >= 1; got {args.copies}, {args.compare_n}")
    million(args.copies)
    if not args.skip_mooncake:
        mooncake(args.compare_n)
    agents()


if __name__ == "__main__":
    main()
