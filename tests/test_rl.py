# ruff: noqa: E402  (imports follow the importorskip of the optional RL packages)
"""The RL scaling environment, the feature encoder, PPO training end to end and the RLScaler artifact."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

gym = pytest.importorskip("gymnasium", reason="the RL tests need the 'rl' extra: pip install -e '.[rl]'")
pytest.importorskip("stable_baselines3", reason="the RL tests need the 'rl' extra: pip install -e '.[rl]'")
from gymnasium.utils.env_checker import check_env

from policies.api import ClusterObservation, PoolObservation, ReplicaView, ScaleAction
from policies.registry import make_router, make_scaler
from policies.rl import (
    DEFAULT_CHECKPOINT,
    ENCODER_VERSION,
    INSTANT_FEATURES,
    SLOW_FEATURES,
    FeatureEncoder,
    Residual,
    RLScaler,
    checkpoint_paths,
    read_checkpoint_meta,
    targets_from_action,
)
from sim.cluster import simulate
from sim.env import ENV_ID, ScalingEnv, register, rollout
from sim.episodes import SPLITS, EnvConfig, sample_episode, trace_window

# Small episodes keep every test cheap; the defaults are exercised by the training test and fig12.
SMALL = EnvConfig(episode_s=40.0, trace_rate_scale=(1.0, 1.5), workflow_rate=(0.1, 0.3))
KEEP = 0.0  # the residual action (offset) that keeps the heuristic's target


def test_check_env_passes() -> None:
    check_env(ScalingEnv(SMALL), skip_render_check=True)


def test_actions_outside_the_action_space_are_refused() -> None:
    env = ScalingEnv(SMALL)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.array([KEEP], np.float32))
    env.reset(seed=1)
    with pytest.raises(ValueError, match=r"outside the action space"):
        env.step(np.array([3.5], np.float32))  # the offset is at most max_offset = 3
    with pytest.raises(ValueError, match=r"1 finite number"):
        env.step(np.array([KEEP, KEEP], np.float32))
    with pytest.raises(ValueError, match=r"1 finite number"):
        env.step(np.array([np.nan], np.float32))
    env.step(np.array([KEEP], np.float32))  # still usable after a refused action


def test_registered_under_a_versioned_id() -> None:
    register()
    env = gym.make(ENV_ID, config=SMALL)
    x, info = env.reset(seed=1)
    assert env.observation_space.contains(x)
    assert env.action_space == gym.spaces.Box(-3.0, 3.0, (1,), np.float32)  # the offset to the heuristic's target
    assert ScalingEnv(replace(SMALL, residual_of=None)).action_space == gym.spaces.MultiDiscrete([8])  # 1..8
    assert info["split"] == "train" and info["num_calls"] > 0
    env.close()


def _play(seed: int, actions: list[int]) -> tuple[list[np.ndarray], list[float]]:
    env = ScalingEnv(SMALL)
    x, _ = env.reset(seed=seed)
    xs, rs = [x], []
    for a in actions:
        x, r, terminated, truncated, _ = env.step(np.array([a]))
        xs.append(x)
        rs.append(r)
        if terminated or truncated:
            break
    return xs, rs


def test_reset_with_a_seed_reproduces_observations_and_rewards() -> None:
    actions = [2, 2, 1, 0, 0, 0, 1, 2]
    xs1, rs1 = _play(3, actions)
    xs2, rs2 = _play(3, actions)
    assert rs1 == rs2 and all(np.array_equal(a, b) for a, b in zip(xs1, xs2, strict=True))
    xs3, _ = _play(4, actions)
    assert not all(np.array_equal(a, b) for a, b in zip(xs1, xs3, strict=False))


def test_episode_length_is_the_horizon_in_control_intervals() -> None:
    _, rs = _play(0, [3] * 100)
    assert len(rs) == math.ceil(SMALL.episode_s / SMALL.cluster.control_interval_s) - 1


def test_train_and_held_out_windows_never_overlap() -> None:
    span = {}
    for split in SPLITS:
        rng = np.random.default_rng(0)
        span[split] = [trace_window("azure-code", split, 600.0, rng)[0] for _ in range(50)]
    end_train = max(span["train"]) + 600.0
    assert end_train <= min(span["val"]) and max(span["val"]) + 600.0 <= min(span["test"])
    with pytest.raises(ValueError, match="does not fit its test split"):
        trace_window("azure-code", "test", 2000.0, np.random.default_rng(0))


def test_held_out_episodes_use_other_workflow_jobs() -> None:
    def prompts(split: str) -> set[tuple[int, ...]]:
        t = sample_episode(replace(SMALL, split=split, workflow_rate=(1.0, 1.0)), np.random.default_rng(0)).table
        return {tuple(h) for h, a in zip(t["block_hashes"], t["agent"], strict=True) if a == "planner"}

    assert prompts("train") and not prompts("train") & prompts("test")


def test_episode_calls_all_have_an_slo() -> None:
    ep = sample_episode(SMALL, np.random.default_rng(5))
    assert ep.table["slo_s"].notna().all()
    assert (ep.table.loc[ep.table["workflow"] == "", "slo_s"] == SMALL.trace_slo_s).all()


def test_reward_charges_gpu_seconds() -> None:
    """Without SLO weight, a policy that adds replicas pays more than one that removes them."""
    env = ScalingEnv(replace(SMALL, w_slo=0.0, residual_of=None))
    grow = rollout(env, 0, lambda x: np.array([7]))
    shrink = rollout(env, 0, lambda x: np.array([0]))
    assert grow["gpu_seconds"] > shrink["gpu_seconds"] > 0
    assert grow["reward"] == pytest.approx(-SMALL.w_gpu * grow["gpu_seconds"])


def test_a_residual_policy_at_offset_zero_is_its_base_heuristic() -> None:
    """The residual agent that always names offset 0 reproduces the Pythia heuristic run alone, step for step;
    one that names -3 runs fewer GPUs."""
    env = ScalingEnv(replace(SMALL, episode_s=120.0))
    follow = rollout(env, 2, lambda x: np.array([KEEP]))
    heuristic = rollout(env, 2, make_scaler("pythia"))
    assert follow == heuristic
    assert rollout(env, 2, lambda x: np.array([-3.0]))["gpu_seconds"] < heuristic["gpu_seconds"]


def test_the_policy_observes_every_arrival_once() -> None:
    """The environment closes the control interval once per step, after observing it: every arrival is in
    exactly one observation the policy (and a residual's base scaler) sees."""
    env = ScalingEnv(replace(SMALL, episode_s=60.0))
    env.reset(seed=1)
    seen, done = env.cluster_observation.pools["default"].arrivals, False
    while not done:
        done = env.step(np.array([KEEP]))[3]
        seen += env.cluster_observation.pools["default"].arrivals
    assert seen == len(env.sim.front.ledger.calls) > 0


def test_the_reward_is_relative_to_the_baseline_run_on_the_same_episode() -> None:
    """Following the heuristic earns exactly 0 per step against its shadow run; trimming earns the difference."""
    env = ScalingEnv(replace(SMALL, episode_s=120.0))
    env.reset(seed=2)
    rewards = [env.step(np.array([KEEP]))[1] for _ in range(10)]
    assert rewards == [0.0] * 10
    absolute = ScalingEnv(replace(SMALL, episode_s=120.0, reward_baseline=None))
    trim, heuristic = (rollout(absolute, 2, lambda x, a=a: np.array([a])) for a in (-3.0, KEEP))
    env.reset(seed=2)
    total, done = 0.0, False
    while not done:
        _, r, _, done, _ = env.step(np.array([-3.0]))
        total += r
    assert total == pytest.approx(trim["reward"] - heuristic["reward"]) and total != 0.0


class _Ramp:
    """One replica more every interval (never fewer, so every replica it names holds its GPUs at once)."""

    def __init__(self, first: int):
        self.next = first

    def decide(self, obs: ClusterObservation) -> ScaleAction:
        self.next += 1
        return ScaleAction({"default": self.next - 1})


def test_rollout_plays_a_heuristic_scaler() -> None:
    """Every interval to the episode's end, the scaler decides, its targets are applied and the env's own (absolute)
    numbers are summed: a scaler adding a replica per interval holds exactly 2 + 3 + ... + 8 GPUs x the interval."""
    cfg = replace(SMALL, initial_replicas=(2, 2))
    env = ScalingEnv(cfg)
    dt = cfg.cluster.control_interval_s
    steps = int(cfg.episode_s / dt) - 1  # the first interval runs in reset()
    r = rollout(env, 0, _Ramp(2))
    assert r["steps"] == steps == 7
    assert r["gpu_seconds"] == dt * sum(range(2, 2 + steps))  # 8 GPUs: the last interval holds all of them
    assert r["reward"] == pytest.approx(-(cfg.w_slo * r["slo_violations"] + cfg.w_gpu * r["gpu_seconds"]))
    heuristic = rollout(env, 0, make_scaler("pythia"))
    assert heuristic == rollout(env, 0, make_scaler("pythia")) and heuristic["steps"] == steps


# --- encoder and action mapping ------------------------------------------------------------------

def _obs(replicas: list[str], free: int, arrivals: int = 0, total: int = 8) -> ClusterObservation:
    views = tuple(ReplicaView(i, "default", s, 3, 1, 0.5, 0, 0, 0, 10_000, 4, 4000)  # type: ignore[arg-type]
                  for i, s in enumerate(replicas))
    pool = PoolObservation("default", views, 1, pending=0, arrivals=arrivals, arrival_tokens=1000 * arrivals,
                           completions=0, p99_latency_s=math.nan, p99_ttft_s=math.nan, slo_violations=0)
    return ClusterObservation(10.0, 5.0, total, free, {"default": pool})


def test_encoder_stacks_history_and_checks_pools() -> None:
    enc = FeatureEncoder(["default"], history=2)
    first = enc.encode(_obs(["ready"], 7, arrivals=0))
    assert first.shape == (enc.size,) and first.dtype == np.float32
    assert np.array_equal(first[: enc.frame_size], first[enc.frame_size:])  # history padded with the first
    second = enc.encode(_obs(["ready"], 7, arrivals=50))
    assert np.array_equal(second[enc.frame_size:], first[: enc.frame_size])  # previous frame moved back
    assert not np.array_equal(second[: enc.frame_size], first[: enc.frame_size])
    with pytest.raises(ValueError, match="trained on pools \\['other'\\]"):
        FeatureEncoder(["other"]).encode(_obs(["ready"], 7))
    residual = FeatureEncoder(["default"], history=1, residual=True)
    assert residual.size == enc.frame_size + 2
    state = Residual(make_scaler("static", replicas=6), ["default"], max_offset=3)
    state.observe(_obs(["ready"], 7))
    x = residual.encode(_obs(["ready"], 7), state)
    assert list(x[-3:]) == pytest.approx([6 / 8, 0.5, 7 / 8])  # base target share, offset 0 of -3..3, free share
    with pytest.raises(ValueError, match="needs its Residual state"):
        residual.encode(_obs(["ready"], 7))


def test_slow_features_average_the_arrival_rate_over_minutes() -> None:
    """A steady rate reads as itself; after a jump the 60 s average moves most of the way within a minute,
    the 240 s one less; reset() forgets the past."""
    enc = FeatureEncoder(["default"], history=1)
    at = {name: len(INSTANT_FEATURES) + k for k, name in enumerate(SLOW_FEATURES)}
    fast, slow = "log_arrivals_per_s_ewma_60s", "log_arrivals_per_s_ewma_240s"
    for _ in range(3):
        x = enc.encode(_obs(["ready"], 7, arrivals=10))  # 2 calls/s over the 5 s interval
    assert x[at[fast]] == pytest.approx(math.log1p(2.0) / 3) == pytest.approx(x[at[slow]])
    for _ in range(12):  # one minute at 20 calls/s
        x = enc.encode(_obs(["ready"], 7, arrivals=100))
    rate = {k: math.expm1(3 * x[at[k]]) for k in (fast, slow)}
    assert 2.0 + 0.6 * 18 < rate[fast] < 20.0  # 1 - 1/e of the jump within one time constant
    assert 2.0 < rate[slow] < 2.0 + 0.3 * 18
    enc.reset()
    x = enc.encode(_obs(["ready"], 7, arrivals=0))
    assert x[at[fast]] == 0.0 == x[at[slow]]


def test_actions_name_replica_counts_within_min_replicas_and_free_gpus() -> None:
    obs = _obs(["ready", "starting", "draining"], free=5)
    assert targets_from_action(obs, [3], ["default"]) == {"default": 4}
    assert targets_from_action(obs, [0], ["default"]) == {"default": 1}
    assert targets_from_action(obs, [7], ["default"]) == {"default": 7}  # 2 active + 5 free GPUs
    assert targets_from_action(obs, [0], ["default"], min_replicas=2) == {"default": 2}
    # residual: the base's target plus the offset the action names, clipped to +-max_offset and rounded
    res = Residual(make_scaler("static", replicas=4), ["default"], max_offset=2)
    res.observe(obs)
    steps = [targets_from_action(obs, [a], ["default"], 1, res)["default"] for a in (-2.0, 0.4, 1.6, -0.6, 9.0)]
    assert steps == [2, 4, 6, 3, 6] and res.offsets == {"default": 2}
    assert targets_from_action(obs, [-2.0], ["default"], 5, res) == {"default": 5}  # min_replicas still holds
    with pytest.raises(ValueError, match="residual action nan for pool 'default' is not a finite number"):
        targets_from_action(obs, [float("nan")], ["default"], 1, res)


# --- training and the artifact ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from experiments.train_scaler import QUICK, train

    cfg = replace(QUICK, timesteps=1024, n_envs=2, n_steps=128, eval_every=512, eval_episodes=1,
                  env=replace(SMALL, episode_s=60.0))
    stem = tmp_path_factory.mktemp("ckpt") / "tiny"
    curve = train(cfg, seed=0, save_to=stem)
    return stem, curve


def test_quick_training_saves_a_checkpoint_that_runs_in_the_simulator(trained) -> None:
    stem, curve = trained
    assert stem.with_suffix(".zip").exists()
    meta = json.loads(stem.with_suffix(".json").read_text())
    assert meta["encoder_version"] == ENCODER_VERSION and meta["timesteps"] >= 1024
    assert meta["selected_at"] in set(curve.loc[curve["curve"] == "val PPO", "timesteps"])
    assert meta["reward"]["w_slo"] == SMALL.w_slo and meta["workloads"]["trace"] == "azure-code"
    assert meta["residual_of"] == "pythia" and meta["max_offset"] == SMALL.max_offset
    assert set(curve["curve"]) == {"val PPO", "train PPO (reward - pythia's)", "val pythia heuristic",
                                   "val static full"}
    assert curve.loc[curve["curve"] == "val PPO", "timesteps"].max() >= 1024

    scaler = make_scaler("rl", path=stem)
    ep = sample_episode(replace(SMALL, split="test", episode_s=60.0), np.random.default_rng(0))
    res = simulate(ep.table, ep.cluster, make_router("round_robin"), scaler)
    assert (res.requests["status"] == "ok").all()
    assert res.cluster["gpus_in_use"].between(1, ep.cluster.num_gpus).all()


def test_training_and_the_trained_scaler_are_deterministic(trained, tmp_path) -> None:
    """Same config and seed: the same learning curve and weights; the loaded policy replays a run exactly."""
    import torch
    from stable_baselines3 import PPO

    from experiments.train_scaler import QUICK, train

    cfg = replace(QUICK, timesteps=256, n_envs=1, n_steps=128, eval_every=128, eval_episodes=1,
                  env=replace(SMALL, episode_s=30.0))
    curves = [train(cfg, seed=3, save_to=tmp_path / f"run{k}") for k in range(2)]
    pd.testing.assert_frame_equal(curves[0], curves[1], check_exact=True)
    weights = [PPO.load(tmp_path / f"run{k}.zip", device="cpu").policy.state_dict() for k in range(2)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])

    stem, _ = trained
    ep = sample_episode(replace(SMALL, split="test", episode_s=60.0), np.random.default_rng(4))
    runs = [simulate(ep.table, ep.cluster, make_router("round_robin"), make_scaler("rl", path=stem)) for _ in range(2)]
    pd.testing.assert_frame_equal(runs[0].cluster, runs[1].cluster, check_exact=True)
    pd.testing.assert_frame_equal(runs[0].requests, runs[1].requests, check_exact=True)


