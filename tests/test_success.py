"""Success rates: an episode succeeds if the env set ``info["success"]`` at any of its steps (Continual World)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import DummyVecEnv

from eva_rl.experiments.training import evaluate


class Flicker(gym.Env):
    """Five-step episodes whose success shows at step 2 only, in every other episode (``every=2``) or every one."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, every: int = 2, report: bool = True) -> None:
        self.every, self.report, self.episode, self.t = every, report, -1, 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.episode, self.t = self.episode + 1, 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        info = {"success": float(self.t == 2 and self.episode % self.every == 0)} if self.report else {}
        return np.zeros(2, np.float32), 1.0, self.t == 5, False, info


@pytest.mark.parametrize(("every", "report", "expected"), [(1, True, 1.0), (2, True, 4 / 6), (1, False, None)])
def test_the_success_rate_counts_success_at_any_step_of_each_episode(every: int, report: bool, expected) -> None:
    env = DummyVecEnv([lambda: Flicker(every, report)] * 2)
    model = PPO("MlpPolicy", env, n_steps=16, batch_size=16, seed=0, device="cpu")
    # 3 episodes per copy: episodes 0 and 2 of each succeed at step 2 (and never at their last step, 5)
    evaluation = evaluate(model, env, episodes=6, seed=0)
    assert evaluation.mean == 5.0 and evaluation.success_rate == expected
