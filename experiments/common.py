"""What the experiments share: one run per point (simulated, or on real vLLM servers when a sweep is given a
``RealConfig``), independent runs in worker processes or on a Ray cluster (``parallel_map``), and the
paper-like workloads and their loads."""

from __future__ import annotations

import multiprocessing
import os
import signal
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

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
    slo_s: float | None = None  # every call's end-to-end objective (None: the workflow's own)


def workload_table(p: Point) -> pd.DataFrame:
    if p.arrivals:
        t = make_workload(p.workload, arrivals=p.arrivals, duration_s=p.duration_s, seed=p.seed)
    else:
        t = make_workload(p.workload, rate=p.rate, duration_s=p.duration_s, seed=p.seed)
    return t if p.slo_s is None else t.assign(slo_s=float(p.slo_s))


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


class RunsFailed(RuntimeError):
    """Some runs failed (after their retry, on Ray); every other run finished. ``failures`` maps an input's
    position to (the input, the error); ``results`` holds the other runs' results (None where one failed)."""

    def __init__(self, failures: dict[int, tuple[object, str]], results: list):
        self.failures, self.results = failures, results
        lines = [f"  {item!r}:\n    {error.strip().splitlines()[-1]}" for item, error in failures.values()]
        first = next(iter(failures.values()))[1]
        super().__init__(f"{len(failures)} of {len(results)} runs failed:\n" + "\n".join(lines)
                         + f"\nthe first one's error:\n{first}")


def parallel_map(fn: Callable, items: Iterable, jobs: int = 1, desc: str = "runs") -> list:
    """Map over independent runs; results keep the input order. Runs go to the Ray cluster this process is
    connected to (``ray_cluster``), else to ``jobs`` worker processes (1: this process). A run that fails does
    not stop the others: once all are done, ``RunsFailed`` names each failed input and its error."""
    items = list(items)
    results: list = [None] * len(items)
    failures: dict[int, tuple[object, str]] = {}
    for i, ok, value in completions(fn, items, jobs, desc):
        if ok:
            results[i] = value
        else:
            failures[i] = (items[i], value)
    if failures:
        raise RunsFailed(dict(sorted(failures.items())), results)
    return results


def completions(fn: Callable, items: Sequence, jobs: int = 1, desc: str = "runs") -> Iterator[tuple[int, bool, Any]]:
    """``(position, True, fn(item))`` or ``(position, False, error text)`` for every item, as runs complete, with a
    progress bar. Where they run: as ``parallel_map``. A failed run is retried once on Ray (a lost node or worker
    and an exception alike); locally an exception is reported at once (the simulator is deterministic, so a
    retry in the same place cannot help)."""
    if _RAY["address"] is not None:
        runs = _ray_completions(fn, items)
    elif jobs <= 1:
        runs = (_attempt(fn, i, x) for i, x in enumerate(items))
    else:
        runs = _pool_completions(fn, items, jobs)
    with tqdm(total=len(items), desc=desc, unit="run") as bar:
        for run in runs:
            bar.update()
            yield run


def _attempt(fn: Callable, i: int, x: object) -> tuple[int, bool, Any]:
    try:
        return i, True, fn(x)
    except Exception:
        return i, False, traceback.format_exc()


def _worker_init() -> None:
    """Pool workers leave Ctrl-C to the parent (which terminates them) and die on SIGTERM, whatever the
    parent's handlers were when they were forked."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _pool_completions(fn: Callable, items: Sequence, jobs: int) -> Iterator[tuple[int, bool, Any]]:
    # multiprocessing.Pool rather than ProcessPoolExecutor: leaving the `with` block on an exception (Ctrl-C,
    # SIGTERM turned into SystemExit by experiments.run) terminates the workers instead of waiting for their runs.
    with multiprocessing.Pool(min(jobs, max(len(items), 1)), initializer=_worker_init) as pool:
        yield from pool.imap_unordered(partial(_call, fn), enumerate(items))


def _call(fn: Callable, ix: tuple[int, object]) -> tuple[int, bool, Any]:
    return _attempt(fn, *ix)


# --- Ray (the optional `ray` extra): only this section imports it, and only when a cluster is asked for ---

_RAY: dict[str, str | None] = {"address": None}  # set by ray_cluster while this process is connected


@contextmanager
def ray_cluster(address: str | None) -> Iterator[None]:
    """Send ``parallel_map``'s runs to a Ray cluster while inside: ``address`` "HOST:PORT" (a head started by
    ``ray start --head``), or "auto": the cluster this machine belongs to, else a new one on this machine bound
    to the loopback address, stopped again on the way out. A process already connected (a script that called
    ``ray.init``) keeps its connection, whatever ``address`` says. ``None``: nothing changes."""
    if address is None:
        yield
        return
    import ray

    connected = ray.is_initialized()
    handler = signal.getsignal(signal.SIGTERM)  # ray.init installs its own; ours unwinds (and shuts Ray down)
    if not connected:
        try:
            ray.init(address=address, log_to_driver=False)
        except ConnectionError:
            if address != "auto":
                raise
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a throwaway local cluster reports to nobody
            # Ray runs its workers at nice 15 by default; on a shared machine they then get a fraction of the CPU
            # that --jobs' processes (at this process's niceness) get.
            os.environ.setdefault("RAY_worker_niceness", "0")
            ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
        signal.signal(signal.SIGTERM, handler)
    _RAY["address"] = address
    try:
        yield
    finally:
        _RAY["address"] = None
        if not connected:
            ray.shutdown()


def _ray_completions(fn: Callable, items: Sequence) -> Iterator[tuple[int, bool, Any]]:
    import ray

    # max_retries: a task whose worker or node died runs once more; retry_exceptions: so does one that raised.
    task = ray.remote(max_retries=1, retry_exceptions=True)(_apply)
    fn_ref = ray.put(fn)
    position = {task.remote(fn_ref, x): i for i, x in enumerate(items)}
    pending = list(position)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ref = done[0]
            try:
                yield position[ref], True, ray.get(ref)
            except ray.exceptions.RayError as e:
                yield position[ref], False, str(e)
    finally:
        for ref in pending:  # interrupted: the cluster stops what is still queued or running
            ray.cancel(ref, force=True)


def _apply(fn: Callable, x: object) -> Any:
    return fn(x)


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
# The agent workflows are fitted to traces, which carry no objective. An agent's tool loop waits on every call, so
# each call gets one: 10 s end to end, the objective sim.episodes gives trace calls (EnvConfig.trace_slo_s).
AGENT_SLO_S = 10.0


def agent_loads(workload: str, quick: bool) -> tuple[float, ...]:
    ref = AGENT_REFERENCE_LOAD[workload]
    return (ref,) if quick else tuple(f * ref for f in AGENT_LOAD_FACTORS)


def agent_load_factor(df: pd.DataFrame) -> list[float]:
    """Each summary row's offered load as a multiple of its agent workload's reference load."""
    return [round(r / AGENT_REFERENCE_LOAD[w], 6) for w, r in zip(df["workload"], df["rate"], strict=True)]


def agent_duration(quick: bool) -> float:
    """Seconds of job arrivals per agent-workload run (the jobs then run to completion, 20-50 minutes)."""
    return 300.0 if quick else 600.0


def burst_arrivals(workload: str) -> str:
    """On/off job arrivals around the reference load: 30 s bursts at 3x, 60 s lulls at 0.25x (mean ~1.2x)."""
    ref = {**REFERENCE_LOAD, **AGENT_REFERENCE_LOAD}[workload]
    return f"onoff:{3 * ref:g},{0.25 * ref:g},30,60"
