"""Engine speed on the Mooncake conversation trace: simulated requests and decode tokens per wall-second.

The first N requests of the trace are dealt round-robin to R independent replicas (R=8: what each of 8
replicas sees behind a round-robin router), each replica is replayed on its own with
``sim.engine.simulate_replica``, once with step coalescing and once without, and the wall times summed.

    .venv/bin/python benchmarks/engine_speed.py                    # whole trace, 8 replicas, coalescing on
    .venv/bin/python benchmarks/engine_speed.py -n 1500 --both     # on and off side by side (off is slow)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from frontend.engine_args import EngineArgs
from sim.engine import simulate_replica
from traces.schema import make_table
from traces.shared import shared_dir

TRACE = shared_dir() / "traces" / "mooncake" / "conversation_trace.jsonl.gz"


class LinearCost:
    """Analytic stand-in used only when sim.costmodel is missing: roughly Llama-3.1-8B on one A100."""

    base, per_seq, per_ctx, per_token, per_attn = 0.011, 1e-4, 8.7e-8, 7e-5, 1e-10

    def step_time(self, prefill, num_decode, decode_context_sum):
        t = self.base + self.per_seq * num_decode + self.per_ctx * decode_context_sum
        for new, done in prefill:
            t += self.per_token * new + self.per_attn * new * (done + new)
        return t

    def decode_step_times(self, num_decode, context_sum, k):
        ctx = context_sum + num_decode * np.arange(k, dtype=np.int64)
        return self.base + self.per_seq * num_decode + self.per_ctx * ctx


def cost_and_blocks(gpu: str, model: str, block_size: int, analytic: bool) -> tuple[object, int, str]:
    if analytic:
        return LinearCost(), 8600, "analytic stand-in, 8600 blocks"
    try:
        from sim.costmodel import make_cost_model, num_gpu_blocks
    except ImportError:
        return LinearCost(), 8600, "analytic stand-in (sim.costmodel not found), 8600 blocks"
    return make_cost_model(gpu, model, 1), num_gpu_blocks(gpu, model, 1, block_size), f"sim.costmodel {gpu} {model}"


def load_mooncake(n: int | None) -> pd.DataFrame:
    raw = pd.read_json(TRACE, lines=True, nrows=n)
    return make_table({
        "request_id": np.arange(len(raw)),
        "arrival_s": raw["timestamp"].to_numpy() / 1000.0,
        "input_tokens": raw["input_length"],
        "output_tokens": raw["output_length"],
        "block_hashes": raw["hash_ids"],
        "hash_block_size": 512,
    }, str(TRACE))


def run(table: pd.DataFrame, replicas: int, cost, cfg: EngineArgs, coalesce: bool) -> tuple[float, pd.DataFrame]:
    """CPU seconds (this process, one core: robust on a shared machine) and the per-request results."""
    t0 = time.process_time()
    parts = [simulate_replica(table.iloc[r::replicas].reset_index(drop=True), cost, cfg, coalesce=coalesce)
             for r in range(replicas)]
    return time.process_time() - t0, pd.concat(parts, ignore_index=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=None, help="first N requests of the trace (default: all 12,031)")
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--both", action="store_true", help="also run with coalescing off and compare")
    ap.add_argument("--gpu", default="a100-40gb")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--analytic", action="store_true", help="use the analytic stand-in even if sim.costmodel exists")
    args = ap.parse_args()

    table = load_mooncake(args.n)
    cost, blocks, what = cost_and_blocks(args.gpu, args.model, 16, args.analytic)
    cfg = EngineArgs(num_gpu_blocks_override=blocks)
    print(f"{len(table)} Mooncake requests on {args.replicas} replicas; cost: {what}; {blocks} KV blocks")
    modes = [True, False] if args.both else [True]
    results = {}
    for coalesce in modes:
        cpu, res = run(table, args.replicas, cost, cfg, coalesce)
        results[coalesce] = res
        decode = int((res["output_len"] - 1).sum())
        print(f"coalescing {'on ' if coalesce else 'off'}: {cpu:7.2f} CPU s, {len(res) / cpu:8.0f} requests/s, "
              f"{decode / cpu:10.0f} decode tokens/s; simulated makespan {res['finish_s'].max():.0f} s, "
              f"preemptions {int(res['num_preemptions'].sum())}, "
              f"prefix hit {res['num_cached_tokens'].sum() / res['prompt_len'].sum():.1%}")
    if args.both:
        same = results[True].equals(results[False])
        print(f"coalescing on/off per-request results identical: {same}")


if __name__ == "__main__":
    main()
