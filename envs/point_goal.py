"""PointGoal: a point on a square moves in four directions toward a goal it cannot see.

An example of a custom Gymnasium environment to copy. The goal's position is a constructor argument, so an
agent pretrained for one goal must adapt to another: a small transfer task that trains in seconds.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

MOVES = np.array([[0.1, 0.0], [-0.1, 0.0], [0.0, 0.1], [0.0, -0.1]], dtype=np.float32)


class PointGoalEnv(gym.Env):
    """Observation: the position and its distances to the four walls (6 floats). Actions: +x, -x, +y, -y.
    Reward: -0.01 per step, +1 on reaching the goal (within 0.15), which ends the episode; ``info["success"]`` says
    whether it was reached (a page can then compare success rates, as Meta-World's tasks report theirs).

    :param goal: The goal position, inside ``[-1, 1]^2``.
    :param max_steps: Steps before the episode is truncated.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, goal: tuple[float, float] = (0.7, 0.7), max_steps: int = 60) -> None:
        self.goal = np.asarray(goal, dtype=np.float32)
        self.max_steps = max_steps
        self.observation_space = spaces.Box(-2.0, 2.0, (6,), np.float32)
        self.action_space = spaces.Discrete(4)
        self._position = np.zeros(2, np.float32)
        self._steps = 0

    def _observation(self) -> np.ndarray:
        x, y = self._position
        return np.array([x, y, 1 - x, 1 + x, 1 - y, 1 + y], dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._position = self.np_random.uniform(-0.3, 0.3, 2).astype(np.float32)
        self._steps = 0
        return self._observation(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        self._position = np.clip(self._position + MOVES[int(action)], -1.0, 1.0)
        self._steps += 1
        reached = bool(np.linalg.norm(self._position - self.goal) < 0.15)
        reward = 1.0 if reached else -0.01
        return self._observation(), reward, reached, self._steps >= self.max_steps, {"success": reached}