def test_a_mismatched_encoder_version_is_refused(trained, tmp_path) -> None:
    stem, _ = trained
    other = tmp_path / "old"
    shutil.copy(stem.with_suffix(".zip"), other.with_suffix(".zip"))
    meta = json.loads(stem.with_suffix(".json").read_text())
    other.with_suffix(".json").write_text(json.dumps({**meta, "encoder_version": ENCODER_VERSION + 1}))
    with pytest.raises(ValueError, match=f"encoder version {ENCODER_VERSION + 1}.*Retrain"):
        make_scaler("rl", path=other)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_scaler("rl", path=tmp_path / "missing")


def _checkpoint_like_shipped(tmp_path, name: str, *, zip_bytes: bytes | None = None, meta: object = None):
    """A copy of the shipped checkpoint with its zip bytes or its JSON replaced."""
    zip_path, json_path = checkpoint_paths(DEFAULT_CHECKPOINT)
    stem = tmp_path / name
    stem.with_suffix(".zip").write_bytes(zip_path.read_bytes() if zip_bytes is None else zip_bytes)
    stem.with_suffix(".json").write_text(json_path.read_text() if meta is None else json.dumps(meta))
    return stem


def test_malformed_checkpoints_are_refused_naming_file_and_field(tmp_path) -> None:
    import io
    import zipfile

    meta = read_checkpoint_meta(DEFAULT_CHECKPOINT)
    swapped = list(meta["features"])
    swapped[0], swapped[1] = swapped[1], swapped[0]
    no_data = io.BytesIO()
    with zipfile.ZipFile(no_data, "w") as z:
        z.writestr("readme.txt", "not a policy")
    zip_bytes = checkpoint_paths(DEFAULT_CHECKPOINT)[0].read_bytes()
    cases = [
        ("truncated", {"zip_bytes": zip_bytes[:1000]},
         r"truncated\.zip: not a loadable stable-baselines3 PPO checkpoint"),
        ("no_data", {"zip_bytes": no_data.getvalue()}, r"no_data\.zip: not a loadable stable-baselines3 PPO checkpoint "
                                                       r"\(AssertionError"),
        ("version_text", {"meta": {**meta, "encoder_version": str(ENCODER_VERSION)}},
         rf"version_text\.json: field 'encoder_version' is '{ENCODER_VERSION}' \(a str\); expected the integer "
         rf"{ENCODER_VERSION}"),
        ("reordered", {"meta": {**meta, "features": swapped}},
         r"reordered\.json: field 'features' differs from this code's encoder at position 0: the checkpoint has "
         r"'ready_share', the encoder 'active_gpu_share'"),
        ("fewer", {"meta": {**meta, "features": meta["features"][:-1]}}, r"fewer\.json: field 'features' differs .* "
                                                                         r"position 23: .*'\(end of list\)'"),
        ("no_features", {"meta": {k: v for k, v in meta.items() if k != "features"}},
         r"no_features\.json: missing field 'features'"),
        ("a_list", {"meta": [1, 2]}, r"a_list\.json: expected a JSON object of checkpoint fields, got a list"),
        ("history_bool", {"meta": {**meta, "history": True}},
         r"history_bool\.json: field 'history' is True \(a bool\)"),
        ("no_pools", {"meta": {**meta, "pools": []}}, r"no_pools\.json: field 'pools' is \[\]; expected a non-empty"),
    ]
    for name, change, match in cases:
        with pytest.raises(ValueError, match=match):
            make_scaler("rl", path=_checkpoint_like_shipped(tmp_path, name, **change))
    assert isinstance(make_scaler("rl", path=_checkpoint_like_shipped(tmp_path, "intact")), RLScaler)


