"""Resolve what a user names as an environment, and build vectorized envs from it.

Three ways to plug an environment in (rl-zoo3's conventions):

- a registered Gymnasium id (``CartPole-v1``, ``MiniGrid-DoorKey-8x8-v0``);
- a ``module:Class`` entry point (``envs.point_goal:PointGoalEnv``);
- a package that registers ids when imported (``--gym-package envs``), then its id.

Packages and entry points are imported with the current directory on ``sys.path``, as ``python -m`` would, so a
project's own ``envs/`` folder works from the project root.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import gymnasium as gym
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv

from eva_rl.errors import EnvError


def _importable_cwd() -> None:
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)


def import_packages(packages: Iterable[str]) -> None:
    """Import packages that register Gymnasium ids on import.

    :raises EnvError: naming the package that cannot be imported.
    """
    _importable_cwd()
    for package in packages:
        try:
            importlib.import_module(package)
        except ImportError as error:
            raise EnvError(f"cannot import gym package {package!r}: {error}") from error


def load_object(path: str, what: str = "object") -> Any:
    """The object named by ``"module:Name"`` (``"module.Name"`` is accepted too).

    :raises EnvError: naming the path when the module or attribute does not exist.
    """
    module_name, sep, attribute = path.partition(":")
    if not sep:
        module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        raise EnvError(f"{what} {path!r} is not of the form 'module:Name'")
    _importable_cwd()
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise EnvError(f"cannot import module {module_name!r} for {what} {path!r}: {error}") from error
    if not hasattr(module, attribute):
        raise EnvError(f"module {module_name!r} has no {attribute!r} (from {what} {path!r})")
    return getattr(module, attribute)


def registered_ids() -> list[str]:
    return sorted(gym.registry.keys())


def env_factory(
    env: str, wrappers: Sequence[str] = (), env_kwargs: dict[str, Any] | None = None, known_tasks: Sequence[str] = ()
) -> Callable[[], gym.Env]:
    """A zero-argument constructor for ``env`` (registered id or ``module:Class``) with ``wrappers`` applied.

    :param env: A registered id or a ``module:Class`` entry point.
    :param wrappers: ``module:Class`` wrappers, applied in order.
    :param env_kwargs: Keyword arguments for the env.
    :param known_tasks: Task names to list in the error for an unknown id.
    :raises EnvError: for an unknown id (listing close matches and the known tasks) or entry point.
    """
    env_kwargs = dict(env_kwargs or {})
    wrapper_classes = [load_object(w, "wrapper") for w in wrappers]
    if ":" in env:
        env_class = load_object(env, "env entry point")

        def make_base() -> gym.Env:
            return env_class(**env_kwargs)

    else:
        if env not in gym.registry:
            close = difflib.get_close_matches(env, registered_ids(), n=5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            tasks = f" Known tasks: {', '.join(known_tasks)}." if known_tasks else ""
            raise EnvError(
                f"unknown env {env!r}: not a task in configs/, not a registered Gymnasium id and not a "
                f"'module:Class' entry point.{hint}{tasks} Use --gym-package PKG for packages that register ids."
            )

        def make_base() -> gym.Env:
            return gym.make(env, **env_kwargs)

    def make() -> gym.Env:
        instance = make_base()
        for wrapper in wrapper_classes:
            instance = wrapper(instance)
        return instance

    return make


def make_vec(factory: Callable[[], gym.Env], n_envs: int, seed: int) -> VecEnv:
    """``n_envs`` copies in a ``DummyVecEnv`` (faster than subprocesses for cheap envs), each with a Monitor."""
    return make_vec_env(factory, n_envs=n_envs, seed=seed, vec_env_cls=DummyVecEnv)
