"""What the experiments share: one run per point (simulated, or on real vLLM servers when a sweep is given a
``RealConfig``), sweeps over points in worker processes, and the paper-like workloads and their loads."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import pandas as pd  # noqa: E402
from tqdm import tqdm  # noqa: E402

from frontend.metrics import summarize_results  # noqa: E402
from frontend.results import Results  # noqa: E402
from policies.systems import System, make_system, system  # noqa: E402
from sim.cluster import ClusterConfig, simulate  # noqa: E402
from traces.workflow import make_workload  # noqa: E402

if TYPE_CHECKING:
    from real import RealConfig


def run_system(table: pd.DataFrame, name: str, base: ClusterConfig) -> Results:
    """Simulate ``table`` on ``base`` served by system ``name`` (its policies, its engine arguments, its own initial
    replica count)."""
    p = make_system(name)
    return simulate(table, cluster_config(system(name), base), p.router, p.scaler, hooks=p.hooks)


def cluster_config(sys: System, base: ClusterConfig) -> ClusterConfig:
    pool = base.pools[0]
    n = base.num_gpus // pool.tp if sys.initial_replicas is None else sys.initial_replicas
    return replace(base, pools=(replace(pool, initial_replicas=n),), engine=replace(base.engine, **sys.engine))


def summary_row(res: Results, **labels: object) -> dict:
    return {**labels, **summarize_results(res)}


@dataclass(frozen=True)
class Point:
    """One simulated run: a workflow workload at an offered load (jobs/s), served by one system."""

    workload: str
    rate: float
    system: str
    duration_s: float
    seed: int = 0
    arrivals: str | None = None  # e.g. "onoff:...": overrides the Poisson arrivals at `rate`
    cluster: ClusterConfig = ClusterConfig()  # GPUs, model, engine arguments


def workload_table(p: Point) -> pd.DataFrame:
    if p.arrivals:
        return make_workload(p.workload, arrivals=p.arrivals, duration_s=p.duration_s, seed=p.seed)
    return make_workload(p.workload, rate=p.rate, duration_s=p.duration_s, seed=p.seed)


def run_point(p: Point) -> Results:
    return run_system(workload_table(p), p.system, p.cluster)


def run_point_real(p: Point, servers: RealConfig) -> Results:
    """The same point on real vLLM servers, in wall-clock time: the system starts ``servers.capacity``
    replicas (or its own initial count), and the same router and scaler objects drive them."""
    import real

    sys, pol = system(p.system), make_system(p.system)
    n = servers.capacity if sys.initial_replicas is None else sys.initial_replicas
    servers = replace(servers, num_replicas=n, engine=replace(servers.engine, **pol.engine))
    return real.execute(workload_table(p), servers, pol.router, pol.scaler, hooks=pol.hooks)


def summarize_point(p: Point, real: RealConfig | None = None) -> dict:
    """Run one point (simulated, or on ``real`` servers) and reduce it to its summary row."""
    res = run_point(p) if real is None else run_point_real(p, real)
    return summary_row(res, workload=p.workload, rate=p.rate, system=p.system, label=system(p.system).label,
                       seed=p.seed)


def sweep(points: Iterable[Point], jobs: int = 1, real: RealConfig | None = None) -> pd.DataFrame:
    """Summary rows of the points; on real servers one point at a time (they share the devices)."""
    if real is not None:
        return pd.DataFrame(parallel_map(partial(summarize_point, real=real), points, 1, desc="real vLLM"))
    return pd.DataFrame(parallel_map(summarize_point, points, jobs, desc="simulate"))


def parallel_map(fn: Callable, items: Iterable, jobs: int = 1, desc: str = "runs") -> list:
    """Map over independent runs, in worker processes when jobs > 1; results keep the input order."""
    items = list(items)
    if jobs <= 1:
        return [fn(x) for x in tqdm(items, desc=desc, unit="run")]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, unit="run"))


# The two paper-like workloads, the offered loads (jobs/s) swept for them, and the reference load at which
# single-load metrics (latency, hit rate, memory spread, JCT) are compared.
WORKLOADS = ("coding-assistant-chat", "software-team-chat")
LOADS = {"coding-assistant-chat": (0.5, 1.0, 1.5, 2.0), "software-team-chat": (0.25, 0.5, 0.75, 1.0)}
REFERENCE_LOAD = {"coding-assistant-chat": 1.0, "software-team-chat": 0.5}


def loads(workload: str, quick: bool) -> tuple[float, ...]:
    ls = LOADS[workload]
    return (ls[0], REFERENCE_LOAD[workload]) if quick else ls


def duration(quick: bool) -> float:
    """Simulated seconds of arrivals per run (jobs then run to completion)."""
    return 120.0 if quick else 300.0


# The agent-shaped workloads (fitted to Claude Code; ``python -m sim.characterize`` prints their operating points):
# reference loads about 0.15 and 0.1 jobs/s on 8 x A100-40GB; their jobs run 20-50 minutes, mostly tool time.
AGENT_WORKLOADS = ("coding-assistant", "software-team")
AGENT_REFERENCE_LOAD = {"coding-assistant": 0.15, "software-team": 0.1}
AGENT_LOAD_FACTORS = (0.5, 1.0, 2.0, 4.0)  # swept for throughput, x the reference load


def agent_loads(workload: str, quick: bool) -> tuple[float, ...]:
    ref = AGENT_REFERENCE_LOAD[workload]
    return (ref,) if quick else tuple(f * ref for f in AGENT_LOAD_FACTORS)


def agent_duration(quick: bool) -> float:
    """Seconds of job arrivals per agent-workload run (the jobs then run to completion, 20-50 minutes)."""
    return 300.0 if quick else 600.0


def burst_arrivals(workload: str) -> str:
    """On/off job arrivals around the reference load: 30 s bursts at 3x, 60 s lulls at 0.25x (mean ~1.2x)."""
    ref = {**REFERENCE_LOAD, **AGENT_REFERENCE_LOAD}[workload]
    return f"onoff:{3 * ref:g},{0.25 * ref:g},30,60"
