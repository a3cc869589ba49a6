"""OneHotImage against a cell-by-cell encoding."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

from eva_rl.wrappers import N_COLORS, N_OBJECTS, N_STATES, OneHotImage


class _CodeImages(gym.Env):
    """A MiniGrid-shaped observation space: a ``(height, width, 3)`` image of codes and a direction."""

    def __init__(self, height: int, width: int) -> None:
        image = spaces.Box(0, 255, (height, width, 3), np.uint8)
        self.observation_space = spaces.Dict({"image": image, "direction": spaces.Discrete(4)})
        self.action_space = spaces.Discrete(3)


def _one_hot_by_cell(image: np.ndarray) -> np.ndarray:
    height, width, _ = image.shape
    encoded = np.zeros((N_OBJECTS + N_COLORS + N_STATES, height, width), np.float32)
    for row in range(height):
        for col in range(width):
            obj, color, state = (int(code) for code in image[row, col])
            encoded[obj, row, col] = encoded[N_OBJECTS + color, row, col] = 1.0
            encoded[N_OBJECTS + N_COLORS + state, row, col] = 1.0
    return encoded


@pytest.mark.parametrize("shape", [(7, 7), (5, 5), (3, 6)])
def test_each_cell_sets_its_three_channels(shape: tuple[int, int]) -> None:
    wrapper = OneHotImage(_CodeImages(*shape))
    rng = np.random.default_rng(0)
    for _ in range(50):
        codes = [rng.integers(0, n, shape) for n in (N_OBJECTS, N_COLORS, N_STATES)]
        image = np.stack(codes, axis=-1).astype(np.uint8)
        encoded = wrapper.observation({"image": image, "direction": 0})
        assert encoded.shape == wrapper.observation_space.shape
        np.testing.assert_array_equal(encoded, _one_hot_by_cell(image))
        assert (encoded.sum(axis=0) == 3).all()


def test_a_flat_observation_is_refused() -> None:
    env = _CodeImages(7, 7)
    env.observation_space = env.observation_space["image"]
    with pytest.raises(ValueError, match="needs a MiniGrid Dict observation"):
        OneHotImage(env)
