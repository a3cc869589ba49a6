"""What an exact resume needs beyond SB3's zip: the random generators, the training envs mid-episode, and the
algorithm's last observations.

SB3 saves the weights, the optimizer and the counters, but ``load`` reseeds every generator and a new env starts
fresh episodes, so a resumed run would differ from an uninterrupted one from the checkpoint on. Saved with each
checkpoint, this state makes the resumed run take the same actions, minibatches and episodes, hence the same
curve. Envs that rebuild themselves from their constructor arguments when unpickled (``EzPickle``: MuJoCo, Box2D)
get their attributes put back (a MuJoCo env's ``MjData``: positions, velocities, time, warm start; its generator).
An env that cannot be pickled (a simulator holding C handles) is left out, with a warning: the resumed run then
starts new episodes, still with every update of the uninterrupted run.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import torch
from gymnasium.utils import EzPickle
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper

from eva_rl.files import atomic_write

# A wrapper's link to the env it wraps, and VecEnvWrapper's table of its class's members (which holds unpicklable
# ABC internals): both are rebuilt by the fresh env of the same kind that a resumed run makes.
_REBUILT = ("venv", "class_attributes")
_MODEL_STATE = ("_last_obs", "_last_episode_starts", "_last_original_obs", "ep_info_buffer", "ep_success_buffer")


def _env_chain(venv: VecEnv) -> list[VecEnv]:
    """The VecEnv and every VecEnv it wraps, outermost first."""
    chain = [venv]
    while isinstance(chain[-1], VecEnvWrapper):
        chain.append(chain[-1].venv)
    return chain


def generator_state() -> dict[str, Any]:
    """The torch generators' state (CPU, and every CUDA device's)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _rebuilt_envs_state(venv: VecEnv) -> tuple[list[dict[str, Any]], list[str]]:
    """What pickling loses of the envs that rebuild themselves from their constructor arguments when unpickled
    (Gymnasium's ``EzPickle``: MuJoCo, Box2D...): each one's attributes (a MuJoCo env's ``MjData`` with its
    positions, velocities, time and warm start, its random generator), to put back into the fresh env a resumed run
    unpickles. ``[]`` for envs that pickle whole.

    :return: The attributes of each of ``venv``'s envs, and the names of attributes that cannot be pickled.
    """
    saved, lost = [], []
    for env in getattr(venv, "envs", []):
        inner = env.unwrapped
        if not isinstance(inner, EzPickle):
            return [], []
        kept = {}
        for name, value in vars(inner).items():
            try:
                cloudpickle.dumps(value)
            except Exception:  # a handle of a simulator or renderer: named in the warning
                lost.append(f"{type(inner).__name__}.{name}")
                continue
            kept[name] = value
        saved.append(kept)
    return saved, lost


def save_runtime_state(model: BaseAlgorithm, path: Path, torch_state: dict[str, Any] | None = None) -> str | None:
    """Write the generators', envs' and last observations' state of ``model`` to ``path`` (a pickle, atomically).

    :param torch_state: The torch generators' state (:func:`generator_state`) to save instead of their present one
        (gSDE's, from before the rollout's exploration matrix was drawn).
    :return: Why the envs were left out, or ``None`` when everything was saved.
    """
    state: dict[str, Any] = {
        "rng": {
            **(torch_state or generator_state()),
            "numpy": np.random.get_state(),
            "random": random.getstate(),
        },
        "action_space": model.action_space,
    }
    chain = _env_chain(model.get_env())
    rebuilt, lost = _rebuilt_envs_state(chain[-1])
    envs = {
        "types": [type(layer).__name__ for layer in chain],
        "layers": [{k: v for k, v in vars(layer).items() if k not in _REBUILT} for layer in chain],
        "model": {name: getattr(model, name) for name in _MODEL_STATE if hasattr(model, name)},
        "rebuilt": rebuilt,
    }
    left_out = None
    try:
        state["envs"] = cloudpickle.dumps(envs)
    except (TypeError, AttributeError, ValueError, pickle.PicklingError) as error:
        left_out = f"{type(error).__name__}: {error}"
    if left_out is None and lost:  # half an env would be worse than a fresh one
        left_out = f"{lost[0]} cannot be pickled"
        del state["envs"]
    atomic_write(path, lambda tmp: tmp.write_bytes(cloudpickle.dumps(state)), suffix=".pkl")
    return left_out


def restore_runtime_state(model: BaseAlgorithm, path: Path) -> bool:
    """Put ``model`` (loaded from the checkpoint, with a fresh env of the same kind) back in the saved state.

    :return: Whether the envs were restored (otherwise the next ``learn`` starts new episodes).
    """
    with open(path, "rb") as handle:
        state = pickle.load(handle)  # noqa: S301 (written by save_runtime_state beside the run's own checkpoint)
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["random"])
    model.action_space = state["action_space"]
    if "envs" not in state:
        return False
    envs = pickle.loads(state["envs"])  # noqa: S301
    chain = _env_chain(model.get_env())
    if [type(layer).__name__ for layer in chain] != envs["types"]:
        return False
    for layer, saved in zip(chain, envs["layers"]):
        vars(layer).update(saved)
    for env, saved in zip(getattr(chain[-1], "envs", []), envs.get("rebuilt", [])):
        vars(env.unwrapped).update(saved)
    for name, value in envs["model"].items():
        setattr(model, name, value)
    return True
