"""Named serving systems: the bundle of policies one system under test runs with.

``make_system("pythia")`` gives fresh policy objects (they keep state, so one set per run); ``SYSTEMS`` says
what each name bundles. Every system starts with the whole cluster (one replica per GPU) unless it names its
own ``initial_replicas``; autoscalers then shrink and grow it, so no system pays a cold-start ramp the others
do not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from policies.api import Router, Scaler
from policies.registry import make_router, make_scaler


@dataclass(frozen=True)
class System:
    """A serving system under test: a router, an optional scaler, and how many replicas it starts with."""

    label: str
    router: str
    scaler: str | None = None
    initial_replicas: int | None = None  # None: all GPUs
    router_params: dict = field(default_factory=dict)
    scaler_params: dict = field(default_factory=dict)


@dataclass
class Policies:
    """The fresh policy objects of one run of a system."""

    router: Router
    scaler: Scaler | None


SYSTEMS: dict[str, System] = {
    "vllm": System("vLLM (round-robin)", "round_robin"),
    "vllm-hpa": System("vLLM + K8s HPA", "round_robin", "hpa"),
    "sglang": System("SGLang cache-aware", "cache_aware"),
    "pythia": System("Pythia", "pythia", "pythia"),
    "pythia-routing": System("Pythia routing only", "pythia"),
    "pythia-scaling": System("Pythia scaling only", "round_robin", "pythia"),
}


def system(name: str) -> System:
    if name not in SYSTEMS:
        raise KeyError(f"unknown system '{name}'; known systems: {', '.join(SYSTEMS)}")
    return SYSTEMS[name]


def make_system(name: str) -> Policies:
    s = system(name)
    return Policies(make_router(s.router, **s.router_params),
                    make_scaler(s.scaler, **s.scaler_params) if s.scaler else None)
