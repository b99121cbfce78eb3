"""The learned scaler: one feature encoder and the ``RLScaler`` that loads a trained policy.

A policy either names replica counts itself, or (``residual_of``, the default of ``sim.episodes.EnvConfig``)
corrects a heuristic scaler (residual policy learning, see ``Residual``): it sees the heuristic's target and
its offset of the last interval, and names the offset for this one. Offset 0 is the heuristic itself, so
training starts from a working scaler and learns where to deviate from it, instead of discovering scaling from a
random policy that restarts replicas every interval.

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
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from policies.api import ClusterObservation, PoolObservation, ScaleAction, Scaler
from policies.scalers import fit_to_gpus

# The version of the policy's interface: the features (per pool POOL_FEATURES, then the free GPU share,
# stacked over `history` control intervals) and the meaning of its actions (targets_from_action).
# 2: SLOW_FEATURES added (the load over the last minutes, not only the last interval); residual policies.
# 3: a residual action is the offset itself (a real number, rounded) instead of a -1/0/+1 move of it.
ENCODER_VERSION = 3
CHECKPOINT_FORMAT = "pythia-rl-scaler"
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "ppo-scaler"

INSTANT_FEATURES = (
    "active_gpu_share", "ready_share", "starting_share", "draining_share",
    "log_pending", "log_waiting", "log_running", "mean_kv_usage", "max_kv_usage",
    "log_arrivals_per_s", "log_arrival_tokens_per_s", "log_completions_per_s",
    "log_p99_latency_s", "log_slo_violations", "log_outstanding_tokens",
    "log_inflight_calls", "log_expected_next_calls",
)
# Arrival rates averaged exponentially over SLOW_TAUS_S: bursty traces make one interval's arrivals a poor
# estimate of the load a replica started now (ready a cold start later) will meet.
SLOW_TAUS_S = (60.0, 240.0)
SLOW_FEATURES = tuple(f"log_{rate}_ewma_{tau:.0f}s" for tau in SLOW_TAUS_S
                      for rate in ("arrivals_per_s", "arrival_tokens_per_s"))
POOL_FEATURES = INSTANT_FEATURES + SLOW_FEATURES
# residual policies, per pool: the base scaler's target (a share of the GPUs) and the policy's offset to it
RESIDUAL_FEATURES = ("base_target_gpu_share", "residual_offset")
FEATURE_CLIP = 10.0  # every feature lies in [0, FEATURE_CLIP]
RATE_SCALES = (3.0, 10.0)  # log1p(arrivals/s) and log1p(arrival tokens/s) are divided by these, instant or averaged


def _log(x: float, scale: float = 1.0) -> float:
    """log1p(x) / scale, with NaN (nothing measured) as 0: counts and rates span orders of magnitude."""
    return 0.0 if math.isnan(x) else math.log1p(max(x, 0.0)) / scale


def pool_features(pool: PoolObservation, obs: ClusterObservation) -> list[float]:
    """The INSTANT_FEATURES of one pool, each scaled to about [0, 2] on an 8-GPU cluster."""
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
        _log(pool.arrivals / dt, RATE_SCALES[0]), _log(pool.arrival_tokens / dt, RATE_SCALES[1]),
        _log(pool.completions / dt, 3),
        _log(pool.p99_latency_s, 3), _log(pool.slo_violations, 3),
        _log(sum(r.outstanding_tokens for r in reps if r.state != "draining"), 10),
        _log(sum(pool.inflight_by_agent.values()), 5), _log(sum(pool.expected_next_by_agent.values()), 5),
    ]


def feature_names(residual: bool) -> list[str]:
    """The names of one pool's features (the frame then ends with ``free_gpu_share``)."""
    return list(POOL_FEATURES) + (list(RESIDUAL_FEATURES) if residual else [])