def test_the_shipped_checkpoint_is_a_full_run_on_the_current_environment() -> None:
    """policies/checkpoints/ppo-scaler: what `python -m experiments.run train-scaler --seeds K` wrote, loadable as
    is: the seed that scored best on validation, and every seed's checkpoint beside it (fig12 plays them all)."""
    from experiments.train_scaler import FULL, seed_stem

    meta = read_checkpoint_meta(DEFAULT_CHECKPOINT)
    # SB3 finishes the rollout it is in: the steps taken are the requested ones rounded up to n_envs * n_steps
    assert meta["train_config"]["timesteps"] == FULL.timesteps and meta["algorithm"] == "PPO"
    assert FULL.timesteps <= meta["timesteps"] < FULL.timesteps + FULL.n_envs * FULL.n_steps
    assert meta["train_config"]["use_sde"] == FULL.use_sde and meta["train_config"]["net_arch"] == list(FULL.net_arch)
    assert EnvConfig.from_dict(meta["env_config"]) == EnvConfig()  # trained on today's default episodes
    assert len(meta["seeds"]) >= 2 and meta["seed"] in meta["seeds"]
    seeds = [read_checkpoint_meta(seed_stem(DEFAULT_CHECKPOINT, s)) for s in meta["seeds"]]
    assert [m["seed"] for m in seeds] == meta["seeds"] and all(m["timesteps"] == meta["timesteps"] for m in seeds)
    assert meta["selected_val_reward"] == max(m["selected_val_reward"] for m in seeds)
    for stem in (DEFAULT_CHECKPOINT, *(seed_stem(DEFAULT_CHECKPOINT, s) for s in meta["seeds"])):
        assert checkpoint_paths(stem)[0].stat().st_size < 5 * 2**20
    scaler = make_scaler("rl")
    assert isinstance(scaler, RLScaler) and scaler.pools == ["default"]
    ep = sample_episode(replace(EnvConfig(), split="test", episode_s=60.0), np.random.default_rng(1))
    res = simulate(ep.table, ep.cluster, make_router("round_robin"), scaler)
    assert (res.requests["status"] == "ok").all()


