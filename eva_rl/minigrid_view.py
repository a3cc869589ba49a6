"""MiniGrid's egocentric view, computed faster and identically.

MiniGrid builds the agent's view every step by slicing the world into a new grid, rotating it cell by cell once
per quarter turn, flood-filling visibility through numpy scalar indexing and encoding it cell by cell
(``MiniGridEnv.gen_obs_grid``, ``gen_obs``): in our profiles that is most of a DoorKey-8x8 env step, and env
steps are most of a MiniGrid evaluation. :func:`speed_up_view` computes the same view with one gather through a
precomputed map of view cells to world cells and the same flood fill on plain lists. The map is derived by
running MiniGrid's own ``Grid.rotate_left`` on a grid of markers; ``tests/test_minigrid_view.py`` compares every
observation and visibility mask of random rollouts on several envs with MiniGrid's.
"""

from __future__ import annotations

import sys
from functools import cache
from typing import Any

import gymnasium as gym
import numpy as np

_UNSEEN, _EMPTY = (0, 0, 0), (1, 0, 0)  # minigrid.core.constants: OBJECT_TO_IDX "unseen" 0, "empty" 1


@cache
def _view_map(size: int, direction: int) -> tuple[tuple[int, int], ...]:
    """For each cell of the rotated view (MiniGrid's flat order, ``j * size + i``), the offset of the world cell it
    shows from the view's top-left world corner, for an agent facing ``direction``."""
    from minigrid.core.grid import Grid

    markers = Grid(size, size)
    markers.grid = [(i, j) for j in range(size) for i in range(size)]
    for _ in range(direction + 1):  # MiniGrid rotates direction + 1 quarter turns
        markers = markers.rotate_left()
    return tuple(markers.grid)


def _visible(cells: list[Any], size: int) -> list[bool]:
    """``Grid.process_vis`` from the agent's cell (bottom middle) on a flat list: the same sweeps in the same order."""
    mask = [False] * (size * size)
    mask[(size - 1) * size + size // 2] = True
    for j in reversed(range(size)):
        row, above = j * size, (j - 1) * size
        for i in range(size - 1):
            cell = cells[row + i]
            if not mask[row + i] or (cell and not cell.see_behind()):
                continue
            mask[row + i + 1] = True
            if j > 0:
                mask[above + i + 1] = mask[above + i] = True
        for i in reversed(range(1, size)):
            cell = cells[row + i]
            if not mask[row + i] or (cell and not cell.see_behind()):
                continue
            mask[row + i - 1] = True
            if j > 0:
                mask[above + i - 1] = mask[above + i] = True
    return mask


class FastView:
    """The view of one MiniGrid env: ``grid(size)`` replaces its ``gen_obs_grid`` and ``obs()`` its ``gen_obs``
    (objects, not bound functions, so the env still pickles).

    :param env: The unwrapped ``MiniGridEnv``.
    """

    def __init__(self, env: Any) -> None:
        from minigrid.core.world_object import Wall

        self.env = env
        self._wall = Wall()

    def cells(self, agent_view_size: int | None = None, outside: Any = None) -> tuple[list[Any], list[bool], int]:
        """The view's cells (flat, occluded cells ``None``, the carried object in the agent's cell), its visibility
        mask (flat) and its size.

        :param outside: The wall shown beyond the grid's edge; default: a new ``Wall`` per cell, as MiniGrid makes
            (``obs`` only reads the cells, so it passes one wall for all).
        """
        from minigrid.core.world_object import Wall

        env = self.env
        top_x, top_y, _, _ = env.get_view_exts(agent_view_size)
        size = agent_view_size or env.agent_view_size
        width, height, world = env.grid.width, env.grid.height, env.grid.grid
        cells = [
            world[(top_y + j) * width + top_x + i]
            if 0 <= top_x + i < width and 0 <= top_y + j < height
            else outside or Wall()
            for i, j in _view_map(size, env.agent_dir)
        ]
        if env.see_through_walls:
            mask = [True] * (size * size)
        else:
            mask = _visible(cells, size)
            cells = [cell if seen else None for cell, seen in zip(cells, mask)]
        cells[(size - 1) * size + size // 2] = env.carrying or None
        return cells, mask, size

    def grid(self, agent_view_size: int | None = None) -> tuple[Any, np.ndarray]:
        """What ``MiniGridEnv.gen_obs_grid`` returns: the view as a ``Grid`` and its ``(width, height)`` mask."""
        from minigrid.core.grid import Grid

        cells, mask, size = self.cells(agent_view_size)
        view = Grid(size, size)
        view.grid = cells
        return view, np.array(mask, dtype=bool).reshape(size, size).T

    def obs(self) -> dict[str, Any]:
        """What ``MiniGridEnv.gen_obs`` returns: the encoded view (``(width, height, 3)`` uint8), direction, mission."""
        cells, mask, size = self.cells(outside=self._wall)
        codes = [(_EMPTY if cell is None else cell.encode()) if seen else _UNSEEN for cell, seen in zip(cells, mask)]
        image = np.ascontiguousarray(np.array(codes, dtype=np.uint8).reshape(size, size, 3).transpose(1, 0, 2))
        return {"image": image, "direction": self.env.agent_dir, "mission": self.env.mission}


def speed_up_view(env: gym.Env) -> bool:
    """Give ``env``'s MiniGrid core the fast view, if it is a ``MiniGridEnv`` that keeps MiniGrid's own
    ``gen_obs_grid`` and ``gen_obs`` (an env class with its own view is left alone).

    :return: Whether the fast view was installed.
    """
    if "minigrid" not in sys.modules:  # not a MiniGrid env: MiniGrid was never imported
        return False
    from minigrid.minigrid_env import MiniGridEnv

    core = env.unwrapped
    if (
        not isinstance(core, MiniGridEnv)
        or type(core).gen_obs_grid is not MiniGridEnv.gen_obs_grid
        or type(core).gen_obs is not MiniGridEnv.gen_obs
    ):
        return False
    view = FastView(core)
    core.gen_obs_grid, core.gen_obs = view.grid, view.obs
    return True
