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
import numbers
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, SupportsFloat

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.atari_wrappers import EpisodicLifeEnv
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv

from eva_rl.errors import EnvError, EvaRLError
from eva_rl.experiments.tasks import ROOT
from eva_rl.loading import PretrainedAgent
from eva_rl.minigrid_view import speed_up_view
from eva_rl.physics import is_mujoco_env, mujoco_warnings

if TYPE_CHECKING:
    from eva_rl.experiments.tasks import TaskConfig


def _importable_cwd() -> None:
    """The working directory first (a user's own env package), the project root last (the task files' ``envs``
    package, wherever the command runs from)."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    root = str(ROOT)
    if root not in sys.path:
        sys.path.append(root)


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


PLUGIN_PACKAGES = {"MiniGrid": "minigrid", "ALE/": "ale_py", "NoFrameskip-v4": "ale_py", "Deterministic-v4": "ale_py"}
"""Packages that register ids on import, by a piece of the ids they register (rl-zoo3 imports them all up front;
these are imported only when an id names them)."""


def register_plugin_ids(env_id: str) -> str | None:
    """Import the package that registers ``env_id`` (MiniGrid, the Arcade Learning Environment's Atari games) if the
    id is not registered yet.

    :return: the package ``env_id`` needs where it is not installed, for the unknown-id error; else ``None``.
    """
    if env_id in gym.registry:
        return None
    for piece, package in PLUGIN_PACKAGES.items():
        if piece in env_id:
            try:
                module = importlib.import_module(package)
            except ImportError:
                return package
            gym.register_envs(module)  # ale_py registers on this call, not on import
    return None


WrapperSpec = str | dict[str, dict[str, Any]]
"""A wrapper: ``"module:Class"`` (or ``"module.Class"``), or rl-zoo3's ``{"module.Class": {kwargs}}``."""


def load_wrapper(spec: WrapperSpec) -> Callable[[gym.Env], gym.Env]:
    """The wrapper named by ``spec``, with its keyword arguments bound.

    :raises EnvError: for a spec that is neither form, or a class that cannot be imported.
    """
    if isinstance(spec, dict) and len(spec) == 1:
        ((path, kwargs),) = spec.items()
        wrapper_class = load_object(path, "wrapper")
        return lambda env: wrapper_class(env, **(kwargs or {}))
    if isinstance(spec, str):
        return load_object(spec, "wrapper")
    raise EnvError(f"wrapper {spec!r} is invalid: expected 'module:Class' or {{'module.Class': {{kwargs}}}}")


def env_factory(
    env: str,
    wrappers: Sequence[WrapperSpec] = (),
    env_kwargs: dict[str, Any] | None = None,
    known_tasks: Sequence[str] = (),
    render: bool = False,
) -> EnvFactory:
    """A zero-argument constructor for ``env`` (registered id or ``module:Class``) with ``wrappers`` applied.

    :param env: A registered id or a ``module:Class`` entry point.
    :param wrappers: Wrappers (:data:`WrapperSpec`), applied in order.
    :param env_kwargs: Keyword arguments for the env.
    :param known_tasks: Task names to list in the error for an unknown id.
    :param render: Make the env with ``render_mode="rgb_array"`` and keep its frames (:class:`FrameRecorder`).
    :raises EnvError: for an unknown id (listing close matches and the known tasks) or entry point.
    """
    env_kwargs = dict(env_kwargs or {}, **({"render_mode": "rgb_array"} if render else {}))
    wrapper_classes = [load_wrapper(w) for w in wrappers]
    if ":" in env:
        env_class = load_object(env, "env entry point")

        def make_base() -> gym.Env:
            return env_class(**env_kwargs)

    else:
        missing = register_plugin_ids(env)
        if env not in gym.registry:
            close = difflib.get_close_matches(env, registered_ids(), n=5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            if missing:
                hint = f" Its ids are registered by {missing!r}, which is not installed (pip install {missing})."
            tasks = f" Known tasks: {', '.join(known_tasks)}." if known_tasks else ""
            raise EnvError(
                f"unknown env {env!r}: not a task in configs/, not a registered Gymnasium id and not a "
                f"'module:Class' entry point.{hint}{tasks} Use --gym-package PKG for packages that register ids."
            )

        if is_mujoco_env(env) and render and "DISPLAY" not in os.environ:
            # Without a display MuJoCo's default (GLFW) cannot render; EGL renders headless on most machines.
            os.environ.setdefault("MUJOCO_GL", "egl")
        if is_mujoco_env(env):

            def make_base() -> gym.Env:
                with mujoco_warnings():
                    return gym.make(env, **env_kwargs)

        else:

            def make_base() -> gym.Env:
                register_plugin_ids(env)  # a worker process started fresh has not imported the plugin yet
                return gym.make(env, **env_kwargs)

    def base() -> gym.Env:
        instance = _named_failure(f"making env {env!r} (env_kwargs {env_kwargs})", make_base)
        if not isinstance(instance, gym.Env):
            raise EnvError(
                f"env {env!r} made a {type(instance).__name__}, not a gymnasium.Env; expected an entry point that "
                "returns an env"
            )
        speed_up_view(instance)
        instance = GymnasiumApi(instance, env)
        return FrameRecorder(instance) if render else instance

    def wrap(instance: gym.Env) -> gym.Env:
        for spec, wrapper in zip(wrappers, wrapper_classes):
            instance = _named_failure(f"wrapping env {env!r} in {spec!r}", wrapper, instance)
        if wrappers:
            instance = EpisodesEndedByWrappers(instance)
        return CheckedEnv(instance, env)

    return EnvFactory(base, wrap)


@dataclass(frozen=True)
class EnvFactory:
    """Makes an env in two steps, so that :func:`make_vec` can put SB3's ``Monitor`` between them, where
    ``make_vec_env(wrapper_class=...)`` and rl-zoo3 put it: a wrapper that ends episodes early or reshapes rewards
    (``AtariWrapper`` ends one at each lost life and clips rewards) leaves the episode returns evaluations report
    those of the game itself.

    :param base: Makes the env itself.
    :param wrap: Applies the wrappers to it.
    """

    base: Callable[[], gym.Env]
    wrap: Callable[[gym.Env], gym.Env]

    def __call__(self) -> gym.Env:
        return self.wrap(self.base())


def _named_failure(doing: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)``, with an exception from a user's env code turned into an :class:`EnvError` that says
    what failed."""
    try:
        return call(*args, **kwargs)
    except EvaRLError:
        raise
    except Exception as error:
        raise EnvError(f"{doing} failed: {type(error).__name__}: {error}") from error


class FrameRecorder(gym.Wrapper):
    """Keeps the frame the env renders after each ``reset`` and ``step`` (the last frame of an episode included,
    which a VecEnv's automatic reset would otherwise replace)."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.frames: list[np.ndarray] = []

    def _keep_frame(self) -> None:
        name = self.env.spec.id if self.env.spec else type(self.env.unwrapped).__name__
        frame = _named_failure(f"rendering env {name!r}", self.env.render)
        if not isinstance(frame, np.ndarray) or frame.ndim != 3:
            raise EnvError(
                f"env {name!r} renders no rgb_array frames (render_mode='rgb_array'), so it cannot be recorded"
            )
        self.frames.append(frame)

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        result = self.env.reset(**kwargs)
        self._keep_frame()
        return result

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        result = self.env.step(action)
        self._keep_frame()
        return result


_SB3_SPACES = (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)


class GymnasiumApi(gym.Wrapper):
    """Holds a user's env to Gymnasium's API where it returns, so that a violation is one error naming it rather than
    a traceback from SB3 (or worse, a wrong result: a ``reset()`` that returns a 2-vector alone unpacks as an
    observation and its info). Every reset and each episode's first step are checked whole; later steps only for
    their 5-tuple, since rollouts step envs in a hot loop (checking all of every step cost 11% of DoorKey's env
    stepping) and an env that breaks the API does so from its first step.

    :param env: The env as made (below every wrapper).
    :param name: The env's id or entry point, for messages.
    """

    def __init__(self, env: gym.Env, name: str) -> None:
        super().__init__(env)
        self.name = name
        self._checked_step = False

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        self._checked_step = False
        result = self.env.reset(**kwargs)
        if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict)):
            raise EnvError(
                f"env {self.name!r} reset() returned {_described(result)}; Gymnasium's API returns (observation, "
                "info), info a dict (an env written for the old Gym API needs porting)"
            )
        self._check_observation(result[0], "reset()")
        return result

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        result = self.env.step(action)
        if self._checked_step and type(result) is tuple and len(result) == 5:
            return result  # the rest of an episode whose first step kept the API: rollouts are a hot path
        self._checked_step = True
        if not (isinstance(result, tuple) and len(result) == 5):
            raise EnvError(
                f"env {self.name!r} step() returned {_described(result)}; Gymnasium's API returns (observation, "
                "reward, terminated, truncated, info) (an env written for the old Gym API, with done, needs porting)"
            )
        observation, reward, terminated, truncated, info = result
        for what, value, accepted, expected in (
            ("reward", reward, isinstance(reward, numbers.Real), "a number"),
            ("terminated", terminated, isinstance(terminated, bool | np.bool_), "a bool"),
            ("truncated", truncated, isinstance(truncated, bool | np.bool_), "a bool"),
            ("info", info, isinstance(info, dict), "a dict"),
        ):
            if not accepted:
                raise EnvError(f"env {self.name!r} step() returned the {what} {value!r:.60}; expected {expected}")
        self._check_observation(observation, "step()")
        return result

    def _check_observation(self, observation: Any, where: str) -> None:
        space = self.observation_space
        if isinstance(space, spaces.Box) and np.shape(observation) != space.shape:
            raise EnvError(
                f"env {self.name!r} {where} returned an observation of shape {np.shape(observation)}, but its "
                f"observation_space is {space}; expected shape {space.shape}"
            )
        if isinstance(space, spaces.Dict) and (
            not isinstance(observation, dict) or set(observation) != set(space.spaces)
        ):
            keys = sorted(observation) if isinstance(observation, dict) else type(observation).__name__
            raise EnvError(
                f"env {self.name!r} {where} returned an observation with keys {keys}, but its observation_space "
                f"has {sorted(space.spaces)}"
            )


def _described(value: Any) -> str:
    if isinstance(value, tuple):
        return f"a {len(value)}-tuple"
    return f"a {type(value).__name__} alone"


def wrapper_chain(env: gym.Env) -> list[gym.Env]:
    """``env`` and every env it wraps, outermost first (the last is the env itself)."""
    chain = [env]
    while isinstance(chain[-1], gym.Wrapper):
        chain.append(chain[-1].env)
    return chain


def start_new_games(env: VecEnv) -> None:
    """Make the next reset of every env of ``env`` start a new game. SB3's ``EpisodicLifeEnv`` (in ``AtariWrapper``)
    ends an episode at each lost life and, unless the game is over, resets by playing on; an evaluation that stopped
    mid-game would hand the next one the rest of that game, its score so far included (scores then grow with every
    evaluation, whatever the policy)."""
    for instance in getattr(env.unwrapped, "envs", ()):
        for wrapper in wrapper_chain(instance):
            if isinstance(wrapper, EpisodicLifeEnv):
                wrapper.was_real_done = True


class EpisodesEndedByWrappers(gym.Wrapper):
    """Reports an episode that a wrapper above the ``Monitor`` ended (a ``TimeLimit`` given as a wrapper) as the
    Monitor would have, in ``info["episode"]``: SB3's ``evaluate_policy`` counts only the Monitor's episodes and would
    otherwise never finish. A life lost under ``EpisodicLifeEnv`` (``AtariWrapper``) is no such end: the game plays
    on, and its score is reported when it is over."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        chain = wrapper_chain(env)
        self.monitor = next((e for e in chain if isinstance(e, Monitor)), None)
        above_monitor = chain[: chain.index(self.monitor)] if self.monitor is not None else chain
        self.lives = [e for e in above_monitor if isinstance(e, EpisodicLifeEnv)]

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        observation, reward, terminated, truncated, info = self.env.step(action)
        if not (terminated or truncated) or "episode" in info or self.monitor is None:
            return observation, reward, terminated, truncated, info
        game_on = any(not lives.was_real_done for lives in self.lives)
        if not game_on and self.monitor.rewards:
            rewards = self.monitor.rewards
            elapsed = time.time() - self.monitor.t_start
            info = {**info, "episode": {"r": round(sum(rewards), 6), "l": len(rewards), "t": round(elapsed, 6)}}
            self.monitor.rewards = []
        return observation, reward, terminated, truncated, info


class CheckedEnv(gym.Wrapper):
    """Names a user env's failures: an exception raised by ``reset()`` or ``step()``, and an observation or reward
    that is not finite, become an :class:`EnvError` naming the env and the episode step, instead of a traceback
    from deep inside torch (a NaN observation fails in the policy's distribution).

    :param env: The env, with the task's wrappers applied (what the agent sees).
    :param name: The env's id or entry point, for messages.
    """

    def __init__(self, env: gym.Env, name: str) -> None:
        super().__init__(env)
        self.name = name
        self.episode_step = 0
        space = env.observation_space
        parts = space.spaces.values() if isinstance(space, spaces.Dict) else (space,)
        if not all(isinstance(part, _SB3_SPACES) for part in parts):
            raise EnvError(
                f"env {name!r} has the observation space {space}, which SB3 policies cannot take: expected Box, "
                "Discrete, MultiDiscrete, MultiBinary or a Dict of them; add a wrapper that encodes the observations "
                "(MiniGrid: --wrapper minigrid.wrappers:ImgObsWrapper, or a task file such as configs/"
                "MiniGrid-DoorKey.yaml)"
            )

    def close(self) -> None:
        """A user's env whose ``close()`` raises is closed as far as it goes, with a warning: its run is done."""
        try:
            self.env.close()
        except Exception as error:
            warnings.warn(f"env {self.name!r} close() raised {type(error).__name__}: {error}", stacklevel=2)

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        self.episode_step = 0
        observation, info = _named_failure(f"env {self.name!r} reset()", self.env.reset, **kwargs)
        self._check(observation, 0.0, "reset()")
        return observation, info

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        self.episode_step += 1
        where = f"step() (step {self.episode_step} of the episode)"
        observation, reward, terminated, truncated, info = _named_failure(
            f"env {self.name!r} {where}", self.env.step, action
        )
        self._check(observation, reward, where)
        return observation, reward, terminated, truncated, info

    def _check(self, observation: Any, reward: SupportsFloat, where: str) -> None:
        parts = observation.values() if isinstance(observation, dict) else (observation,)
        for part in parts:
            array = np.asarray(part)
            if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
                raise EnvError(
                    f"env {self.name!r} returned an observation with NaN or inf in {where}; eva-rl needs finite "
                    "observations: fix the env, or add a wrapper that cleans them"
                )
        if not np.isfinite(float(reward)):
            raise EnvError(
                f"env {self.name!r} returned the reward {float(reward)} in {where}; expected a finite number"
            )


def make_vec(factory: EnvFactory, n_envs: int, seed: int) -> VecEnv:
    """``n_envs`` copies in a ``DummyVecEnv`` (faster than subprocesses for cheap envs), each with a Monitor below
    its wrappers."""
    return make_vec_env(factory.base, n_envs=n_envs, seed=seed, vec_env_cls=DummyVecEnv, wrapper_class=factory.wrap)


def agent_env(
    task: TaskConfig,
    agent: PretrainedAgent,
    n_envs: int,
    seed: int,
    *,
    env_id: str | None = None,
    training: bool = False,
    evaluation: bool = False,
    stats: Path | None = None,
    render: bool = False,
) -> VecEnv:
    """The vectorized env ``agent`` acts in, as it was trained: the task's (or else the agent's recorded) wrappers
    and env kwargs, then the agent's ``VecNormalize`` statistics and frame stack.

    :param env_id: The env (default: the task's target).
    :param training: The statistics keep updating (fine-tuning with ``update_obs_stats``).
    :param evaluation: Returns are summed raw (no reward normalization).
    :param stats: Statistics to use instead of the agent's (a run's own, when it resumes).
    :param render: Record each env's frames (:class:`FrameRecorder`).
    """
    env_id = env_id or task.target_env
    wrappers = task.wrappers or agent.env_wrappers
    # The agent's recorded kwargs were for its own env; a task's kwargs (its physics change) apply over them.
    env_kwargs = {**(agent.env_kwargs if env_id == agent.env_id else {}), **task.env_kwargs}
    venv = make_vec(env_factory(env_id, wrappers, env_kwargs, render=render), n_envs, seed)
    try:
        return agent.wrap_vec_env(venv, training, norm_reward=False if evaluation else None, stats=stats)
    except BaseException:
        venv.close()
        raise
