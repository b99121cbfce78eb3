"""The learned scaler: one feature encoder and the ``RLScaler`` that loads a trained policy.

The same ``FeatureEncoder`` turns a ``ClusterObservation`` into the policy's input both in the training
environment (``sim/env.py``) and inside ``RLScaler.decide``, and the same ``targets_from_action`` turns
the policy's output into replica targets, so a policy trained on the simulator sees identical inputs
and acts identically in the real executor. Any change to the features must bump ``ENCODER_VERSION``:
``RLScaler`` refuses a checkpoint trained on another version instead of feeding it garbage.

A checkpoint is two files with one stem: ``STEM.zip`` (stable-baselines3's own ``model.save``) and
``STEM.json`` (what it was trained on: encoder version and parameters, action mapping, reward weights,
workloads). stable-baselines3 (and torch) are imported only when a checkpoint is loaded.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from policies.api import SCALERS, ClusterObservation, PoolObservation, ScaleAction
from policies.scalers import fit_to_gpus

# The version of the policy's interface: the features (per pool POOL_FEATURES, then the free GPU share,
# stacked over `history` control intervals) and the meaning of its actions (targets_from_action).
ENCODER_VERSION = 1
CHECKPOINT_FORMAT = "pythia-rl-scaler"
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "ppo-scaler"

POOL_FEATURES = (
    "active_gpu_share", "ready_share", "starting_share", "draining_share",
    "log_pending", "log_waiting", "log_running", "mean_kv_usage", "max_kv_usage",
    "log_arrivals_per_s", "log_arrival_tokens_per_s", "log_completions_per_s",
    "log_p99_latency_s", "log_slo_violations", "log_outstanding_tokens",
    "log_inflight_calls", "log_expected_next_calls",
)
FEATURE_CLIP = 10.0  # every feature lies in [0, FEATURE_CLIP]


def _log(x: float, scale: float = 1.0) -> float:
    """log1p(x) / scale, with NaN (nothing measured) as 0: counts and rates span orders of magnitude."""
    return 0.0 if math.isnan(x) else math.log1p(max(x, 0.0)) / scale


def pool_features(pool: PoolObservation, obs: ClusterObservation) -> list[float]:
    """The POOL_FEATURES of one pool, each scaled to about [0, 2] on an 8-GPU cluster."""
    reps = pool.replicas
    max_replicas = max(obs.total_gpus // pool.gpus_per_replica, 1)
    ready = [r for r in reps if r.state == "ready"]
    starting = sum(r.state == "starting" for r in reps)
    draining = sum(r.state == "draining" for r in reps)
    kv = [r.kv_usage for r in ready]
    dt = obs.interval_s
    return [
        pool.num_active * pool.gpus_per_replica / max(obs.total_gpus, 1),
        len(ready) / max_replicas, starting / max_replicas, draining / max_replicas,
        _log(pool.pending, 5), _log(sum(r.num_waiting for r in reps), 5), _log(sum(r.num_running for r in reps), 5),
        float(np.mean(kv)) if kv else 0.0, max(kv, default=0.0),
        _log(pool.arrivals / dt, 3), _log(pool.arrival_tokens / dt, 10), _log(pool.completions / dt, 3),
        _log(pool.p99_latency_s, 3), _log(pool.slo_violations, 3),
        _log(sum(r.outstanding_tokens for r in reps if r.state != "draining"), 10),
        _log(sum(pool.inflight_by_agent.values()), 5), _log(sum(pool.expected_next_by_agent.values()), 5),
    ]


class FeatureEncoder:
    """Observation -> feature vector: per pool (in ``pools`` order) POOL_FEATURES, then the free GPU share,
    for the current control interval and the ``history - 1`` before it (oldest last; repeated at the start).

    Stateful only through that history: make one per episode or run.
    """

    def __init__(self, pools: Sequence[str], history: int = 3):
        if not pools:
            raise ValueError("FeatureEncoder needs at least one pool name")
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        self.pools, self.history = tuple(pools), history
        self.frame_size = len(self.pools) * len(POOL_FEATURES) + 1
        self._frames: deque[np.ndarray] = deque(maxlen=history)

    @property
    def size(self) -> int:
        return self.frame_size * self.history

    def reset(self) -> None:
        self._frames.clear()

    def encode(self, obs: ClusterObservation) -> np.ndarray:
        missing = [p for p in self.pools if p not in obs.pools]
        if missing:
            raise ValueError(f"the policy was trained on pools {list(self.pools)}; this cluster observation has "
                             f"{sorted(obs.pools)} (missing {missing}). Name the pools as in training.")
        frame = [f for p in self.pools for f in pool_features(obs.pools[p], obs)]
        frame.append(obs.free_gpus / max(obs.total_gpus, 1))
        x = np.clip(np.asarray(frame, dtype=np.float32), 0.0, FEATURE_CLIP)
        if not self._frames:
            self._frames.extend([x] * self.history)
        self._frames.appendleft(x)
        return np.concatenate(self._frames)


def targets_from_action(obs: ClusterObservation, action: Sequence[int] | np.ndarray, pools: Sequence[str],
                        min_replicas: int = 1) -> dict[str, int]:
    """Action k for each pool means "run k + 1 replicas", bounded below by ``min_replicas`` and, for scale-ups,
    by the free GPUs (``fit_to_gpus``, as every scaler). Naming the count, not a step, makes "hold N" one
    constant action, which PPO finds far more easily than a feedback loop of +1/-1 steps."""
    return fit_to_gpus(obs, {p: int(a) + 1 for p, a in zip(pools, action, strict=True)}, min_replicas)


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """``STEM``, ``STEM.zip`` or ``STEM.json`` -> (``STEM.zip``, ``STEM.json``)."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".zip", ".json") else p
    return stem.with_name(stem.name + ".zip"), stem.with_name(stem.name + ".json")


