"""The operating point of a workload on a cluster: GPU time per call and the calls/s the cluster can sustain,
with no prefix cache and with an infinite one.

``python -m sim.characterize coding-assistant software-team claude-code claude-code-v8 --gpu a100-40gb
--model llama-3.1-8b --gpus 8`` prints one row per workload (shipped workflow or shared trace), generated or
loaded with the model's context window as ``context_limit_tokens`` (so over-long conversations are compacted).
``--scale-to 2048,20`` first rescales each workflow to that mean prompt and output (``scale_to_means``).

The accounting is of a saturated replica in steady state, through the cost model's ``step_time`` only: every
step decodes one token for each of ``B`` running sequences and carries one chunk of prefill (chunked prefill,
vLLM v1). ``B`` is what the replica's KV cache holds: min(max_num_seqs, KV tokens / the workload's mean prompt +
output). A step's time is split between the calls it serves:

- a call's **prefill** is the extra time its chunks add to such a step: for each chunk of its uncached prompt
  tokens (at most max_num_batched_tokens - B per step, attending to everything before it),
  step_time([(chunk, before)], B, B x c) - step_time([], B, B x c), with c the workload's mean decode context;
- its **decode** is its share of the decode steps: output tokens x step_time([], B, B x its context) / B.

With every step full this adds up to the replica's busy time, so replicas / mean seconds per call is the most
calls/s the cluster can sustain (a bound: it ignores queueing, preemption and steps that are not full). "No
cache" computes every prompt token; "infinite cache" only those past the longest prefix any earlier call had
(``traces.characterize.prefix_hits``), at least one (vLLM recomputes the last token of a fully cached prompt).
GPU-seconds are replica-seconds times tp.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from frontend.engine_args import EngineArgs
from sim.costmodel import CostModel, make_cost_model
from sim.hardware import DEFAULT_GPU
from sim.models import load_model, num_gpu_blocks
from traces.characterize import prefix_hits
from traces.loaders import TRACES
from traces.schema import WorkloadError
from traces.workflow import load_workflow, make_workload, scale_to_means

DEFAULT_MODEL = "llama-3.1-8b"
PAPER_CALLS_PER_S, PAPER_GPUS = 132.0, 8  # Pythia's throughput target on 8 GPUs (MISSION.md)


def model_context_limit(model: str) -> int:
    """The model's context window (``max_position_embeddings``): vLLM's default ``max_model_len``."""
    return load_model(model).max_position_embeddings


@dataclass(frozen=True)
class OperatingPoint:
    workload: str
    calls: int
    calls_per_job: float
    mean_input_tokens: float
    mean_output_tokens: float
    input_over_output: float
    prefix_hit_bound: float
    decode_batch: int
    gpu_s_per_call_no_cache: float
    gpu_s_per_call_inf_cache: float
    prefill_share_no_cache: float
    prefill_share_inf_cache: float
    max_calls_per_s_no_cache: float
    max_calls_per_s_inf_cache: float

    @property
    def max_jobs_per_s(self) -> tuple[float, float]:
        return self.max_calls_per_s_no_cache / self.calls_per_job, self.max_calls_per_s_inf_cache / self.calls_per_job


def _prefill_s(cm: CostModel, new: int, before: int, chunk: int, batch: int, context_sum: int, base: float) -> float:
    """Extra step time of prefilling ``new`` tokens after ``before`` cached ones, in chunks riding on decode steps."""
    total, done = 0.0, 0
    while done < new:
        n = min(chunk, new - done)
        total += cm.step_time([(n, before + done)], batch, context_sum) - base
        done += n
    return total


def operating_point(df: pd.DataFrame, name: str, cm: CostModel, num_gpus: int,
                    engine: EngineArgs | None = None) -> OperatingPoint:
    """The operating point of one workload table on ``num_gpus`` GPUs of replicas costed by ``cm`` (engine
    arguments: vLLM's defaults unless given)."""
    engine = engine or EngineArgs()
    if df.empty:
        raise WorkloadError(f"{name}: no calls to characterize")
    replicas = num_gpus // cm.tp
    if replicas < 1:
        raise ValueError(f"{num_gpus} GPUs cannot hold one replica of tp={cm.tp}")
    n_in = df["input_tokens"].to_numpy(np.int64)
    n_out = df["output_tokens"].to_numpy(np.int64)
    kv_tokens = num_gpu_blocks(cm.gpu, cm.model, cm.tp, block_size=engine.block_size,
                               gpu_memory_utilization=engine.gpu_memory_utilization) * engine.block_size
    batch = int(max(1, min(engine.max_num_seqs, kv_tokens // max(1.0, float((n_in + n_out).mean())))))
    chunk = max(1, engine.max_num_batched_tokens - batch)
    mid = n_in + n_out // 2  # a call's context halfway through its decode
    context_sum = int(batch * mid.mean())
    base = cm.step_time([], batch, context_sum)
    decode = np.array([o * cm.step_time([], batch, batch * int(c)) / batch for o, c in zip(n_out, mid, strict=True)])
    hits = prefix_hits(df)
    prefill = {}
    for case, cached in (("no", np.zeros_like(n_in)), ("inf", np.minimum(hits, n_in - 1))):
        prefill[case] = np.array([_prefill_s(cm, int(n - k), int(k), chunk, batch, context_sum, base)
                                  for n, k in zip(n_in, cached, strict=True)])
    per_call = {case: float((p + decode).mean()) for case, p in prefill.items()}
    share = {case: float(p.sum() / (p.sum() + decode.sum())) for case, p in prefill.items()}
    jobs = df["job_id"].nunique() if (df["job_id"] >= 0).all() else len(df)
    return OperatingPoint(
        workload=name, calls=len(df), calls_per_job=len(df) / jobs, mean_input_tokens=float(n_in.mean()),
        mean_output_tokens=float(n_out.mean()), input_over_output=float(n_in.sum() / max(1, n_out.sum())),
        prefix_hit_bound=float(hits.sum() / n_in.sum()), decode_batch=batch,
        gpu_s_per_call_no_cache=cm.tp * per_call["no"], gpu_s_per_call_inf_cache=cm.tp * per_call["inf"],
        prefill_share_no_cache=share["no"], prefill_share_inf_cache=share["inf"],
        max_calls_per_s_no_cache=replicas / per_call["no"], max_calls_per_s_inf_cache=replicas / per_call["inf"])


def workload(name: str, context_limit_tokens: int, num_jobs: int, seed: int,
             scale_to: tuple[float, float] | None = None) -> tuple[str, pd.DataFrame]:
    """A shipped workflow (``num_jobs`` jobs, rescaled to the mean prompt and output ``scale_to``) or a whole
    shared trace, fitted to the model's window: (label, table)."""
    if name in TRACES:
        if scale_to is not None:
            raise WorkloadError(f"'{name}' is a recorded trace: only workflows can be rescaled (--scale-to)")
        return name, make_workload(name, seed=seed, context_limit_tokens=context_limit_tokens)
    wf = load_workflow(name)
    if scale_to is not None:
        wf = scale_to_means(wf, *scale_to, num_jobs=num_jobs, seed=seed, context_limit_tokens=context_limit_tokens,
                            name=f"{name} @ {scale_to[0]:g}/{scale_to[1]:g}")
    return wf.name, make_workload(wf, num_jobs=num_jobs, seed=seed, context_limit_tokens=context_limit_tokens)


def format_table(points: Sequence[OperatingPoint]) -> str:
    """A Markdown table: (no cache, infinite cache) pairs for GPU-s per call, prefill share, calls/s and jobs/s."""
    rows = ["| workload | calls/job | mean prompt | mean output | in:out | hit bound | decode batch "
            "| GPU-s/call (no cache / inf. cache) | prefill share (no / inf.) | max calls/s (no / inf.) "
            "| max jobs/s (no / inf.) |", "|" + "---|" * 11]
    for p in points:
        jobs = p.max_jobs_per_s
        rows.append(f"| {p.workload} | {p.calls_per_job:.1f} | {p.mean_input_tokens:,.0f} | {p.mean_output_tokens:.0f} "
                    f"| {p.input_over_output:.0f} | {100 * p.prefix_hit_bound:.1f} % | {p.decode_batch} "
                    f"| {p.gpu_s_per_call_no_cache:.3f} / {p.gpu_s_per_call_inf_cache:.3f} "
                    f"| {100 * p.prefill_share_no_cache:.0f} % / {100 * p.prefill_share_inf_cache:.0f} % "
                    f"| {p.max_calls_per_s_no_cache:.1f} / {p.max_calls_per_s_inf_cache:.1f} "
                    f"| {jobs[0]:.3g} / {jobs[1]:.3g} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim.characterize", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("names", nargs="+", help="shipped workflows or shared traces")
    parser.add_argument("--gpu", default=DEFAULT_GPU, help="GPU kind")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model short name or config.json path")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs in the cluster")
    parser.add_argument("--tp", type=int, default=1, help="GPUs per replica")
    parser.add_argument("--context-limit", type=int, default=None,
                        help="context window in tokens (default: the model's max_position_embeddings)")
    parser.add_argument("--num-jobs", type=int, default=200, help="jobs generated per workflow")
    parser.add_argument("--seed", type=int, default=0, help="workload seed")
    parser.add_argument("--scale-to", metavar="PROMPT,OUTPUT", default=None,
                        help="rescale each workflow to this mean prompt and mean output (tokens), e.g. 2048,20")
    parser.add_argument("--json", action="store_true", help="print one JSON object per workload instead")
    args = parser.parse_args(argv)
    if args.gpus < 1 or args.num_jobs < 1:
        parser.error(f"--gpus and --num-jobs must be >= 1 (got {args.gpus}, {args.num_jobs})")
    try:
        scale_to = None if args.scale_to is None else tuple(float(x) for x in args.scale_to.split(","))
    except ValueError:
        scale_to = ()
    if scale_to is not None and len(scale_to) != 2:
        parser.error(f"--scale-to {args.scale_to!r}: expected PROMPT,OUTPUT mean tokens, e.g. 2048,20")
    try:
        cm = make_cost_model(args.gpu, args.model, args.tp)
        limit = args.context_limit or model_context_limit(args.model)
        points = [operating_point(table, label, cm, args.gpus) for label, table in
                  (workload(n, limit, args.num_jobs, args.seed, scale_to) for n in args.names)]
    except (ValueError, WorkloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        for p in points:
            print(json.dumps(asdict(p)))
        return 0
    print(f"{cm.model.name} on {args.gpus} x {cm.gpu.name} (tp={cm.tp}), context limit {limit:,} tokens")
    print(format_table(points))
    budget = PAPER_GPUS / PAPER_CALLS_PER_S
    print(f"The paper's {PAPER_CALLS_PER_S:.0f} calls/s on {PAPER_GPUS} GPUs leaves {1e3 * budget:.0f} ms of GPU "
          f"time per call.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