class FeatureEncoder:
    """Observation -> feature vector: per pool (in ``pools`` order) POOL_FEATURES (and, for a ``residual``
    policy, RESIDUAL_FEATURES), then the free GPU share, for the current control interval and the
    ``history - 1`` before it (oldest last; repeated at the start).

    Stateful through that history and the SLOW_FEATURES' averages (started at the first observation's
    rates): make one per episode or run.
    """

    def __init__(self, pools: Sequence[str], history: int = 3, residual: bool = False):
        if not pools:
            raise ValueError("FeatureEncoder needs at least one pool name")
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        self.pools, self.history, self.residual = tuple(pools), history, residual
        self.frame_size = len(self.pools) * len(feature_names(residual)) + 1
        self._frames: deque[np.ndarray] = deque(maxlen=history)
        self._ewma: np.ndarray | None = None  # [pool, tau, rate]: arrivals/s, arrival tokens/s

    @property
    def size(self) -> int:
        return self.frame_size * self.history

    def reset(self) -> None:
        self._frames.clear()
        self._ewma = None

    def _slow_features(self, obs: ClusterObservation) -> np.ndarray:
        """SLOW_FEATURES per pool: exponential averages (time constants SLOW_TAUS_S) of this interval's rates."""
        dt = max(obs.interval_s, 1e-9)
        rates = np.array([[obs.pools[p].arrivals / dt, obs.pools[p].arrival_tokens / dt] for p in self.pools])
        rates = np.repeat(rates[:, None, :], len(SLOW_TAUS_S), axis=1)
        if self._ewma is None:
            self._ewma = rates
        else:
            alpha = 1.0 - np.exp(-dt / np.asarray(SLOW_TAUS_S))[None, :, None]
            self._ewma = self._ewma + alpha * (rates - self._ewma)
        return np.log1p(self._ewma) / np.asarray(RATE_SCALES)

    def encode(self, obs: ClusterObservation, residual: Residual | None = None) -> np.ndarray:
        """``residual``: a residual policy's state (after ``Residual.observe(obs)``), which it sees (and needs)."""
        missing = [p for p in self.pools if p not in obs.pools]
        if missing:
            raise ValueError(f"the policy was trained on pools {list(self.pools)}; this cluster observation has "
                             f"{sorted(obs.pools)} (missing {missing}). Name the pools as in training.")
        if self.residual != (residual is not None):
            raise ValueError("a residual policy's encoder needs its Residual state, and only it takes one")
        slow = self._slow_features(obs).reshape(len(self.pools), -1)
        frame = []
        for i, p in enumerate(self.pools):
            frame += [*pool_features(obs.pools[p], obs), *slow[i]]
            if residual is not None:
                frame += residual.features(p, obs)
        frame.append(obs.free_gpus / max(obs.total_gpus, 1))
        x = np.clip(np.asarray(frame, dtype=np.float32), 0.0, FEATURE_CLIP)
        if not self._frames:
            self._frames.extend([x] * self.history)
        self._frames.appendleft(x)
        return np.concatenate(self._frames)


def check_max_offset(max_offset: int) -> None:
    """A residual policy's offset range must hold at least one replica either way."""
    if max_offset < 1:
        raise ValueError(f"max_offset={max_offset}: a residual policy needs offsets of at least 1")


