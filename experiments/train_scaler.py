"""`python -m experiments.run train-scaler [--timesteps N] [--seeds K] [--jobs N | --ray ADDRESS] [--quick]`:
train the RL scaler with PPO.

PPO (stable-baselines3) on ``sim.env.ScalingEnv`` episodes of the ``train`` split. Every ``eval_every`` steps
the deterministic policy plays the same ``val`` episodes (seeds 0..n-1), and so do the heuristic Pythia
scaler and a static full cluster once, for reference; the policy saved is the one that scored best there
(the ``test`` windows of fig12 are never looked at). TensorBoard logs go to ``OUT/runs/train-scaler/``
(``tensorboard --logdir OUT/runs``) of the machine that trains.

One seed (``--seed``): its environments run in parallel (``--jobs`` > 1: one process each, else in this
process; the result is the same). ``--seeds K``: seeds ``--seed`` .. ``--seed + K - 1`` train side by side,
each a whole SB3 run in one worker (``--jobs`` processes, or a Ray task each with ``--ray``) that sends its
checkpoint back as bytes, so a seed may train on another node. Per seed SB3 rather than RLlib: the policy,
its checkpoint format (``RLScaler`` loads SB3 zips) and its bit-for-bit determinism stay those of the one-seed
run, and a seed is a 1-core job that needs no distributed learner.

Writes ``OUT/train-scaler.zip`` (``model.save``), ``OUT/train-scaler.json`` (encoder version, action
mapping, environment and reward config, training config, the learning curve), and the learning curve as
``OUT/train-scaler.csv`` / ``.png``. With several seeds, every seed's checkpoint is ``OUT/train-scaler-seedN``,
the CSV has every seed's curve, ``train-scaler_seeds.csv`` each seed's best validation score, and
``train-scaler.zip/.json`` is the seed that scored best on the validation episodes (its JSON lists the seeds,
whose checkpoints fig12 evaluates beside it). The shipped checkpoint ``policies/checkpoints/ppo-scaler*`` is a
copy of those files from a full run (``--seeds 4 --jobs 2``, seed 0).
"""

from __future__ import annotations

import copy
import json
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import stable_baselines3
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecNormalize

from experiments.common import parallel_map
from experiments.output import Context, Output
from experiments.plots import color_of, figure, plot_curve, setting
from policies.registry import make_scaler
from policies.rl import CHECKPOINT_FORMAT, ENCODER_VERSION, checkpoint_features, checkpoint_paths
from sim.env import ENV_ID, ScalingEnv, rollout
from sim.episodes import EnvConfig

NAME = "train-scaler"


@dataclass(frozen=True)
class TrainConfig:
    timesteps: int = 64_000
    n_envs: int = 2
    n_steps: int = 256  # per environment per PPO update
    batch_size: int = 128
    n_epochs: int = 10
    learning_rate: float = 3e-4
    gamma: float = 0.98  # 5 s steps: a ~4 min horizon, several cold starts long
    gae_lambda: float = 0.95
    ent_coef: float = 0.0
    net_arch: tuple[int, ...] = (64, 64)
    # Residual policies (continuous offsets) explore with generalized state-dependent noise (gSDE): the
    # perturbation is a function of the state, redrawn every `sde_sample_freq` steps, so an exploring policy
    # holds a correction while the load stays alike instead of flipping replicas every interval (each
    # flip drains a replica and starts a cold one). The initial mean offset is ~0: the heuristic itself.
    use_sde: bool = True
    sde_sample_freq: int = 64  # about one episode
    log_std_init: float = -2.0
    eval_every: int = 4_000  # environment steps between evaluations
    eval_episodes: int = 8
    env: EnvConfig = field(default_factory=EnvConfig)


FULL = TrainConfig(timesteps=24_000)  # per seed; the shipped run trains 4 seeds
QUICK = TrainConfig(timesteps=2048, n_envs=1, n_steps=256, batch_size=64, eval_every=1024, eval_episodes=2,
                    env=EnvConfig(episode_s=120.0))


