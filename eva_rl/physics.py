"""Physics variants of MuJoCo envs: heavier bodies, weaker or disabled motors, other friction and gravity.

Gymnasium's MuJoCo envs take no physics arguments (``gym.make("HalfCheetah-v5", gravity=...)`` is a ``TypeError``),
and an edited XML is a trap (``half_cheetah.xml`` rescales every mass to its ``settotalmass``). :class:`MujocoPhysics`
edits the compiled model of each env copy instead; the edits survive ``reset()`` (which resets the simulation data,
not the model) and a fresh ``gym.make`` starts from the original model again. :func:`make_variant` is the entry
point a registered variant id uses (``envs/__init__.py``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import gymnasium as gym

from eva_rl.errors import ConfigError


class MujocoWarning(UserWarning):
    """A warning MuJoCo printed (through :func:`mujoco_warnings`)."""


MUJOCO_ENTRY_POINTS = (__name__, "envs.meta_world")
"""Modules whose registered envs run on MuJoCo besides Gymnasium's ``gymnasium.envs.mujoco``: this one's variants
(:func:`make_variant`) and the example package's Meta-World tasks."""


def is_mujoco_env(env_id: str) -> bool:
    """Whether the registered ``env_id`` is a MuJoCo env (Gymnasium's, a variant made by :func:`make_variant`, or a
    Meta-World task of ``envs``)."""
    spec = gym.registry.get(env_id)
    entry_point = getattr(spec, "entry_point", None)
    return isinstance(entry_point, str) and ("mujoco" in entry_point or entry_point.startswith(MUJOCO_ENTRY_POINTS))


def simulator_packages(env_id: str) -> tuple[str, ...]:
    """The distributions whose versions move the registered ``env_id``'s physics: ``("mujoco",)`` for a MuJoCo env,
    with ``"metaworld"`` for a Meta-World task (its models and reward code), ``()`` for any other env."""
    if not is_mujoco_env(env_id):
        return ()
    entry_point = gym.registry[env_id].entry_point
    return ("mujoco", "metaworld") if str(entry_point).startswith("envs.meta_world") else ("mujoco",)


@contextmanager
def mujoco_warnings() -> Iterator[None]:
    """MuJoCo's warnings as Python warnings while the block runs, so each shows once per process.

    MuJoCo prints its own warnings at every model compile: ``half_cheetah.xml``'s deprecated ``settotalmass``
    would print one line per env copy, into the progress bars.
    """
    import mujoco

    previous = mujoco.get_mju_user_warning()
    mujoco.set_mju_user_warning(lambda message: warnings.warn(message, MujocoWarning, stacklevel=1))
    try:
        yield
    finally:
        mujoco.set_mju_user_warning(previous)