class Residual:
    """A residual policy's state: per pool, an offset to the base scaler's replica target.

    The action is, per pool, the offset as a real number in [-``max_offset``, +``max_offset``], rounded to
    whole replicas; 0 is the base scaler alone. A continuous offset lets training move the policy's mean
    correction by small steps (a Gaussian policy's deterministic action is its mean, which follows the
    advantages), where a categorical policy's most likely offset stays 0 until one alternative overtakes it
    outright; naming the offset, rather than moving it by one per interval, lets the correction follow the
    base target, which can jump from 2 to 8 replicas in one interval. The base scaler decides on every
    observation exactly as it would alone (``observe``).
    """

    def __init__(self, base: Scaler, pools: Sequence[str], max_offset: int):
        check_max_offset(max_offset)
        self.base, self.pools, self.max_offset = base, tuple(pools), max_offset
        self.offsets = dict.fromkeys(self.pools, 0)
        self.base_targets: dict[str, int] = {}

    def observe(self, obs: ClusterObservation) -> None:
        self.base_targets = self.base.decide(obs).target_replicas

    def features(self, pool: str, obs: ClusterObservation) -> list[float]:
        """The base's target (a GPU share) and the offset chosen last interval (0..1 over -max..+max)."""
        share = self.base_targets.get(pool, 0) * obs.pools[pool].gpus_per_replica / max(obs.total_gpus, 1)
        return [share, (self.offsets[pool] + self.max_offset) / (2 * self.max_offset)]

    def step(self, action: Sequence[float] | np.ndarray) -> dict[str, int]:
        """Set the offsets from the action (clipped to +-max_offset, rounded half to even); the wanted
        replicas per pool (base target + offset)."""
        for p, a in zip(self.pools, action, strict=True):
            if not math.isfinite(a):
                raise ValueError(f"residual action {a} for pool '{p}' is not a finite number")
            self.offsets[p] = int(np.rint(min(max(float(a), -self.max_offset), self.max_offset)))
        return {p: self.base_targets.get(p, 0) + self.offsets[p] for p in self.pools}


