"""The fast MiniGrid view (eva_rl.minigrid_view) against MiniGrid's own, observation for observation."""

import pickle

import gymnasium as gym
import minigrid  # noqa: F401  (registers the ids)
import numpy as np
import pytest
from minigrid.minigrid_env import MiniGridEnv

from eva_rl.experiments.environments import env_factory
from eva_rl.minigrid_view import FastView, speed_up_view

ENVS = [
    "MiniGrid-DoorKey-8x8-v0",
    "MiniGrid-MultiRoom-N2-S4-v0",
    "MiniGrid-KeyCorridorS3R1-v0",
    "MiniGrid-LavaGapS6-v0",
    "MiniGrid-Unlock-v0",
    "MiniGrid-Dynamic-Obstacles-6x6-v0",
    ("MiniGrid-FourRooms-v0", {"see_through_walls": True}),
    ("MiniGrid-DoorKey-6x6-v0", {"agent_view_size": 5}),
]


def _same_view(fast: gym.Env, slow: gym.Env) -> None:
    fast_grid, fast_mask = fast.unwrapped.gen_obs_grid()
    slow_grid, slow_mask = MiniGridEnv.gen_obs_grid(slow.unwrapped)
    np.testing.assert_array_equal(fast_mask, slow_mask)
    np.testing.assert_array_equal(fast_grid.encode(fast_mask), slow_grid.encode(slow_mask))
    for size in (3, 5):  # other view sizes (MiniGrid's agent_sees uses the default; wrappers may ask for others)
        np.testing.assert_array_equal(
            fast.unwrapped.gen_obs_grid(size)[0].encode(), MiniGridEnv.gen_obs_grid(slow.unwrapped, size)[0].encode()
        )


@pytest.mark.parametrize("env_id", ENVS, ids=str)
def test_random_rollouts_see_what_minigrid_sees(env_id: str | tuple[str, dict]) -> None:
    env_id, kwargs = env_id if isinstance(env_id, tuple) else (env_id, {})
    fast, slow = gym.make(env_id, **kwargs), gym.make(env_id, **kwargs)
    assert speed_up_view(fast) and isinstance(fast.unwrapped.gen_obs.__self__, FastView)
    rng = np.random.default_rng(0)
    directions, carried = set(), False
    for episode in range(6):
        obs_fast, _ = fast.reset(seed=episode)
        obs_slow, _ = slow.reset(seed=episode)
        for _ in range(120):
            np.testing.assert_array_equal(obs_fast["image"], obs_slow["image"])
            assert obs_fast["image"].dtype == obs_slow["image"].dtype and obs_fast["image"].flags.c_contiguous
            assert (obs_fast["direction"], obs_fast["mission"]) == (obs_slow["direction"], obs_slow["mission"])
            _same_view(fast, slow)
            directions.add(fast.unwrapped.agent_dir)
            carried |= fast.unwrapped.carrying is not None
            # forward-heavy random actions, pickup and toggle included, so keys get carried and doors opened
            action = int(rng.choice(6, p=[0.2, 0.2, 0.35, 0.1, 0.05, 0.1]))
            obs_fast, r_fast, term_fast, trunc_fast, _ = fast.step(action)
            obs_slow, r_slow, term_slow, trunc_slow, _ = slow.step(action)
            assert (r_fast, term_fast, trunc_fast) == (r_slow, term_slow, trunc_slow)
            if term_fast or trunc_fast:
                break
    assert directions == {0, 1, 2, 3}  # every rotation exercised
    if env_id in ("MiniGrid-DoorKey-8x8-v0", "MiniGrid-Unlock-v0", "MiniGrid-KeyCorridorS3R1-v0"):
        assert carried, "no rollout carried an object: the carried-object cell was not checked"


def test_env_factory_installs_it_and_the_env_still_pickles() -> None:
    env = env_factory("MiniGrid-DoorKey-8x8-v0", ["eva_rl.wrappers:OneHotImage"])()
    assert isinstance(env.unwrapped.gen_obs_grid.__self__, FastView)
    env.reset(seed=3)
    env.step(2)
    copy = pickle.loads(pickle.dumps(env.unwrapped))
    # the copy's view reads the copy's grid, not the original's
    assert copy.gen_obs_grid.__self__.env is copy and copy.gen_obs.__self__.env is copy
    copy.step(1)
    env.unwrapped.step(1)
    slow_grid, slow_mask = MiniGridEnv.gen_obs_grid(copy)
    np.testing.assert_array_equal(copy.gen_obs()["image"], slow_grid.encode(slow_mask))
    np.testing.assert_array_equal(copy.gen_obs()["image"], env.unwrapped.gen_obs()["image"])


def test_envs_with_their_own_view_are_left_alone() -> None:
    class OwnView(MiniGridEnv):
        def gen_obs_grid(self, agent_view_size=None):  # noqa: ANN001, ANN201
            return super().gen_obs_grid(agent_view_size)

    assert not speed_up_view(gym.make("CartPole-v1"))
    env = gym.make("MiniGrid-Empty-5x5-v0")
    env.unwrapped.__class__ = type("Own", (OwnView, type(env.unwrapped)), {})
    assert not speed_up_view(env)


@pytest.mark.parametrize("size", [3, 5, 7])
def test_visibility_matches_process_vis_on_random_walls(size: int) -> None:
    from minigrid.core.grid import Grid
    from minigrid.core.world_object import Door, Key, Wall

    from eva_rl.minigrid_view import _visible

    rng = np.random.default_rng(size)
    for _ in range(300):
        grid = Grid(size, size)
        for index in range(size * size):
            kind = rng.choice(4, p=[0.55, 0.3, 0.1, 0.05])  # empty, wall (opaque), open door, key (see-through)
            grid.grid[index] = [None, Wall(), Door("red", is_open=True), Key()][kind]
        cells = list(grid.grid)
        expected = grid.process_vis(agent_pos=(size // 2, size - 1))
        np.testing.assert_array_equal(np.array(_visible(cells, size)).reshape(size, size).T, expected)
