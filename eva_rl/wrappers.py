"""Observation encodings for MiniGrid."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

# MiniGrid cell codes (minigrid.core.constants): 11 object types, 6 colours, 3 door states.
N_OBJECTS, N_COLORS, N_STATES = 11, 6, 3


class OneHotImage(gym.ObservationWrapper):
    """MiniGrid's egocentric view as a channels-first one-hot image, ``(11 + 6 + 3, 7, 7)`` float32.

    MiniGrid's ``image`` holds small integer codes (object, colour, state), not pixels: SB3 would divide them by
    255, and a code's magnitude means nothing. One channel per code gives the policy categorical inputs. The
    view size is the same for every grid size, so an agent trained on DoorKey-5x5 acts on DoorKey-8x8.
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        image = env.observation_space["image"] if isinstance(env.observation_space, spaces.Dict) else None
        if image is None:
            raise ValueError(f"OneHotImage needs a MiniGrid Dict observation with 'image', got {env.observation_space}")
        height, width, _ = image.shape
        self.observation_space = spaces.Box(0.0, 1.0, (N_OBJECTS + N_COLORS + N_STATES, height, width), np.float32)
        self._offsets = np.array([0, N_OBJECTS, N_OBJECTS + N_COLORS])
        rows, cols = np.indices((height, width))
        self._rows, self._cols = rows[..., None], cols[..., None]  # broadcast over the three codes of a cell

    def observation(self, observation: dict) -> np.ndarray:
        codes = observation["image"].astype(np.int64) + self._offsets  # (H, W, 3) channel indices
        encoded = np.zeros(self.observation_space.shape, np.float32)
        encoded[codes, self._rows, self._cols] = 1.0
        return encoded
