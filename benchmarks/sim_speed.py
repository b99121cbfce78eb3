"""Simulator speed: the Mooncake conversation trace (12,031 calls) on a cluster of 8 A100-40GB replicas.

Prints simulated calls and decode tokens per wall-second for the whole cluster simulation (router, front end,
engines, KV caches), with step coalescing on and, for a prefix of the trace, off, side by side, and the ratio to
Vidur. Vidur cannot run here (the PyPI ``vidur`` downloads its profiles from Hugging Face at run time, which these
machines cannot reach), so the ratio is against Vidur's throughput measured on this kind of machine: about 350
simulated requests per wall-second (Llama-2-70B tp2, 4,096 requests; issue 2). Where ``vidur`` imports, say so.

    python benchmarks/sim_speed.py            # whole trace, coalescing on; plus 2,000 calls on vs off
"""

from __future__ import annotations

import argparse
import importlib.util
import time

from policies.registry import make_router
from sim.cluster import ClusterConfig, PoolConfig, simulate
from traces.loaders import load_trace

VIDUR_REQ_PER_S = 350.0


def run(table, coalesce: bool, replicas: int) -> tuple[float, float, float]:
    cfg = ClusterConfig(num_gpus=replicas, pools=(PoolConfig(initial_replicas=replicas),), coalesce_steps=coalesce,
                        max_num_batched_tokens=8192)
    t0 = time.perf_counter()
    res = simulate(table, cfg, make_router("round_robin"))
    wall = time.perf_counter() - t0
    assert (res.requests["status"] == "ok").all()
    return wall, len(table) / wall, float(table["output_tokens"].sum()) / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--compare-n", type=int, default=2000, help="calls for the coalescing on/off comparison")
    args = ap.parse_args()
    # Prompts are capped at the 8B model's 128K context minus room for the output (the trace's max is 126K).
    table = load_trace("mooncake-conversation")
    print(f"Mooncake conversation: {len(table)} calls, {int(table['output_tokens'].sum())} output tokens, "
          f"{args.replicas} x A100-40GB, Llama-3.1-8B, round-robin")
    wall, rps, tps = run(table, True, args.replicas)
    print(f"whole trace, coalescing on : {wall:7.1f} s wall  {rps:9.0f} calls/s  {tps:11.0f} decode tokens/s  "
          f"{rps / VIDUR_REQ_PER_S:5.1f}x Vidur ({VIDUR_REQ_PER_S:.0f} calls/s)")
    head = table.head(args.compare_n)
    on = run(head, True, args.replicas)
    off = run(head, False, args.replicas)
    print(f"first {args.compare_n} calls, on  : {on[0]:7.1f} s wall  {on[1]:9.0f} calls/s  {on[2]:11.0f} tokens/s")
    print(f"first {args.compare_n} calls, off : {off[0]:7.1f} s wall  {off[1]:9.0f} calls/s  {off[2]:11.0f} tokens/s"
          f"   coalescing speed-up {off[0] / on[0]:.1f}x")
    if importlib.util.find_spec("vidur") is None:
        print("vidur is not installed here; the ratio uses the reference figure above")


if __name__ == "__main__":
    main()
