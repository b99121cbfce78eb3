"""Episodes for learning to scale: what a ``sim.env.ScalingEnv`` episode replays, drawn from a seed.

Episodes (``sample_episode``) superpose two workloads, both seeded by the episode's random generator:
a window of a real request trace (Azure 2023 code: bursty arrivals, real prompt and output lengths),
replayed ``rate_scale`` times faster, and jobs of a ``workflow.yaml`` (coding assistant) started by an
on/off (bursty) process. Trace calls carry no SLO, so each gets ``trace_slo_s``.

Held-out evaluation. The trace's timeline is cut into three disjoint parts (``SPLITS``, fractions of its
length): windows of the ``train`` split are the only ones training sees, ``val`` is for periodic
evaluation during training, ``test`` for the final comparison (fig12). A window lies entirely inside its
split. Workflow jobs of each split come from disjoint generator seed ranges (``SEED_BASE``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from frontend.checks import check_choice, check_float, check_int
from frontend.engine_args import EngineArgs
from policies.registry import ROUTERS, SCALERS
from policies.rl import check_max_offset
from sim.cluster import ClusterConfig, PoolConfig
from traces.arrivals import OnOff
from traces.loaders import TRACES, load_trace
from traces.schema import make_table
from traces.workflow import WORKFLOWS, make_workload

SPLITS: dict[str, tuple[float, float]] = {"train": (0.0, 0.6), "val": (0.6, 0.8), "test": (0.8, 1.0)}
SEED_BASE: dict[str, int] = {"train": 0, "val": 2**31, "test": 2**32}
MAX_HISTORY = 64  # control intervals an observation may stack


@dataclass(frozen=True)
class EnvConfig:
    """Everything an episode depends on besides its seed (stored with a trained checkpoint)."""

    cluster: ClusterConfig = field(default_factory=lambda: ClusterConfig(
        gpu="a100-40gb", num_gpus=8, pools=(PoolConfig("default", "llama-3.1-8b"),)))
    router: str = "round_robin"
    split: str = "train"
    episode_s: float = 300.0  # simulated seconds per episode (arrivals and control)
    initial_replicas: tuple[int, int] = (1, 8)  # per pool, drawn uniformly (inclusive)
    # workload: a trace window plus workflow jobs
    trace: str = "azure-code"
    # drawn uniformly per episode: from light episodes (4 replicas suffice) to ones that need all 8, so that
    # a scaler gains by reading the load (with narrower ranges one constant count is nearly optimal)
    trace_rate_scale: tuple[float, float] = (0.25, 2.0)  # the window is replayed this much faster
    trace_slo_s: float = 10.0
    workflow: str = "coding-assistant-chat"
    workflow_rate: tuple[float, float] = (0.0, 0.6)  # mean jobs/s; 0 disables the workflow
    # action and reward
    residual_of: str | None = "pythia"  # the scaler whose targets the agent corrects; None: absolute counts
    max_offset: int = 3  # residual policies: the offset stays within -max_offset .. +max_offset replicas
    reward_baseline: str | None = "pythia"  # reward relative to this scaler's shadow run of the episode; None: absolute
    min_replicas: int = 1
    history: int = 3
    w_slo: float = 0.3  # one call over its SLO costs as much as 30 GPU-seconds
    w_gpu: float = 0.01

    def __post_init__(self) -> None:
        if not isinstance(self.cluster, ClusterConfig):
            raise ValueError(f"EnvConfig.cluster={self.cluster!r} must be a ClusterConfig")
        check_choice("EnvConfig.split", self.split, SPLITS)
        check_choice("EnvConfig.router", self.router, ROUTERS)
        for name in ("residual_of", "reward_baseline"):
            if getattr(self, name) is not None:
                check_choice(f"EnvConfig.{name}", getattr(self, name), SCALERS)
        check_choice("EnvConfig.trace", self.trace, TRACES)
        if self.workflow not in WORKFLOWS and not Path(self.workflow).is_file():
            raise ValueError(f"EnvConfig.workflow={self.workflow!r} is neither a shipped workflow "
                             f"({', '.join(WORKFLOWS)}) nor a workflow.yaml file")
        check_float("EnvConfig.episode_s", self.episode_s, self.cluster.control_interval_s)
        check_float("EnvConfig.trace_slo_s", self.trace_slo_s, 0.0, open_low=True)
        self._check_range("initial_replicas", self.initial_replicas, 1, integer=True)
        self._check_range("trace_rate_scale", self.trace_rate_scale, 0.0, open_low=True)
        self._check_range("workflow_rate", self.workflow_rate, 0.0)
        check_int("EnvConfig.max_offset", self.max_offset, 0)
        if self.residual_of is not None:
            check_max_offset(self.max_offset)
        check_int("EnvConfig.history", self.history, 1, MAX_HISTORY)
        check_int("EnvConfig.min_replicas", self.min_replicas, 0)
        for name in ("w_slo", "w_gpu"):
            check_float(f"EnvConfig.{name}", getattr(self, name), 0.0)

    @staticmethod
    def _check_range(name: str, pair: object, low: float, *, integer: bool = False, open_low: bool = False) -> None:
        """A (low, high) pair drawn from uniformly: both in range, low <= high."""
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise ValueError(f"EnvConfig.{name}={pair!r} must be a pair (low, high)")
        for i, v in enumerate(pair):
            if integer:
                check_int(f"EnvConfig.{name}[{i}]", v, int(low))
            else:
                check_float(f"EnvConfig.{name}[{i}]", v, low, open_low=open_low)
        if pair[0] > pair[1]:
            raise ValueError(f"EnvConfig.{name}={pair!r}: low={pair[0]} is above high={pair[1]}")

    @property
    def pools(self) -> list[str]:
        return [p.name for p in self.cluster.pools]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EnvConfig:
        """Inverse of ``to_dict`` (e.g. the ``env_config`` stored with a checkpoint)."""
        d = dict(d)
        cluster = dict(d.pop("cluster"))
        cluster["pools"] = tuple(PoolConfig(**p) for p in cluster["pools"])
        cluster["engine"] = EngineArgs(**cluster["engine"])
        tuples = {k: tuple(v) for k, v in d.items() if isinstance(v, list)}
        return cls(cluster=ClusterConfig(**cluster), **{**d, **tuples})


@dataclass
class Episode:
    table: pd.DataFrame
    cluster: ClusterConfig  # with this episode's initial replicas
    about: dict  # what was drawn (window, rates, seeds)


@lru_cache(maxsize=4)
def _trace(name: str) -> pd.DataFrame:
    return load_trace(name)


def trace_window(name: str, split: str, length_s: float, rng: np.random.Generator) -> tuple[float, pd.DataFrame]:
    """A random window of ``length_s`` trace seconds inside ``split``: (start, rows with times from 0)."""
    full = _trace(name)
    span = float(full["arrival_s"].max())
    lo, hi = (f * span for f in SPLITS[split])
    if length_s > hi - lo:
        raise ValueError(f"a window of {length_s:.0f} s of '{name}' does not fit its {split} split "
                         f"[{lo:.0f}, {hi:.0f}) s; shorten episode_s or lower trace_rate_scale")
    start = float(rng.uniform(lo, hi - length_s))
    t = full["arrival_s"].to_numpy()
    rows = full[(t >= start) & (t < start + length_s)].copy()
    rows["arrival_s"] = rows["arrival_s"] - start
    return start, rows


def merge_tables(tables: list[pd.DataFrame], source: str) -> pd.DataFrame:
    """One table from several: request ids (and parents) renumbered, rows in arrival order."""
    parts, offset = [], 0
    for t in tables:
        t = t.copy()
        t["request_id"] = t["request_id"] + offset
        t["parents"] = [[p + offset for p in ps] for ps in t["parents"]]
        offset = int(t["request_id"].max()) + 1 if len(t) else offset
        parts.append(t)
    merged = pd.concat(parts, ignore_index=True).sort_values("arrival_s", kind="stable").reset_index(drop=True)
    return make_table(merged, source)


BANK_JOBS = 256  # workflow jobs generated once per process and split; an episode draws its jobs from them


@lru_cache(maxsize=8)
def job_bank(workflow: str, split: str) -> pd.DataFrame:
    """``BANK_JOBS`` jobs of ``workflow`` (seeded by the split), each with times from its own start and
    ``parents`` as row offsets within the job: generating jobs is slower than simulating them, so an
    episode re-places these instead of generating its own."""
    t = make_workload(workflow, rate=1.0, num_jobs=BANK_JOBS, seed=SEED_BASE[split])
    t = t.sort_values("job_id", kind="stable").reset_index(drop=True)  # a job's rows together, in release order
    t["arrival_s"] = t["arrival_s"] - t.groupby("job_id")["arrival_s"].transform("min")
    row_of = dict(zip(t["request_id"].tolist(), range(len(t)), strict=True))
    first = t.groupby("job_id")["request_id"].transform("first").map(row_of).tolist()
    t["parents"] = [[row_of[p] - f for p in ps] for ps, f in zip(t["parents"], first, strict=True)]
    return t


def place_jobs(bank: pd.DataFrame, starts: np.ndarray, rng: np.random.Generator) -> pd.DataFrame:
    """Distinct bank jobs (while the bank lasts) started at ``starts``, renumbered as a fresh workload."""
    groups = list(bank.groupby("job_id", sort=True).indices.values())
    n, size = len(starts), len(groups)
    rows = [groups[j] for j in rng.choice(size, size=n, replace=n > size)]
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    t = bank.iloc[np.concatenate(rows) if n else []].reset_index(drop=True)
    job = np.repeat(np.arange(n), lengths)
    base = np.repeat(np.cumsum(lengths) - lengths, lengths)
    t["request_id"] = np.arange(len(t))
    t["parents"] = [[b + p for p in ps] for ps, b in zip(t["parents"], base.tolist(), strict=True)]
    t["arrival_s"] = t["arrival_s"].to_numpy() + starts[job]
    t["job_id"] = job
    t["session_id"] = [f"{w}-{j}" for w, j in zip(t["workflow"], job.tolist(), strict=True)]
    return t


def sample_episode(cfg: EnvConfig, rng: np.random.Generator) -> Episode:
    """Draw one episode's workload and initial cluster from ``cfg`` (see the module docstring)."""
    scale = float(rng.uniform(*cfg.trace_rate_scale))
    start, calls = trace_window(cfg.trace, cfg.split, cfg.episode_s * scale, rng)
    calls["arrival_s"] = calls["arrival_s"] / scale
    calls["slo_s"] = cfg.trace_slo_s
    parts = [calls]
    rate = float(rng.uniform(*cfg.workflow_rate))
    if rate > 0:
        # bursts at 3x the mean rate for 30 s, lulls at 0.25x for 60 s (mean ~1.2x): a bursty job mix
        starts = OnOff(3 * rate, 0.25 * rate, 30.0, 60.0).times(rng, duration_s=cfg.episode_s)
        parts.append(place_jobs(job_bank(cfg.workflow, cfg.split), starts, rng))
    table = merge_tables(parts, f"episode ({cfg.split}: {cfg.trace} from {start:.0f} s x{scale:.2f}, "
                                f"{cfg.workflow} at {rate:.2f} jobs/s)")
    lo, hi = cfg.initial_replicas
    pools = tuple(replace(p, initial_replicas=min(int(rng.integers(lo, hi + 1)), cfg.cluster.num_gpus // p.tp))
                  for p in cfg.cluster.pools)
    about = {"split": cfg.split, "trace_start_s": start, "trace_rate_scale": scale, "workflow_rate": rate,
             "workflow_jobs": len(parts[1]["job_id"].unique()) if rate > 0 else 0,
             "initial_replicas": [p.initial_replicas for p in pools], "num_calls": len(table)}
    return Episode(table, replace(cfg.cluster, pools=pools), about)

