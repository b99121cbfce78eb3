"""Named serving systems: the bundle of policies one system under test runs with.

``make_system("autellix")`` gives fresh policy objects (they keep state, so one set per run) and the vLLM engine
arguments the system needs; ``SYSTEMS`` says what each name bundles. A backend runs the bundle unchanged:
``sim.cluster.simulate(table, cfg, p.router, p.scaler, hooks=p.hooks)`` with ``p.engine`` applied to the cluster's
``EngineArgs``, or ``real.execute`` likewise. Every system starts with the whole cluster (one replica per GPU)
unless it names its own ``initial_replicas``; autoscalers then shrink and grow it, so no system pays a cold-start
ramp the others do not.

The baselines model published systems with their papers' defaults (each policy's docstring cites its source and
says where this model differs); what a front end on vLLM cannot do is simulator-only and says so
(``EngineArgs.simulator_only``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from policies.api import Hooks, Router, Scaler
from policies.registry import REGISTRIES

ROLES = ("router", "scaler", "prioritizer", "retention", "prefetcher", "predictor", "gate")


@dataclass(frozen=True)
class System:
    """A serving system under test: a policy per role by registered name (``params[role]``: its keyword arguments),
    the engine arguments it needs (``EngineArgs`` fields), and how many replicas it starts with. Roles that name
    the same policy with the same arguments get one object (ThunderAgent routes and gates with one program table)."""

    label: str
    router: str
    scaler: str | None = None
    prioritizer: str | None = None
    retention: str | None = None
    prefetcher: str | None = None
    predictor: str | None = None
    gate: str | None = None
    params: dict[str, dict] = field(default_factory=dict)
    engine: dict = field(default_factory=dict)
    initial_replicas: int | None = None  # None: all GPUs


@dataclass
class Policies:
    """The fresh policy objects of one run of a system, and the engine arguments it runs with."""

    router: Router
    scaler: Scaler | None
    hooks: Hooks = field(default_factory=Hooks)
    engine: dict = field(default_factory=dict)


SYSTEMS: dict[str, System] = {
    "vllm": System("vLLM (round-robin)", "round_robin"),
    "vllm-hpa": System("vLLM + K8s HPA", "round_robin", "hpa"),
    "production-stack": System("vLLM + production-stack", "production_stack"),
    "sglang": System("SGLang cache-aware", "cache_aware"),
    "autellix": System("Autellix", "autellix", prioritizer="autellix", engine={"scheduling_policy": "priority"}),
    "continuum": System("Continuum", "session_affinity", prioritizer="program_fcfs", retention="continuum",
                        engine={"scheduling_policy": "priority"}),
    "thunderagent": System("ThunderAgent", "thunderagent", gate="thunderagent"),
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
    built: list[tuple[object, dict, object]] = []  # (factory, params, policy) made for this run
    made: dict[str, object] = {}
    for role in ROLES:
        policy_name = getattr(s, role)
        if policy_name is None:
            continue
        registry = REGISTRIES[role]
        if policy_name not in registry:
            raise KeyError(f"system '{name}': unknown {role} '{policy_name}'; known {role}s: "
                           f"{', '.join(sorted(registry)) or '(none registered)'}")
        factory, params = registry[policy_name], s.params.get(role, {})
        same = [p for f, kw, p in built if f is factory and kw == params]
        made[role] = same[0] if same else factory(**params)
        built.append((factory, params, made[role]))
    return Policies(made["router"], made.get("scaler"),  # type: ignore[arg-type]
                    Hooks(**{role: made.get(role) for role in ROLES[2:]}), dict(s.engine))  # type: ignore[arg-type]
