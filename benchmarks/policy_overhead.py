"""Policy decision overhead: wall time of every router's ``route()`` per call and every scaler's ``decide()`` per
control interval, at the paper's reference load (coding-assistant-chat workflow, 1 job/s, 8 x A100-40GB, Llama-3.1-8B).

The paper claims its interface decides in under 2 ms. The decisions are timed by a proxy around the policy object,
so the simulator itself records no wall times and its results stay bit-identical; the real executor records the
same time per call (``route_overhead_s`` of its results; fig. 13 reports it on real servers). Routers run without a
scaler and scalers behind the round-robin router, so each time is the policy's own.

    python benchmarks/policy_overhead.py              # 600 s of workload per policy (~2 min)
    python benchmarks/policy_overhead.py --duration 120
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from dataclasses import dataclass, field

import numpy as np

import policies.rl  # noqa: F401  (these three fill the registries)
import policies.routers  # noqa: F401
import policies.scalers  # noqa: F401
from experiments.common import REFERENCE_LOAD
from policies.registry import ROUTERS, SCALERS, make_router, make_scaler
from sim.cluster import ClusterConfig, PoolConfig, simulate
from traces.workflow import make_workload

WORKLOAD = "coding-assistant-chat"
CLAIM_MS = 2.0


@dataclass
class Timed:
    """Forwards ``route`` / ``decide`` to ``policy`` and keeps the wall time of each call."""

    policy: object
    seconds: list[float] = field(default_factory=list)

    def route(self, request, replicas, now):
        t = time.perf_counter()
        out = self.policy.route(request, replicas, now)  # type: ignore[attr-defined]
        self.seconds.append(time.perf_counter() - t)
        return out

    def decide(self, obs):
        t = time.perf_counter()
        out = self.policy.decide(obs)  # type: ignore[attr-defined]
        self.seconds.append(time.perf_counter() - t)
        return out


def row(kind: str, name: str, t: Timed) -> str:
    ms = np.array(t.seconds) * 1e3
    return (f"{kind:6s} {name:16s} {len(ms):7d}  {np.median(ms):8.3f}  {np.percentile(ms, 99):8.3f}  {ms.max():8.3f}"
            f"  {'yes' if np.percentile(ms, 99) < CLAIM_MS else 'NO'}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of workload per policy")
    args = ap.parse_args(argv)
    table = make_workload(WORKLOAD, rate=REFERENCE_LOAD[WORKLOAD], duration_s=args.duration, seed=0)
    cfg = ClusterConfig(num_gpus=8, pools=(PoolConfig(initial_replicas=8),))
    print(f"{WORKLOAD} at {REFERENCE_LOAD[WORKLOAD]} jobs/s for {args.duration:.0f} s: {len(table)} calls, "
          f"8 x {cfg.gpu}, {cfg.pools[0].model}")
    print(f"{'policy':23s} {'calls':>7s}  {'p50 ms':>8s}  {'p99 ms':>8s}  {'max ms':>8s}  p99 < {CLAIM_MS:g} ms")
    for name in sorted(ROUTERS):
        timed = Timed(make_router(name))
        simulate(table, cfg, timed)
        print(row("route", name, timed))
    for name in sorted(SCALERS):
        if name == "rl" and importlib.util.find_spec("stable_baselines3") is None:
            print("decide rl: skipped (needs the rl extra)")
            continue
        timed = Timed(make_scaler(name))
        simulate(table, cfg, make_router("round_robin"), timed)
        print(row("decide", name, timed))


if __name__ == "__main__":
    main()