def targets_from_action(obs: ClusterObservation, action: Sequence[float] | np.ndarray, pools: Sequence[str],
                        min_replicas: int = 1, residual: Residual | None = None) -> dict[str, int]:
    """Replica targets per pool, bounded below by ``min_replicas`` and, for scale-ups, by the free GPUs
    (``fit_to_gpus``, as every scaler). Without ``residual``, action k means "run k + 1 replicas" (naming the
    count makes "hold N" one constant action); with it, see ``Residual.step`` (which it advances)."""
    wants = residual.step(action) if residual else {p: int(a) + 1 for p, a in zip(pools, action, strict=True)}
    return fit_to_gpus(obs, wants, min_replicas)


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """``STEM``, ``STEM.zip`` or ``STEM.json`` -> (``STEM.zip``, ``STEM.json``)."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".zip", ".json") else p
    return stem.with_name(stem.name + ".zip"), stem.with_name(stem.name + ".json")


def checkpoint_features(residual: bool) -> list[str]:
    """The names of one frame's features, in order, as a checkpoint's ``features`` records them."""
    return feature_names(residual) + ["free_gpu_share"]


def read_checkpoint_meta(path: str | Path) -> dict:
    """The JSON beside a checkpoint, after checking that this code's encoder produces its inputs: the format, the
    encoder version, the feature list (names and order) and the fields the scaler needs, each of the right type.
    Every refusal names the file and the field."""
    zip_path, json_path = checkpoint_paths(path)
    for f in (zip_path, json_path):
        if not f.exists():
            raise FileNotFoundError(f"RL scaler checkpoint: {f} does not exist (a checkpoint is STEM.zip + STEM.json, "
                                    "written by `python -m experiments.run train-scaler`)")
    try:
        meta = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{json_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{json_path}: expected a JSON object of checkpoint fields, got a {type(meta).__name__}")

    def field(key: str, kinds: tuple[type, ...], what: str) -> object:
        """meta[key], refused when missing or of another JSON type (a bool is not an integer here)."""
        if key not in meta:
            raise ValueError(f"{json_path}: missing field '{key}' ({what})")
        value = meta[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ValueError(f"{json_path}: field '{key}' is {value!r} (a {type(value).__name__}); expected {what}")
        return value

    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{json_path}: field 'format' is {meta.get('format')!r}, expected '{CHECKPOINT_FORMAT}'")
    version = field("encoder_version", (int,), f"the integer {ENCODER_VERSION}")
    if version != ENCODER_VERSION:
        raise ValueError(f"{json_path}: the policy was trained on feature encoder version {version}, but this code "
                         f"encodes version {ENCODER_VERSION}; its inputs would not mean what it learned. Retrain "
                         "it (`python -m experiments.run train-scaler`) or use the code it was trained with.")
    pools = field("pools", (list,), "a list of pool names")
    if not pools or not all(isinstance(p, str) and p for p in pools):
        raise ValueError(f"{json_path}: field 'pools' is {pools!r}; expected a non-empty list of pool names")
    for key, low in (("history", 1), ("min_replicas", 0)):
        if field(key, (int,), f"an integer >= {low}") < low:
            raise ValueError(f"{json_path}: field '{key}' is {meta[key]}; expected an integer >= {low}")
    residual_of = field("residual_of", (str, type(None)), "a scaler name, or null for an absolute policy")
    max_offset = field("max_offset", (int,), "an integer")
    if residual_of is not None and max_offset < 1:
        raise ValueError(f"{json_path}: field 'max_offset' is {max_offset}; a residual policy needs >= 1")
    features = field("features", (list,), "the list of feature names the policy was trained on")
    expected = checkpoint_features(residual_of is not None)
    if features != expected:
        at = next((i for i, (a, b) in enumerate(zip(features, expected, strict=False)) if a != b),
                  min(len(features), len(expected)))
        got = features[at] if at < len(features) else "(end of list)"
        want = expected[at] if at < len(expected) else "(end of list)"
        raise ValueError(f"{json_path}: field 'features' differs from this code's encoder at position {at}: the "
                         f"checkpoint has {got!r}, the encoder {want!r} ({len(features)} vs {len(expected)} "
                         f"features); the policy would read its inputs in the wrong places. Retrain it, or use the "
                         "code it was trained with.")
    return meta


class RLScaler:
    """A trained stable-baselines3 policy behind the ``Scaler`` interface (simulator and real executor alike).

    ``path`` is a checkpoint stem (or its .zip / .json); ``min_replicas`` overrides the trained floor. A
    residual policy brings its own fresh base scaler (``meta["residual_of"]``), made by ``make_base`` (the scaler
    registry's ``make_scaler``, passed in so that this module does not import the registry that lists it).
    """

    def __init__(self, path: str | Path = DEFAULT_CHECKPOINT, min_replicas: int | None = None,
                 deterministic: bool = True, *, make_base: Callable[[str], Scaler]):
        self.meta = read_checkpoint_meta(path)
        from stable_baselines3 import PPO

        zip_path = checkpoint_paths(path)[0]
        try:
            self.model = PPO.load(zip_path, device="cpu")
        except Exception as e:  # SB3 reports a truncated or foreign file as AssertionError, KeyError, BadZipFile, ...
            raise ValueError(f"{zip_path}: not a loadable stable-baselines3 PPO checkpoint ({type(e).__name__}: "
                             f"{e}); the file may be truncated. Copy it again or retrain "
                             "(`python -m experiments.run train-scaler`)") from None
        self.pools: list[str] = list(self.meta["pools"])
        residual_of = self.meta["residual_of"]
        self.residual = (Residual(make_base(residual_of), self.pools, int(self.meta["max_offset"]))
                         if residual_of else None)
        self.encoder = FeatureEncoder(self.pools, int(self.meta["history"]), residual=self.residual is not None)
        expected = (self.encoder.size,)
        if self.model.observation_space.shape != expected:
            raise ValueError(f"{zip_path}: the model takes observations of shape "
                             f"{self.model.observation_space.shape}, the encoder makes {expected}")
        self.min_replicas = int(self.meta["min_replicas"] if min_replicas is None else min_replicas)
        if self.min_replicas < 0:
            raise ValueError(f"min_replicas must be >= 0, got {self.min_replicas}")
        self.deterministic = deterministic

    def decide(self, obs: ClusterObservation) -> ScaleAction:
        if self.residual:
            self.residual.observe(obs)
        action, _ = self.model.predict(self.encoder.encode(obs, self.residual), deterministic=self.deterministic)
        return ScaleAction(targets_from_action(obs, np.atleast_1d(action), self.pools, self.min_replicas,
                                               self.residual))

