"""pythia-sim against Vidur on the very requests of Vidur's reference run (``../shared/benchmarks/vidur``).

Vidur (microsoft/vidur) simulated Llama-2-70B on tensor-parallel 2 x A100-80GB with its Sarathi scheduler (chunks of
512 tokens, at most 128 requests in a batch), 3,328 KV blocks of 16 tokens per replica, round-robin over replicas;
the shared files hold its requests and its speed and outputs, measured on this kind of 2-core machine. This
replays the same requests through ``sim.cluster.simulate`` with the same settings (``max_num_batched_tokens=512``,
``max_num_seqs=128``, ``num_gpu_blocks_override=3328``) and prints, side by side in one run:

1. speed: simulated requests per wall-second of ``simulate()`` (set-up and result tables included) on 4,096
   requests, against Vidur's lean loop (metrics off, 759 requests/s) and its default loop (557);
2. agreement of the outputs with Vidur's (mean TTFT, mean and p99 end-to-end latency, makespan);
3. scaling at a constant 1 request/s per replica: 1, 4, 16 and 64 replicas (262,144 requests), requests/s
   relative to 1 replica.

The engine generation is vllm-v0 (``ClusterConfig.engine_version``): Vidur predicts each step from kernels it
profiled running eagerly (no CUDA graphs) plus CPU overheads measured on the 2023-24 vLLM/Sarathi-Serve
stack, which is the engine ``sim.costmodel`` calibrates as vllm-v0 (from Vidur's own A100 profiles); vllm-v1
models today's engine with CUDA graphs and overlapped scheduling, faster than what Vidur simulates.

    python benchmarks/vidur_compare.py                  # all three (about a minute on one core)
    python benchmarks/vidur_compare.py --replicas 1 4   # scaling on fewer files
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pandas as pd

from frontend.engine_args import EngineArgs
from policies.registry import make_router
from sim.cluster import ClusterConfig, PoolConfig, Simulation
from sim.models import num_gpu_blocks
from traces.schema import make_table
from traces.shared import shared_dir

VIDUR_DIR = shared_dir() / "benchmarks" / "vidur"
FILES = {1: "requests_4096.csv.gz", 4: "requests_16384_4replicas.csv.gz", 16: "requests_65536_16replicas.csv.gz",
         64: "requests_262144_64replicas.csv.gz"}
# Vidur's recorded figures (VIDUR_DIR/README.md): requests/s of its loop, and its outputs per replica count.
VIDUR_LEAN_RPS, VIDUR_DEFAULT_RPS = 759.0, 557.0
VIDUR_OUTPUTS = {1: {"mean TTFT (s)": 1.034, "mean E2E (s)": 21.86, "p99 E2E (s)": 62.1, "makespan (s)": 3925.5},
                 16: {"mean TTFT (s)": 0.71, "mean E2E (s)": 21.01, "makespan (s)": 4016.0}}
VIDUR_STEPS, VIDUR_BLOCKS = 40_422, 3328
AGREEMENT = 0.03  # outputs within 3 % of Vidur's
ENGINE = EngineArgs(block_size=16, max_num_seqs=128, max_num_batched_tokens=512, num_gpu_blocks_override=VIDUR_BLOCKS)
GPU, MODEL, TP, ENGINE_VERSION = "a100-80gb", "llama-2-70b", 2, "vllm-v0"


def load(replicas: int) -> pd.DataFrame:
    path = VIDUR_DIR / FILES[replicas]
    if not path.exists():
        raise SystemExit(f"{path}: not found; the Vidur benchmark data lives in the shared folder (../shared beside "
                         f"the repository, or $PYTHIA_SHARED_DIR)")
    raw = pd.read_csv(path)
    return make_table({"request_id": raw["request_id"], "arrival_s": raw["arrived_at"],
                       "input_tokens": raw["num_prefill_tokens"], "output_tokens": raw["num_decode_tokens"]},
                      str(path))


def config(replicas: int) -> ClusterConfig:
    return ClusterConfig(gpu=GPU, num_gpus=TP * replicas, pools=(PoolConfig(model=MODEL, tp=TP,
                                                                            initial_replicas=replicas),),
                         engine=ENGINE, engine_version=ENGINE_VERSION)


def run(table: pd.DataFrame, replicas: int) -> tuple[float, float, Simulation, float]:
    """Wall and CPU seconds of one ``simulate()`` (set-up, event loop, result tables), the simulation, and the wall
    seconds of its event loop alone."""
    t0, c0 = time.perf_counter(), time.process_time()
    sim = Simulation(table, config(replicas), make_router("round_robin"))
    t1 = time.perf_counter()
    sim.run()
    loop = time.perf_counter() - t1
    res = sim.result()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if not (res.requests["status"] == "ok").all():
        raise SystemExit(f"{replicas} replica(s): not every request was served: {res.summary()}")
    return wall, cpu, sim, loop


def outputs(sim: Simulation) -> dict[str, float]:
    r = sim.result().requests
    e2e = (r["finish_s"] - r["release_s"]).to_numpy()
    return {"mean TTFT (s)": float((r["first_token_s"] - r["release_s"]).mean()), "mean E2E (s)": float(e2e.mean()),
            "p99 E2E (s)": float(np.percentile(e2e, 99)), "makespan (s)": float(r["finish_s"].max())}


def speed(repeats: int) -> tuple[float, float]:
    """Runs the 4,096 requests ``repeats`` times; returns the median requests per wall- and CPU-second."""
    table = load(1)
    runs = [run(table, 1) for _ in range(repeats)]
    wall = statistics.median(r[0] for r in runs)
    cpu = statistics.median(r[1] for r in runs)
    loop = statistics.median(r[3] for r in runs)
    rps = len(table) / wall
    print(f"== speed: {len(table):,} requests, 1 replica ({MODEL}, tp {TP}, {GPU}, {ENGINE_VERSION}), "
          f"median of {repeats} runs ==")
    print(f"pythia-sim simulate(): {wall:.3f} s wall ({cpu:.3f} s CPU) = {rps:,.0f} requests/s "
          f"(CPU: {len(table) / cpu:,.0f})")
    print(f"  vs Vidur lean loop    ({VIDUR_LEAN_RPS:,.0f} requests/s): {rps / VIDUR_LEAN_RPS:5.1f}x")
    print(f"  vs Vidur default loop ({VIDUR_DEFAULT_RPS:,.0f} requests/s): {rps / VIDUR_DEFAULT_RPS:5.1f}x")
    print(f"  event loop alone (as Vidur's loop time counts; set-up and result tables left out): {loop:.3f} s = "
          f"{len(table) / loop:,.0f} requests/s, {len(table) / loop / VIDUR_LEAN_RPS:.1f}x Vidur's lean loop")
    sim = runs[0][2]
    engines = [r.handle for r in sim.front.replicas.values()]
    print(f"  engine steps {sum(e.num_steps for e in engines):,} in {sum(e.num_step_events for e in engines):,} "
          f"events (Vidur: {VIDUR_STEPS:,} steps), preemptions {sum(e.num_preemptions for e in engines)} "
          f"(Vidur: 0)")
    agreement(1, outputs(sim))
    return rps, len(table) / cpu


def agreement(replicas: int, ours: dict[str, float]) -> None:
    print(f"== outputs, {replicas} replica(s), KV capacity {VIDUR_BLOCKS:,} blocks as Vidur's ==")
    print(f"{'metric':<16}{'pythia-sim':>12}{'Vidur':>10}{'diff':>9}")
    for name, theirs in VIDUR_OUTPUTS[replicas].items():
        diff = ours[name] / theirs - 1
        mark = "ok" if abs(diff) <= AGREEMENT else f"more than {AGREEMENT:.0%} apart"
        print(f"{name:<16}{ours[name]:>12.3f}{theirs:>10.3f}{diff:>+9.1%}  {mark}")


def kv_capacity() -> None:
    """What pythia-sim's model of vLLM's memory profiling sizes for this replica, beside Vidur's 3,328."""
    sized = {version: num_gpu_blocks(GPU, MODEL, TP, ENGINE.block_size, ENGINE.gpu_memory_utilization,
                                     max_num_batched_tokens=ENGINE.max_num_batched_tokens,
                                     max_num_seqs=ENGINE.max_num_seqs, engine=version)
             for version in ("vllm-v0", "vllm-v1")}
    at_8192 = num_gpu_blocks(GPU, MODEL, TP, ENGINE.block_size, ENGINE.gpu_memory_utilization,
                             max_num_batched_tokens=8192, max_num_seqs=ENGINE.max_num_seqs, engine=ENGINE_VERSION)
    print(f"== KV capacity: vLLM's sizing of this replica (gpu_memory_utilization {ENGINE.gpu_memory_utilization}, "
          f"max_num_batched_tokens {ENGINE.max_num_batched_tokens}): {sized['vllm-v0']:,} blocks (vllm-v0), "
          f"{sized['vllm-v1']:,} (vllm-v1); with an activation reserve for 8,192 tokens {at_8192:,}; Vidur's "
          f"planner {VIDUR_BLOCKS:,}. The runs here use Vidur's {VIDUR_BLOCKS:,} ==")


