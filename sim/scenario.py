"""One "what if" as data: a workload at a load, on a cluster (GPU, model, tp, GPUs), served by a system or a
router + scaler, with vLLM engine arguments. ``simulate_scenario`` runs it; ``python -m sim.run`` and sweeps
(``experiments.run sweep``) build ``Scenario`` objects from flags and grid files.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from frontend.checks import check_choice, check_int, check_optional_float
from frontend.engine_args import EngineArgs
from frontend.metrics import summarize_results
from frontend.results import Results
from policies.api import NO_HOOKS
from policies.registry import ROUTERS, SCALERS, make_router, make_scaler
from policies.systems import SYSTEMS, make_system, system
from sim.cluster import MAX_GPUS, ClusterConfig, PoolConfig, simulate
from sim.hardware import get_gpu
from sim.models import load_model
from traces.loaders import TRACES
from traces.workflow import WORKFLOWS, make_workload

MAX_SEED = 2**32 - 1  # numpy's seeds, as experiments.run takes them


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
        check_workload(self.workload)
        check_optional_float("Scenario.rate", self.rate, 0.0, open_low=True)
        check_optional_float("Scenario.duration_s", self.duration_s, 0.0, open_low=True)
        check_optional_float("Scenario.slo_s", self.slo_s, 0.0, open_low=True)
        check_int("Scenario.seed", self.seed, 0, MAX_SEED)
        check_int("Scenario.tp", self.tp, 1, MAX_GPUS)
        check_int("Scenario.gpus", self.gpus, 1, MAX_GPUS)
        if self.replicas is not None:
            check_int("Scenario.replicas", self.replicas, 0, MAX_GPUS)
        gpu = get_gpu(self.gpu)
        if self.engine_version is not None:
            check_choice(f"Scenario.engine_version (on {self.gpu})", self.engine_version, gpu.engines)
        load_model(self.model).check_tp(self.tp)
        for kind, name, known in (("system", self.system, SYSTEMS), ("router", self.router, ROUTERS),
                                  ("scaler", self.scaler, SCALERS)):
            if name is not None:
                check_choice(f"Scenario.{kind}", name, known)
        if not isinstance(self.workload_options, dict):
            raise ValueError(f"Scenario.workload_options={self.workload_options!r} must be a dict of make_workload "
                             "keywords")
        if (self.system is None) == (self.router is None):
            raise ValueError(f"Scenario: give exactly one of system (got {self.system!r}) or router (got "
                             f"{self.router!r})")
        if self.system is not None and self.scaler is not None:
            raise ValueError(f"Scenario: system {self.system!r} brings its own scaler; scaler={self.scaler!r} "
                             "goes with router=")
        if self.tp > self.gpus:
            raise ValueError(f"Scenario.tp={self.tp}: one replica needs {self.tp} GPUs but the cluster has "
                             f"gpus={self.gpus}")
        n = self.initial_replicas()
        if n * self.tp > self.gpus:
            raise ValueError(f"Scenario.replicas={n}: {n} replicas of tp={self.tp} need {n * self.tp} GPUs but the "
                             f"cluster has gpus={self.gpus}; lower replicas or raise gpus")
        self.cluster()  # the cluster's own checks (engine version on this GPU)

    def initial_replicas(self) -> int:
        """``replicas``, else the system's own choice, else one replica per ``tp`` GPUs."""
        own = system(self.system).initial_replicas if self.system is not None else None
        n = self.replicas if self.replicas is not None else own
        return self.gpus // self.tp if n is None else n

    def cluster(self) -> ClusterConfig:
        """The simulated cluster: ``gpus`` GPUs of kind ``gpu``, one pool of ``model`` replicas on ``tp`` GPUs."""
        pool = PoolConfig(model=self.model, tp=self.tp, initial_replicas=self.initial_replicas())
        engine = self.engine if self.system is None else replace(self.engine, **system(self.system).engine)
        return ClusterConfig(gpu=self.gpu, num_gpus=self.gpus, pools=(pool,), engine=engine,
                             engine_version=self.engine_version)

    def window(self) -> int:
        """The context window every call must fit: ``engine.max_model_len``, else the model's."""
        return self.engine.max_model_len or load_model(self.model).max_position_embeddings

    def table(self) -> pd.DataFrame:
        """The workload; agent conversations are compacted at the served window (as their harness would), unless
        ``workload_options`` names another ``context_limit_tokens``."""
        options = {"context_limit_tokens": self.window(), **self.workload_options}
        t = make_workload(self.workload, rate=self.rate, duration_s=self.duration_s if self.workload not in TRACES
                          else None, seed=self.seed, **options)
        if self.slo_s is not None:
            t = t.assign(slo_s=np.full(len(t), float(self.slo_s)))
        return t

    def with_(self, **changes: object) -> Scenario:
        return replace(self, **changes)


def check_workload(workload: object) -> None:
    """A shipped workflow, a shared trace, or a workflow.yaml that exists."""
    if not isinstance(workload, str) or not workload:
        raise ValueError(f"Scenario.workload={workload!r} must be a workflow or trace name, or a workflow.yaml path")
    if workload not in WORKFLOWS and workload not in TRACES and not Path(workload).is_file():
        raise ValueError(f"Scenario.workload={workload!r} is not a shipped workflow ({', '.join(WORKFLOWS)}), not a "
                         f"shared trace ({', '.join(TRACES)}) and no such file")


def simulate_scenario(s: Scenario, *, progress: bool = False, table: pd.DataFrame | None = None) -> Results:
    """Run the scenario in the simulator (fresh policy objects every time). ``table``: its workload, when already
    built (``s.table()``, e.g. once for several systems on the same workload)."""
    if s.system is not None:
        p = make_system(s.system)
        router, scaler, hooks = p.router, p.scaler, p.hooks
    else:
        router, scaler, hooks = make_router(s.router), make_scaler(s.scaler) if s.scaler else None, NO_HOOKS
    return simulate(s.table() if table is None else table, s.cluster(), router, scaler, progress=progress, hooks=hooks)


def summarize_scenario(s: Scenario) -> dict:
    """The scenario's summary metrics (``frontend.metrics.summarize``)."""
    return summarize_results(simulate_scenario(s))
