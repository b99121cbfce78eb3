"""Policies by name: ``make_router("pythia")``, ``make_scaler("hpa", target=0.6)``.

A registry maps a name to a factory whose keyword arguments are the policy's configuration; there is one per role
of a system (``REGISTRIES``). The contracts (``policies.api``) import none of their implementations; this module
imports them all, so filling a registry needs no import side effect. The RL scaler's factory imports
``policies.rl`` (and, when a checkpoint is loaded, stable-baselines3) only when one is made. Predictors and
prefetchers (the profiler of issue 16) have no entry yet; a front end takes any object through ``Hooks``.
"""

from __future__ import annotations

from collections.abc import Callable

from policies import autellix, continuum, routers, scalers, thunderagent
from policies.api import Router, Scaler


def _rl_scaler(**params: object) -> Scaler:
    from policies.rl import RLScaler

    return RLScaler(make_base=make_scaler, **params)  # type: ignore[arg-type]


ROUTERS: dict[str, Callable[..., Router]] = {
    "round_robin": routers.RoundRobin,
    "random": routers.Random,
    "least_loaded": routers.LeastLoaded,
    "power_of_two": routers.PowerOfTwo,
    "session_affinity": routers.SessionAffinity,
    "production_stack": routers.ProductionStack,
    "cache_aware": routers.CacheAware,
    "preble": routers.Preble,
    "pythia": routers.Pythia,
    "autellix": autellix.LocalityBalancer,
    "thunderagent": thunderagent.ThunderAgent,
}
SCALERS: dict[str, Callable[..., Scaler]] = {
    "static": scalers.Static,
    "hpa": scalers.HPA,
    "kpa": scalers.KPA,
    "pythia": scalers.Pythia,
    "rl": _rl_scaler,
}
PRIORITIZERS: dict[str, Callable[..., object]] = {
    "autellix": autellix.AttainedService,
    "program_fcfs": continuum.ProgramFCFS,
}
RETENTIONS: dict[str, Callable[..., object]] = {"continuum": continuum.ToolTimeTTL}
GATES: dict[str, Callable[..., object]] = {"thunderagent": thunderagent.ThunderAgent}
PREFETCHERS: dict[str, Callable[..., object]] = {}
PREDICTORS: dict[str, Callable[..., object]] = {}
REGISTRIES: dict[str, dict[str, Callable[..., object]]] = {
    "router": ROUTERS, "scaler": SCALERS, "prioritizer": PRIORITIZERS, "retention": RETENTIONS,
    "prefetcher": PREFETCHERS, "predictor": PREDICTORS, "gate": GATES}


def _lookup(registry: dict[str, Callable], kind: str, name: str, params: dict) -> object:
    if name not in registry:
        raise KeyError(f"unknown {kind} '{name}'; known {kind}s: {', '.join(sorted(registry))}")
    return registry[name](**params)


def make_router(name: str, **params: object) -> Router:
    return _lookup(ROUTERS, "router", name, params)  # type: ignore[return-value]


def make_scaler(name: str, **params: object) -> Scaler:
    return _lookup(SCALERS, "scaler", name, params)  # type: ignore[return-value]
