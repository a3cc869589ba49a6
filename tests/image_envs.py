"""A small image env as users write them: HWC uint8 frames (height, width, channels), for CnnPolicy agents."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np


class ColorTargetEnv(gym.Env):
    """A 36x36 RGB frame shows one of two colours; the action that names the colour earns 1. Eight steps an
    episode. 36x36 is the smallest frame SB3's NatureCNN takes."""

    metadata = {"render_modes": []}

    def __init__(self) -> None:
        self.observation_space = gym.spaces.Box(0, 255, (36, 36, 3), np.uint8)
        self.action_space = gym.spaces.Discrete(2)
        self._colour, self._steps = 0, 0

    def _frame(self) -> np.ndarray:
        frame = np.zeros((36, 36, 3), np.uint8)
        frame[..., self._colour] = 200
        return frame

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._colour, self._steps = int(self.np_random.integers(2)), 0
        return self._frame(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        reward = float(int(action) == self._colour)
        self._colour, self._steps = int(self.np_random.integers(2)), self._steps + 1
        return self._frame(), reward, False, self._steps >= 8, {}