class CurveCallback(BaseCallback):
    """Mean training episode reward, and the deterministic policy's score on fixed validation episodes."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.cfg = cfg
        self.val_env = ScalingEnv(replace(cfg.env, split="val", reward_baseline=None))  # rollout scores absolute
        base = cfg.env.reward_baseline
        self.train_label = f"train PPO (reward - {base}'s)" if base else "train PPO"
        self.seeds = list(range(cfg.eval_episodes))
        self.next_eval = cfg.eval_every
        self.train_rewards: list[float] = []
        self.rows: list[dict] = []
        self.best: tuple[int, float, dict] | None = None  # (timesteps, val reward, policy weights)
        for label, name, params in (("pythia heuristic", "pythia", {}),
                                    ("static full", "static", {"replicas": cfg.env.cluster.num_gpus})):
            runs = [rollout(self.val_env, s, make_scaler(name, **params)) for s in self.seeds]
            self.rows.append({"timesteps": 0, "curve": f"val {label}", **_mean(runs)})

    def _on_training_start(self) -> None:
        self._evaluate()  # the untrained policy (for a residual one: the base heuristic, or nearly)

    def _on_step(self) -> bool:
        for info in self.locals["infos"]:
            if "episode" in info:  # added by the Monitor wrapper when an episode ends
                self.train_rewards.append(float(info["episode"]["r"]))
        if self.num_timesteps >= self.next_eval:
            self._evaluate()
        return True

    def _on_training_end(self) -> None:
        if self.rows[-1]["timesteps"] != self.num_timesteps:
            self._evaluate()

    def _evaluate(self) -> None:
        act = lambda x: self.model.predict(x, deterministic=True)[0]
        val = _mean([rollout(self.val_env, s, act) for s in self.seeds])
        train = float(np.mean(self.train_rewards)) if self.train_rewards else float("nan")
        self.train_rewards.clear()
        if self.best is None or val["reward"] > self.best[1]:
            self.best = (self.num_timesteps, val["reward"], copy.deepcopy(self.model.policy.state_dict()))
        self.rows.append({"timesteps": self.num_timesteps, "curve": "val PPO", **val})
        self.rows.append({"timesteps": self.num_timesteps, "curve": self.train_label, "reward": train})
        for k, v in val.items():
            self.logger.record(f"val/{k}", v)
        self.logger.record("train/mean_episode_reward", train)
        self.logger.dump(self.num_timesteps)
        self.next_eval = self.num_timesteps + self.cfg.eval_every

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["timesteps", "curve", "reward", "slo_violations", "gpu_seconds"])


def _mean(runs: list[dict]) -> dict:
    return {k: float(np.mean([r[k] for r in runs])) for k in ("reward", "slo_violations", "gpu_seconds")}


def train(cfg: TrainConfig, seed: int, save_to: Path, log_dir: Path | None = None, subproc: bool = False,
          progress: bool = True) -> pd.DataFrame:
    """Train PPO, save ``save_to``.zip/.json, return the learning curve."""
    torch.set_num_threads(1)  # a 64x64 MLP: threads only contend with the environment processes
    t0 = time.perf_counter()
    venv = make_vec_env(ScalingEnv, n_envs=cfg.n_envs, seed=seed, env_kwargs={"config": cfg.env},
                        vec_env_cls=SubprocVecEnv if subproc and cfg.n_envs > 1 else DummyVecEnv)
    # Rewards scaled by a running estimate of the return's spread, for the value function's sake; the
    # observations are left alone: the policy must take exactly what FeatureEncoder gives RLScaler.
    venv = VecNormalize(venv, norm_obs=False, norm_reward=True, gamma=cfg.gamma)
    sde = cfg.use_sde and cfg.env.residual_of is not None  # gSDE needs continuous actions
    model = PPO("MlpPolicy", venv, n_steps=cfg.n_steps, batch_size=cfg.batch_size, n_epochs=cfg.n_epochs,
                learning_rate=cfg.learning_rate, gamma=cfg.gamma, gae_lambda=cfg.gae_lambda, ent_coef=cfg.ent_coef,
                use_sde=sde, sde_sample_freq=cfg.sde_sample_freq,
                policy_kwargs={"net_arch": list(cfg.net_arch), **({"log_std_init": cfg.log_std_init} if sde else {})},
                seed=seed, device="cpu", tensorboard_log=str(log_dir) if log_dir else None, verbose=0)
    curve = CurveCallback(cfg)
    try:
        model.learn(cfg.timesteps, callback=curve, tb_log_name=f"ppo-seed{seed}", progress_bar=progress)
    finally:
        venv.close()
    # Keep the policy that scored best on the validation windows (never the test windows fig12 uses).
    selected_at, selected_reward, weights = curve.best
    model.policy.load_state_dict(weights)
    zip_path, json_path = checkpoint_paths(save_to)
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    model.save(zip_path)
    table = curve.table()
    meta = {
        "format": CHECKPOINT_FORMAT,
        "encoder_version": ENCODER_VERSION,
        "features": checkpoint_features(cfg.env.residual_of is not None),
        "pools": cfg.env.pools, "history": cfg.env.history,
        "min_replicas": cfg.env.min_replicas, "residual_of": cfg.env.residual_of, "max_offset": cfg.env.max_offset,
        "env_id": ENV_ID,
        "reward": {"w_slo": cfg.env.w_slo, "w_gpu": cfg.env.w_gpu,
                   "definition": "-(w_slo * calls over their SLO + w_gpu * GPU-seconds) per control interval"},
        "workloads": {"trace": cfg.env.trace, "trace_split": "train", "trace_rate_scale": cfg.env.trace_rate_scale,
                      "trace_slo_s": cfg.env.trace_slo_s, "workflow": cfg.env.workflow,
                      "workflow_rate": cfg.env.workflow_rate},
        "env_config": asdict(cfg.env),
        "train_config": {k: v for k, v in asdict(cfg).items() if k != "env"},
        "algorithm": "PPO", "seed": seed, "timesteps": int(model.num_timesteps), "selected_at": selected_at,
        "selected_val_reward": selected_reward,
        "wall_s": round(time.perf_counter() - t0, 1),
        "versions": {"stable_baselines3": stable_baselines3.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "curve": json.loads(table.to_json(orient="records")),
    }
    json_path.write_text(json.dumps(meta, indent=1) + "\n")
    return table


def train_seed(cfg: TrainConfig, seed: int, log_dir: Path | None = None) -> tuple[bytes, str]:
    """Train one seed in a temporary folder of the machine it runs on and hand back its checkpoint (the zip's
    bytes, the JSON's text), for the caller to write where it wants."""
    with tempfile.TemporaryDirectory(prefix=f"{NAME}-seed{seed}-") as tmp:
        train(cfg, seed, Path(tmp) / "ckpt", log_dir, progress=False)
        zip_path, json_path = checkpoint_paths(Path(tmp) / "ckpt")
        return zip_path.read_bytes(), json_path.read_text()


def seed_stem(stem: Path, seed: int) -> Path:
    """Where seed ``seed``'s checkpoint of a multi-seed run lies, beside the selected one at ``stem``."""
    return stem.with_name(f"{stem.name}-seed{seed}")


def run(ctx: Context) -> Output:
    """Train, keep the checkpoint (``NAME.zip``/``.json`` beside the figure) and plot its learning curve;
    TensorBoard logs go to ``OUT/runs/NAME``. With ``seeds`` > 1: every seed's checkpoint and curve too."""
    cfg = QUICK if ctx.quick else FULL
    timesteps = ctx.options.get("timesteps")
    if timesteps is not None:
        if timesteps < 1:
            raise ValueError(f"--timesteps must be >= 1, got {timesteps}")
        cfg = replace(cfg, timesteps=timesteps)
    n = ctx.options.get("seeds", 1)
    if n < 1:
        raise ValueError(f"--seeds must be >= 1, got {n}")
    assert ctx.stage is not None
    log_dir = ctx.out / "runs" / NAME
    if n == 1:
        table = train(cfg, ctx.seed, ctx.stage / NAME, log_dir, subproc=ctx.jobs > 1)
        meta = json.loads(checkpoint_paths(ctx.stage / NAME)[1].read_text())
        return Output(table, plot_training(meta))
    seeds = [ctx.seed + k for k in range(n)]
    runs = parallel_map(partial(train_seed, cfg, log_dir=log_dir), seeds, ctx.jobs, desc="seeds")
    metas = []
    for seed, (zip_bytes, text) in zip(seeds, runs, strict=True):
        zip_path, json_path = checkpoint_paths(seed_stem(ctx.stage / NAME, seed))
        zip_path.write_bytes(zip_bytes)
        json_path.write_text(text)
        metas.append(json.loads(text))
    # The default checkpoint: the seed that scored best on the validation episodes (never the test ones).
    k = int(np.argmax([m["selected_val_reward"] for m in metas]))
    zip_path, json_path = checkpoint_paths(ctx.stage / NAME)
    zip_path.write_bytes(runs[k][0])
    json_path.write_text(json.dumps({**metas[k], "seeds": seeds}, indent=1) + "\n")
    table = pd.concat([pd.DataFrame(m["curve"]).assign(seed=m["seed"]) for m in metas], ignore_index=True)
    return Output(table, plot_seeds(metas), tables={"seeds": seed_table(metas)}, summary=seed_table(metas))


def seed_table(metas: list[dict]) -> pd.DataFrame:
    """Per seed: where its policy was kept and how it (and the Pythia heuristic) scored on the validation
    episodes there."""
    rows = []
    for m in metas:
        curve = pd.DataFrame(m["curve"])
        kept = curve[(curve["curve"] == "val PPO") & (curve["timesteps"] == m["selected_at"])].iloc[0]
        heuristic = curve[curve["curve"] == "val pythia heuristic"].iloc[0]
        rows.append({"seed": m["seed"], "selected_at": m["selected_at"], "val_reward": kept["reward"],
                     "val_reward_pythia": heuristic["reward"], "val_slo_violations": kept["slo_violations"],
                     "val_slo_violations_pythia": heuristic["slo_violations"], "val_gpu_seconds": kept["gpu_seconds"],
                     "val_gpu_seconds_pythia": heuristic["gpu_seconds"], "wall_s": m["wall_s"]})
    return pd.DataFrame(rows)


def plot_seeds(metas: list[dict], ax: Axes | None = None) -> Figure | None:
    """Every seed's validation curve (the policy kept: a star), with the heuristics' scores as references; on
    ``ax`` if given, else on a figure of its own."""
    fig = None
    if ax is None:
        fig, axes = figure(1, 1, 6.5, 4)
        ax = axes[0][0]
    colors = color_of([f"seed {m['seed']}" for m in metas])
    for m in metas:
        curve = pd.DataFrame(m["curve"])
        val = curve[curve["curve"] == "val PPO"]
        label = f"seed {m['seed']}"
        ax.plot(val["timesteps"], val["reward"], marker="o", ms=3, lw=1.2, color=colors[label], label=label)
        kept = val[val["timesteps"] == m["selected_at"]]
        ax.scatter(kept["timesteps"], kept["reward"], marker="*", s=120, color=colors[label], edgecolor="black",
                   zorder=3)
    curve = pd.DataFrame(metas[0]["curve"])
    for name, ls in (("val pythia heuristic", "--"), ("val static full", ":")):  # black: no seed's colour
        ax.axhline(curve.loc[curve["curve"] == name, "reward"].iloc[0], ls=ls, lw=1.2, color="black",
                   label=f"{name[4:]} (reference)")
    ax.set_xlabel("training steps (control intervals)")
    ax.set_ylabel("reward per validation episode")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"PPO scaler, {len(metas)} seeds ({metas[0]['timesteps']} steps each; star: kept), "
                 f"{setting(EnvConfig.from_dict(metas[0]['env_config']).cluster)}", fontsize=9)
    if fig is not None:
        fig.tight_layout()
    return fig


def plot_training(meta: dict) -> Figure:
    """The learning curve stored in a checkpoint's JSON, as a figure of its own."""
    fig, axes = figure(1, 1, 6.5, 4)
    ax = axes[0][0]
    plot_curve(pd.DataFrame(meta["curve"]), ax, meta["selected_at"])
    ax.set_title(f"PPO scaler on {meta['env_id']} ({meta['timesteps']} steps, seed {meta['seed']}), "
                 f"{setting(EnvConfig.from_dict(meta['env_config']).cluster)}", fontsize=10)
    fig.tight_layout()
    return fig
