"""A gymnasium environment for learning to scale: one step is one control interval of a simulated cluster.

The agent plays the ``Scaler``: it sees each ``ClusterObservation`` through ``policies.rl.FeatureEncoder``
(the encoder ``RLScaler`` uses on the real executor) and answers, per pool, how many replicas to run
(``policies.rl.targets_from_action``, clamped like every scaler by ``fit_to_gpus``). By default it is a
residual policy on the Pythia heuristic (``residual_of``, ``policies.rl.Residual``): the heuristic decides
every interval as it would alone, the agent sees its target and names an offset to it (a real number in
-``max_offset`` .. +``max_offset``, rounded to replicas); with ``residual_of=None`` it names replica counts
itself. The reward of an interval is

    -(w_slo * calls whose SLO deadline passed in the interval before they finished
      + w_gpu * GPU-seconds held in the interval)

A late call is charged once, when it becomes late (see ``_Deadlines``), so the penalty follows the
decisions that caused it and delaying calls past the end of an episode does not pay.

With ``reward_baseline`` (the default: "pythia") the step reward is that reward minus the reward the
baseline scaler earns in the same interval of the same episode, run beside it as a shadow simulation.
The baseline's rewards do not depend on the agent's actions, so the best policy is unchanged, but most of
the reward's variance (how hard an episode's workload is) cancels: a residual policy that keeps the
heuristic's targets gets exactly 0 every step, and any deviation is scored by what it changed. ``info``
and ``rollout`` always report the agent's own (absolute) violations, GPU-seconds and reward.

Episodes come from ``sim.episodes``; ``register()`` makes the environment known to ``gym.make`` as
``ENV_ID`` (called by whoever needs it, not on import).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import replace

import gymnasium as gym
import numpy as np

from frontend.ledger import CallRecord
from policies.api import ClusterObservation, Scaler
from policies.registry import make_router, make_scaler
from policies.rl import FEATURE_CLIP, FeatureEncoder, Residual, targets_from_action
from sim.cluster import Simulation
from sim.episodes import EnvConfig, Episode, sample_episode

ENV_ID = "PythiaScaling-v0"


class ScalingEnv(gym.Env):
    """One episode = one sampled workload on a fresh simulated cluster; one step = one control interval."""

    metadata = {"render_modes": []}

    def __init__(self, config: EnvConfig | None = None, **overrides: object):
        self.config = cfg = replace(config or EnvConfig(), **overrides)
        self.pools = cfg.pools
        self.encoder = FeatureEncoder(self.pools, cfg.history, residual=cfg.residual_of is not None)
        self.observation_space = gym.spaces.Box(0.0, FEATURE_CLIP, (self.encoder.size,), np.float32)
        if cfg.residual_of is not None:  # the offset per pool (``Residual.step`` rounds it)
            self.action_space = gym.spaces.Box(-cfg.max_offset, cfg.max_offset, (len(self.pools),), np.float32)
        else:  # the replica count per pool, less one
            self.action_space = gym.spaces.MultiDiscrete([cfg.cluster.num_gpus // p.tp for p in cfg.cluster.pools])
        self.interval_s = cfg.cluster.control_interval_s
        # the episode's state, drawn by reset()
        self.episode: Episode | None = None
        self.run: _Replay | None = None
        self.sim: Simulation | None = None
        self.shadow: _Replay | None = None
        self.shadow_scaler: Scaler | None = None
        self.residual: Residual | None = None
        self._obs: ClusterObservation | None = None

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        cfg = self.config
        self.episode = sample_episode(cfg, self.np_random)
        self.run = _Replay(self.episode, cfg.router)
        self.sim = self.run.sim
        self.shadow = _Replay(self.episode, cfg.router) if cfg.reward_baseline else None
        self.shadow_scaler = make_scaler(cfg.reward_baseline) if cfg.reward_baseline else None
        self.residual = Residual(make_scaler(cfg.residual_of), self.pools, cfg.max_offset) if cfg.residual_of else None
        self.encoder.reset()
        self.sim.run(until=self.interval_s)
        if self.shadow:
            self.shadow.sim.run(until=self.interval_s)
        return self._observe(), dict(self.episode.about)

    def _observe(self) -> np.ndarray:
        """Observe the cluster, let the base scaler (if any) decide on it, and encode both."""
        self._obs = obs = _observe_interval(self.sim)
        if self.residual:
            self.residual.observe(obs)
        return self.encoder.encode(obs, self.residual)

    @property
    def cluster_observation(self) -> ClusterObservation:
        """The latest observation, as a ``Scaler`` would receive it."""
        if self._obs is None:
            raise RuntimeError("call reset() first")
        return self._obs

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        cfg = self.config
        obs = self.cluster_observation
        action = np.atleast_1d(np.asarray(action))
        if action.shape != self.action_space.shape or not np.all(np.isfinite(action)):
            raise ValueError(f"action {action.tolist()} must be {self.action_space.shape[0]} finite number(s), one per "
                             f"pool ({', '.join(self.pools)})")
        if not self.action_space.contains(action.astype(self.action_space.dtype)):
            raise ValueError(f"action {action.tolist()} is outside the action space {self.action_space}")
        return self.advance(targets_from_action(obs, action, self.pools, cfg.min_replicas, self.residual))

    def advance(self, targets: dict[str, int]) -> tuple[np.ndarray, float, bool, bool, dict]:
        """Apply replica targets (from an action, or from any ``Scaler``) and run one control interval."""
        cfg = self.config
        now = self.cluster_observation.now + self.interval_s
        finished, violations, gpu_seconds = self.run.interval(targets, now, self.interval_s)
        x = self._observe()
        truncated = finished or now >= cfg.episode_s - 1e-9
        own = self.score(violations, gpu_seconds)
        reward = own
        if self.shadow:
            base = self.shadow_scaler.decide(_observe_interval(self.shadow.sim)).target_replicas
            reward -= self.score(*self.shadow.interval(base, now, self.interval_s)[1:])
        info = {"slo_violations": violations, "gpu_seconds": gpu_seconds, "own_reward": own,
                "replicas": {p: self._obs.pools[p].num_active for p in self.pools}}
        return x, float(reward), False, truncated, info

    def score(self, violations: int, gpu_seconds: float) -> float:
        """The absolute reward of one interval."""
        return -(self.config.w_slo * violations + self.config.w_gpu * gpu_seconds)


class _Replay:
    """One simulated run of an episode, advanced a control interval at a time (the agent's, or the shadow)."""

    def __init__(self, episode: Episode, router: str):
        self.sim = Simulation(episode.table, episode.cluster, make_router(router), controlled=True)
        self.deadlines = _Deadlines(self.sim.front.ledger.calls)

    def interval(self, targets: dict[str, int], until: float, interval_s: float) -> tuple[bool, int, float]:
        """Apply ``targets``, run to ``until``: (all calls finished, calls late in it, GPU-seconds held)."""
        front = self.sim.front
        front.apply(targets)
        gpus_before = front.gpus_in_use()
        finished = self.sim.run(until=until)
        # GPUs held over the interval: trapezoid between just after the decision and its end.
        gpu_seconds = 0.5 * (gpus_before + front.gpus_in_use()) * interval_s
        return finished, self.deadlines.late_by(until), gpu_seconds


def _observe_interval(sim: Simulation) -> ClusterObservation:
    """The observation a scaler gets at the end of a control interval; the next interval starts."""
    obs = sim.front.snapshot()
    sim.front.close_interval()
    return obs


class _Deadlines:
    """Charges each call once, when its SLO deadline (release + slo_s) passes, if it has not finished by then.

    The penalty lands in the interval where the call became late, not when it finally finishes (maybe
    minutes, or episodes, later), so it follows the decisions that caused it closely.
    """

    def __init__(self, calls: dict[int, CallRecord]):
        self.calls = calls  # the front end's ledger, in release order
        self._seen = 0
        self._heap: list[tuple[float, int]] = []

    def late_by(self, now: float) -> int:
        for c in itertools.islice(self.calls.values(), self._seen, None):
            if not math.isnan(c.slo_s):
                heapq.heappush(self._heap, (c.release_s + c.slo_s, c.request_id))
        self._seen = len(self.calls)
        late = 0
        while self._heap and self._heap[0][0] <= now:
            deadline, rid = heapq.heappop(self._heap)
            c = self.calls[rid]
            late += not (c.status == "ok" and c.finish_s <= deadline)
        return late


def register() -> None:
    """Make ``ScalingEnv`` known to ``gym.make(ENV_ID)`` (idempotent)."""
    if ENV_ID not in gym.registry:
        gym.register(id=ENV_ID, entry_point="sim.env:ScalingEnv", disable_env_checker=False)


def rollout(env: ScalingEnv, seed: int, policy: Scaler | Callable[[np.ndarray], np.ndarray]) -> dict[str, float]:
    """Play one episode (``reset(seed=seed)``) with a ``Scaler`` or with a function features -> action;
    return its totals (reward: the absolute one, whatever ``reward_baseline``)."""
    x, _ = env.reset(seed=seed)
    totals = {"reward": 0.0, "slo_violations": 0.0, "gpu_seconds": 0.0, "steps": 0.0}
    done = False
    while not done:
        if isinstance(policy, Scaler):
            x, reward, terminated, truncated, info = env.advance(policy.decide(env.cluster_observation).target_replicas)
        else:
            x, reward, terminated, truncated, info = env.step(policy(x))
        totals["reward"] += info["own_reward"]
        totals["slo_violations"] += info["slo_violations"]
        totals["gpu_seconds"] += info["gpu_seconds"]
        totals["steps"] += 1
        done = terminated or truncated
    return totals
