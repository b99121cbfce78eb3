"""One "what if" as data: a workload at a load, on a cluster (GPU, model, tp, GPUs), served by a system or a
router + scaler, with vLLM engine arguments. ``simulate_scenario`` runs it; ``python -m sim.run`` and sweeps
(``experiments.run sweep``) build ``Scenario`` objects from flags and grid files.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from frontend.engine_args import EngineArgs
from frontend.metrics import summarize
from frontend.results import Results
from policies.registry import make_router, make_scaler
from policies.systems import make_system, system
from sim.cluster import ClusterConfig, PoolConfig, simulate
from traces.loaders import TRACES
from traces.workflow import make_workload


@dataclass(frozen=True)
class Scenario:
    """Everything one simulated run depends on. Give a ``system`` (a named bundle, ``policies.systems``) or a
    ``router`` (and optionally a ``scaler``), not both."""

    workload: str = "coding-assistant"  # a shipped workflow, a workflow.yaml path, or a shared trace's name
    rate: float | None = None  # workflows: jobs/s (default 1); agent-session traces: sessions/s
    duration_s: float | None = 300.0  # workflows: seconds of job arrivals (traces have their own length)
    seed: int = 0
    gpu: str = "a100-40gb"
    model: str = "llama-3.1-8b"
    tp: int = 1
    gpus: int = 8
    replicas: int | None = None  # replicas at t=0; None: the system's own choice (all GPUs, for most)
    system: str | None = None
    router: str | None = None
    scaler: str | None = None
    engine: EngineArgs = EngineArgs()
    engine_version: str | None = None  # cost model's engine generation: vllm-v1 (default) or vllm-v0
    slo_s: float | None = None  # overrides every call's SLO (None: the workload's own)
    workload_options: dict = field(default_factory=dict)  # further make_workload keywords (traces: window_s, ...)

    def __post_init__(self) -> None:
        if (self.system is None) == (self.router is None):
            raise ValueError(f"Scenario: give exactly one of system (got {self.system!r}) or router (got "
                             f"{self.router!r})")
        if self.system is not None and self.scaler is not None:
            raise ValueError(f"Scenario: system {self.system!r} brings its own scaler; scaler={self.scaler!r} "
                             "goes with router=")

    def cluster(self) -> ClusterConfig:
        """The simulated cluster: ``gpus`` GPUs of kind ``gpu``, one pool of ``model`` replicas on ``tp`` GPUs."""
        if self.system is not None and self.replicas is None:
            own = system(self.system).initial_replicas
            replicas = self.gpus // self.tp if own is None else own
        else:
            replicas = self.gpus // self.tp if self.replicas is None else self.replicas
        return ClusterConfig(gpu=self.gpu, num_gpus=self.gpus,
                             pools=(PoolConfig(model=self.model, tp=self.tp, initial_replicas=replicas),),
                             engine=self.engine, engine_version=self.engine_version)

    def table(self) -> pd.DataFrame:
        t = make_workload(self.workload, rate=self.rate, duration_s=self.duration_s if self.workload not in TRACES
                          else None, seed=self.seed, **self.workload_options)
        if self.slo_s is not None:
            t = t.assign(slo_s=np.full(len(t), float(self.slo_s)))
        return t

    def with_(self, **changes: object) -> Scenario:
        return replace(self, **changes)


def simulate_scenario(s: Scenario, *, progress: bool = False) -> Results:
    """Run the scenario in the simulator (fresh policy objects every time)."""
    if s.system is not None:
        p = make_system(s.system)
        router, scaler = p.router, p.scaler
    else:
        router, scaler = make_router(s.router), make_scaler(s.scaler) if s.scaler else None
    return simulate(s.table(), s.cluster(), router, scaler, progress=progress)


def summarize_scenario(s: Scenario) -> dict:
    """The scenario's summary metrics (``frontend.metrics.summarize``)."""
    res = simulate_scenario(s)
    return summarize(res.requests, res.jobs, res.timeseries, res.cluster)
