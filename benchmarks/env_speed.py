"""Environment steps per wall-second of ``PythiaScaling-v0`` (one step = one 5 s control interval).

`python benchmarks/env_speed.py [--episodes N] [--quick]`: random actions on the default training
episodes, one process; prints steps/s with and without the resets (workload sampling + cluster set-up),
and the hours one core needs for a million steps.
"""

from __future__ import annotations

import argparse
import time

from sim.env import ScalingEnv
from sim.episodes import EnvConfig, job_bank


def measure(episodes: int, cfg: EnvConfig, seed: int = 0) -> dict[str, float]:
    env = ScalingEnv(cfg)
    job_bank(cfg.workflow, cfg.split)  # generated once per process: not part of the per-step cost
    env.reset(seed=seed)
    env.action_space.seed(seed)
    steps, reset_s, t0 = 0, 0.0, time.perf_counter()
    for k in range(episodes):
        t = time.perf_counter()
        env.reset(seed=seed + k)
        reset_s += time.perf_counter() - t
        done = False
        while not done:
            _, _, terminated, truncated, _ = env.step(env.action_space.sample())
            steps += 1
            done = terminated or truncated
    wall = time.perf_counter() - t0
    return {"episodes": episodes, "steps": steps, "wall_s": wall, "steps_per_s": steps / wall,
            "steps_per_s_without_resets": steps / (wall - reset_s), "reset_s": reset_s / episodes}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="3 episodes")
    args = ap.parse_args(argv)
    cfg = EnvConfig()
    r = measure(3 if args.quick else args.episodes, cfg)
    print(f"{r['steps']} steps in {r['episodes']} episodes of {cfg.episode_s:.0f} s simulated, "
          f"{r['wall_s']:.1f} s wall: {r['steps_per_s']:.1f} env steps/s "
          f"({r['steps_per_s_without_resets']:.1f} without resets; {r['reset_s'] * 1e3:.0f} ms per reset); "
          f"1M steps = {1e6 / r['steps_per_s'] / 3600:.1f} core-hours")


if __name__ == "__main__":
    main()