def _factor(value: Any, what: str, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{what}={value!r} is invalid: expected a finite number (a scale factor)")
    if value < 0 or (value == 0 and not allow_zero):
        lowest = "0 or more (0 turns it off)" if allow_zero else "above 0"
        raise ConfigError(f"{what}={value!r} is invalid: expected a factor {lowest}")
    return float(value)


def _factors(value: Any, what: str, allow_zero: bool) -> dict[str, float]:
    if not isinstance(value, Mapping) or not all(isinstance(key, str) and key for key in value):
        raise ConfigError(f"{what}={value!r} is invalid: expected a mapping of names (or '*' for all) to factors")
    return {key: _factor(factor, f"{what}[{key!r}]", allow_zero) for key, factor in value.items()}


class MujocoPhysics(gym.Wrapper):
    """A MuJoCo env with its physics scaled: every argument is a factor on the env's own value.

    :param env: A Gymnasium MuJoCo env (``env.unwrapped.model`` is a ``mujoco.MjModel``).
    :param body_mass: ``{body name: factor}`` on the body's mass and rotational inertia (``"*"``: every body).
    :param actuator_gear: ``{actuator name: factor}`` on the actuator's gear, the torque per unit of action
        (0 turns the motor off; ``"*"``: every actuator). Hopper, Walker2d and Ant name their joints, not their
        actuators: a joint name selects the actuator that drives it.
    :param friction: Factor on the sliding friction of every geom. MuJoCo takes the larger friction of a contact
        pair, so scaling one geom (the floor) alone may change nothing.
    :param gravity: Factor on gravity.
    :raises ConfigError: for a factor that is not a finite number (or is negative; zero for a mass), or a name the
        model does not have (the error lists the names it has).
    """

    def __init__(
        self,
        env: gym.Env,
        body_mass: Mapping[str, float] | None = None,
        actuator_gear: Mapping[str, float] | None = None,
        friction: float | None = None,
        gravity: float | None = None,
    ) -> None:
        super().__init__(env)
        self.body_mass = _factors(body_mass or {}, "body_mass", allow_zero=False)
        self.actuator_gear = _factors(actuator_gear or {}, "actuator_gear", allow_zero=True)
        self.friction = None if friction is None else _factor(friction, "friction", allow_zero=False)
        self.gravity = None if gravity is None else _factor(gravity, "gravity", allow_zero=True)
        model = getattr(env.unwrapped, "model", None)
        if model is None or not hasattr(model, "body_mass"):
            raise ConfigError(
                f"MujocoPhysics needs a MuJoCo env (one with env.unwrapped.model), got {type(env.unwrapped).__name__}"
            )
        import mujoco

        for body in self._bodies(model):
            factor = self.body_mass.get(model.body(body).name, self.body_mass.get("*", 1.0))
            model.body_mass[body] *= factor
            model.body_inertia[body] *= factor  # the same shape with a denser material
        for actuator, factor in self._actuators(model).items():
            model.actuator_gear[actuator, 0] *= factor
        if self.friction is not None:
            model.geom_friction[:, 0] *= self.friction
        if self.gravity is not None:
            model.opt.gravity[:] *= self.gravity
        # Derived constants (subtree masses, ...) follow the edited masses only after mj_setConst.
        mujoco.mj_setConst(model, env.unwrapped.data)

    def _bodies(self, model: Any) -> list[int]:
        names = [model.body(b).name for b in range(model.nbody)]
        unknown = sorted(set(self.body_mass) - set(names) - {"*"})
        if unknown:
            raise ConfigError(f"body_mass names {unknown} are not bodies of this model; it has {names[1:]}")
        return list(range(1, model.nbody)) if "*" in self.body_mass else [names.index(n) for n in self.body_mass]

    def _actuators(self, model: Any) -> dict[int, float]:
        import mujoco

        by_name: dict[str, int] = {}
        for actuator in range(model.nu):
            if model.actuator(actuator).name:
                by_name[model.actuator(actuator).name] = actuator
            if model.actuator_trntype[actuator] == mujoco.mjtTrn.mjTRN_JOINT:
                by_name.setdefault(model.joint(model.actuator_trnid[actuator, 0]).name, actuator)
        unknown = sorted(set(self.actuator_gear) - set(by_name) - {"*"})
        if unknown:
            raise ConfigError(
                f"actuator_gear names {unknown} are not actuators (or actuated joints) of this model; "
                f"it has {sorted(by_name)}"
            )
        factors = dict.fromkeys(range(model.nu), self.actuator_gear["*"]) if "*" in self.actuator_gear else {}
        factors.update({by_name[name]: factor for name, factor in self.actuator_gear.items() if name != "*"})
        return factors


def make_variant(base_id: str, physics: Mapping[str, Any], **env_kwargs: Any) -> gym.Env:
    """``gym.make(base_id, **env_kwargs)`` wrapped in :class:`MujocoPhysics` with ``physics``: the entry point of a
    registered variant id.

    :param base_id: The MuJoCo env to change (``"HalfCheetah-v5"``).
    :param physics: :class:`MujocoPhysics`'s arguments.
    :param env_kwargs: The base env's own keyword arguments (``render_mode``, ``ctrl_cost_weight`` ...).
    """
    with mujoco_warnings():
        return MujocoPhysics(gym.make(base_id, **env_kwargs), **physics)