def read_checkpoint_meta(path: str | Path) -> dict:
    """The JSON beside a checkpoint, after checking that this code's encoder produces its inputs."""
    zip_path, json_path = checkpoint_paths(path)
    for f in (zip_path, json_path):
        if not f.exists():
            raise FileNotFoundError(f"RL scaler checkpoint: {f} does not exist (a checkpoint is STEM.zip + STEM.json, "
                                    "written by `python -m experiments.run train-scaler`)")
    try:
        meta = json.loads(json_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path}: not valid JSON ({e})") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{json_path}: field 'format' is {meta.get('format')!r}, expected '{CHECKPOINT_FORMAT}'")
    version = meta.get("encoder_version")
    if version != ENCODER_VERSION:
        raise ValueError(f"{json_path}: the policy was trained on feature encoder version {version}, but this code "
                         f"encodes version {ENCODER_VERSION}; its inputs would not mean what it learned. Retrain "
                         "it (`python -m experiments.run train-scaler`) or use the code it was trained with.")
    for key in ("pools", "history", "min_replicas"):
        if key not in meta:
            raise ValueError(f"{json_path}: missing field '{key}'")
    return meta


class RLScaler:
    """A trained stable-baselines3 policy behind the ``Scaler`` interface (simulator and real executor alike).

    ``path`` is a checkpoint stem (or its .zip / .json); ``min_replicas`` overrides the trained floor.
    """

    def __init__(self, path: str | Path = DEFAULT_CHECKPOINT, min_replicas: int | None = None,
                 deterministic: bool = True):
        self.meta = read_checkpoint_meta(path)
        from stable_baselines3 import PPO

        self.model = PPO.load(checkpoint_paths(path)[0], device="cpu")
        self.pools: list[str] = list(self.meta["pools"])
        self.encoder = FeatureEncoder(self.pools, int(self.meta["history"]))
        expected = (self.encoder.size,)
        if self.model.observation_space.shape != expected:
            raise ValueError(f"{checkpoint_paths(path)[0]}: the model takes observations of shape "
                             f"{self.model.observation_space.shape}, the encoder makes {expected}")
        self.min_replicas = int(self.meta["min_replicas"] if min_replicas is None else min_replicas)
        if self.min_replicas < 0:
            raise ValueError(f"min_replicas must be >= 0, got {self.min_replicas}")
        self.deterministic = deterministic

    def decide(self, obs: ClusterObservation) -> ScaleAction:
        action, _ = self.model.predict(self.encoder.encode(obs), deterministic=self.deterministic)
        return ScaleAction(targets_from_action(obs, np.atleast_1d(action), self.pools, self.min_replicas))


SCALERS["rl"] = RLScaler