def _episodes(offsets: dict[str, list[float]], slo: dict[str, float] | None = None) -> pd.DataFrame:
    """fig12's per-episode rows: the heuristic's GPU-seconds 1000 + 10 k on episode k, others offset from it."""
    rows = []
    for k, base in enumerate([1000.0 + 10 * k for k in range(6)]):
        for name, d in {"Pythia heuristic": [0.0] * 6, **offsets}.items():
            rows.append({"scaler": name, "episode": k, "gpu_seconds": base + d[k],
                         "slo_attainment": 0.99 + (slo or {}).get(name, 0.0), "p99_latency_s": 10.0,
                         "mean_jct_s": 50.0, "gpus_min": 1, "gpus_max": 8})
    return pd.DataFrame(rows)


def test_fig12_intervals_across_seeds_decide_whether_the_advantage_holds() -> None:
    from scipy import stats

    from experiments.fig12 import summarize

    wobble = [1.0, -1.0, 0.5, -0.5, 0.0, 0.0]
    close = summarize(_episodes({"RL (PPO) seed 0": [-10 + w for w in wobble],
                                 "RL (PPO) seed 1": [-10.5 - w for w in wobble]})).set_index("scaler")
    both = close.loc["RL (PPO) mean of 2 seeds"]
    assert both["seeds"] == 2 and both["d_gpu_s"] == pytest.approx(-10.25)
    assert both["d_gpu_s_ci95"] == pytest.approx(stats.t.ppf(0.975, 1) * np.std([-10, -10.5], ddof=1) / np.sqrt(2))
    assert both["d_gpu_s_p"] == pytest.approx(stats.wilcoxon([-10.25] * 6).pvalue)  # seeds averaged per episode
    assert bool(both["advantage_holds"]) and close.loc["RL (PPO) seed 0", "fewer_gpu_s_than_pythia"] == 1.0
    assert close.loc["RL (PPO) seed 0", "d_gpu_s_ci95"] == pytest.approx(
        stats.t.ppf(0.975, 5) * np.std(wobble, ddof=1) / np.sqrt(6))
    assert pd.isna(close.loc["Pythia heuristic", "advantage_holds"]) and close.loc["Pythia heuristic", "d_gpu_s_p"] == 1
    # seeds that disagree: the mean still saves GPU-seconds, but the interval across seeds includes zero
    apart = summarize(_episodes({"RL (PPO) seed 0": [-30.0 + w for w in wobble],
                                 "RL (PPO) seed 1": [5.0 - w for w in wobble]})).set_index("scaler")
    assert apart.loc["RL (PPO) mean of 2 seeds", "d_gpu_s"] < 0 and not apart.loc["RL (PPO) mean of 2 seeds",
                                                                                   "advantage_holds"]
    # fewer GPU-seconds bought with late calls is no advantage
    worse = summarize(_episodes({"RL (PPO) seed 0": [-10.0] * 6, "RL (PPO) seed 1": [-10.0] * 6},
                                slo={"RL (PPO) seed 0": -0.02, "RL (PPO) seed 1": -0.02})).set_index("scaler")
    assert not worse.loc["RL (PPO) mean of 2 seeds", "advantage_holds"]


def test_a_residual_policy_without_offsets_is_refused() -> None:
    with pytest.raises(ValueError, match="max_offset=0: a residual policy needs offsets of at least 1"):
        EnvConfig(max_offset=0)
    with pytest.raises(ValueError, match="max_offset=0"):
        Residual(make_scaler("pythia"), ["default"], max_offset=0)
    assert EnvConfig(max_offset=0, residual_of=None).max_offset == 0  # unused without a residual