def scaling(replica_counts: list[int], one_replica: tuple[float, float]) -> None:
    """One run per replica count beyond 1; 1 replica is the median of the speed runs."""
    print("== scaling at 1 request/s per replica (round-robin); requests per wall-second (per CPU-second) ==")
    print(f"{'replicas':>8}{'requests':>10}{'wall s':>9}{'requests/s':>12}{'(CPU)':>9}{'vs 1 replica':>14}")
    base_wall, base_cpu = one_replica
    print(f"{1:>8}{len(load(1)):>10,}{'':>9}{base_wall:>12,.0f}{base_cpu:>9,.0f}{1:>13.2f}x  (median above)")
    for k in replica_counts:
        if k == 1:
            continue
        table = load(k)
        wall, cpu, sim, _ = run(table, k)
        rps, cps = len(table) / wall, len(table) / cpu
        print(f"{k:>8}{len(table):>10,}{wall:>9.1f}{rps:>12,.0f}{cps:>9,.0f}{rps / base_wall:>13.2f}x "
              f"({cps / base_cpu:.2f}x CPU)")
        if k in VIDUR_OUTPUTS:
            agreement(k, outputs(sim))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="runs of the 4,096-request replay (median reported)")
    ap.add_argument("--replicas", type=int, nargs="*", default=sorted(FILES), choices=sorted(FILES),
                    help="replica counts of the scaling runs (none: skip them)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    one_replica = speed(args.repeats)
    kv_capacity()
    if args.replicas:
        scaling(sorted(args.replicas), one_replica)


if __name__ == "__main__":
    main()
