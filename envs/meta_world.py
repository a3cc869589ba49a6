"""Meta-World v3 tasks as Continual World runs them (``pip install -e ".[metaworld]"``).

Continual World (Wołczyk et al. 2021) cuts episodes at 200 steps, shows the goal, draws the object and goal positions
afresh at every reset, and counts an episode a success if ``info["success"]`` is set at any step. Meta-World's own
``Meta-World/MT1`` instead cycles through 50 positions fixed at construction, ignores ``reset(seed=...)`` and gives
each task its own observation bounds (the goal's), which SB3 would refuse between a source and a target task.
:class:`MetaWorldTask` is the Continual World version: seeded by ``reset(seed=...)``, one observation space for all
50 tasks. ``import envs`` registers ``MetaWorld-<task>-v3`` for each task of :data:`MT50`.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from typing import Any

import gymnasium as gym
import numpy as np

CW10 = (
    "hammer",
    "push-wall",
    "faucet-close",
    "push-back",
    "stick-pull",
    "handle-press-side",
    "push",
    "shelf-place",
    "window-close",
    "peg-unplug-side",
)
"""Continual World's CW10 sequence, in its order (``continualworld/tasks.py``)."""

MT50 = (
    "assembly",
    "basketball",
    "bin-picking",
    "box-close",
    "button-press-topdown",
    "button-press-topdown-wall",
    "button-press",
    "button-press-wall",
    "coffee-button",
    "coffee-pull",
    "coffee-push",
    "dial-turn",
    "disassemble",
    "door-close",
    "door-lock",
    "door-open",
    "door-unlock",
    "hand-insert",
    "drawer-close",
    "drawer-open",
    "faucet-open",
    "faucet-close",
    "hammer",
    "handle-press-side",
    "handle-press",
    "handle-pull-side",
    "handle-pull",
    "lever-pull",
    "pick-place-wall",
    "pick-out-of-hole",
    "pick-place",
    "plate-slide",
    "plate-slide-side",
    "plate-slide-back",
    "plate-slide-back-side",
    "peg-insert-side",
    "peg-unplug-side",
    "soccer",
    "stick-push",
    "stick-pull",
    "push",
    "push-wall",
    "push-back",
    "reach",
    "reach-wall",
    "shelf-place",
    "sweep-into",
    "sweep",
    "window-open",
    "window-close",
)
"""Meta-World's 50 tasks (``metaworld.env_dict.MT50_V3``, without the ``-v3``)."""

MT10 = ("reach", "push", "pick-place", "door-open", "drawer-open", "drawer-close", "button-press-topdown",
        "peg-insert-side", "window-open", "window-close")  # fmt: skip
"""Meta-World's MT10: it shares push and window-close with CW10, so a base for CW10 is never trained on it."""

PRETRAINING_TASKS = tuple(task for task in MT50 if task not in CW10)
"""The 40 tasks outside CW10 (the EVA paper's MT40 pretraining set): the source of a base fine-tuned on CW10."""

EPISODE_STEPS = 200
"""Continual World's horizon (``META_WORLD_TIME_HORIZON``); every CW10 task's scripted expert succeeds within it."""

OBSERVATION_SIZE = 39
"""End effector (3), gripper (1), two objects (7 each), the same 18 values one step earlier, the goal (3)."""


OBJECT_FRAMES: dict[str, tuple[str, str, int]] = {
    "coffee-pull": ("geom", "mug", 0),
    "coffee-push": ("geom", "mug", 0),
    "door-close": ("geom", "handle", 0),
    "door-open": ("geom", "handle", 0),
    "lever-pull": ("geom", "objGeom", 0),
    "peg-insert-side": ("site", "pegGrasp", 0),
    "pick-place": ("geom", "objGeom", 0),
    "pick-place-wall": ("geom", "objGeom", 0),
    "plate-slide": ("geom", "puck", 0),
    "plate-slide-side": ("geom", "puck", 0),
    "plate-slide-back": ("geom", "puck", 0),
    "plate-slide-back-side": ("geom", "puck", 0),
    "push": ("geom", "objGeom", 0),
    "push-back": ("geom", "objGeom", 0),
    "push-wall": ("geom", "objGeom", 0),
    "reach": ("geom", "objGeom", 0),
    "reach-wall": ("geom", "objGeom", 0),
    "shelf-place": ("geom", "objGeom", 0),
    "soccer": ("body", "soccer_ball", 0),
    "stick-pull": ("body", "stick", 4),
    "stick-push": ("body", "stick", 4),
    "sweep-into": ("geom", "objGeom", 0),
}
"""The tasks whose ``_get_quat_objects`` is SciPy's quaternion of one frame's rotation matrix: ``{task: (kind,
name, zeros after it)}``, the frame being ``data.<kind>(name)`` (the stick tasks append four zeros)."""


def env_id(task: str) -> str:
    """The registered id of a Meta-World task: ``MetaWorld-<task>-v3``."""
    return f"MetaWorld-{task}-v3"


def _v3_environments() -> dict[str, Any]:
    try:
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS
    except ImportError as error:
        raise gym.error.DependencyNotInstalled(
            'Meta-World is not installed: pip install -e ".[metaworld]" (it pins mujoco==3.3.0)'
        ) from error
    return ALL_V3_ENVIRONMENTS


class MetaWorldTask(gym.Wrapper):
    """One Meta-World v3 task, goal observed, object and goal positions drawn from the env's own generator at every
    reset (seeded by ``reset(seed=...)``), observations as float32 in one unbounded 39-dim space for every task.

    :param task: A task of :data:`MT50` (``"hammer"``).
    :param render_mode: Meta-World's (``"rgb_array"`` for videos).
    :raises ValueError: for an unknown task, listing the known ones.
    """

    def __init__(self, task: str, render_mode: str | None = None) -> None:
        if task not in MT50:
            raise ValueError(f"task={task!r} is not a Meta-World task; expected one of {list(MT50)}")
        task_class = _v3_environments()[f"{task}-v3"]
        env = task_class.__new__(task_class)
        env._initialize_simulation = ParsedModel(env)  # called from the constructor: one XML parse per process
        task_class.__init__(env, render_mode=render_mode)
        del env._initialize_simulation
        env._partially_observable = False  # the goal in obs[36:39], as Meta-World's MT benchmarks and CW show it
        del env.sawyer_observation_space  # cached with the goal hidden; recomputed on next use, as set_task does
        env._freeze_rand_vec = False  # a fresh object and goal position at every reset ...
        env.seeded_rand_vec = True  # ... from env.np_random, which reset(seed=...) seeds
        env._set_task_called = True
        env._set_task_inner()
        if type(env).touching_object is _sawyer_touching_object():
            env.touching_object = TouchingObject(env)
        if task in OBJECT_FRAMES:
            env._get_quat_objects = ObjectQuaternion(env, *OBJECT_FRAMES[task])
        super().__init__(env)
        self.task = task
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (OBSERVATION_SIZE,), np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        if seed is not None:
            self.env.unwrapped.seed(seed)  # Meta-World ignores reset(seed=...)
        observation, info = self.env.reset(options=options)
        return observation.astype(np.float32), info

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        observation, reward, terminated, truncated, info = self.env.step(action)
        return observation.astype(np.float32), float(reward), terminated, truncated, info


PARSED_MODELS_KEPT = 4
"""How many tasks' parsed models a process keeps (the most recently used): each holds about 21 MB, and pretraining
builds the envs of 40 tasks in one process, while a run builds all of its 18 envs of one task."""

_PARSED_MODELS: OrderedDict[tuple[str, int, int], Any] = OrderedDict()
"""The most recent tasks' ``MjModel`` as parsed from their XML (and sized for rendering), by path, width, height."""


class ParsedModel:
    """A Meta-World env's ``_initialize_simulation`` (gymnasium's ``MujocoEnv``) that parses the task's XML once per
    process and gives every later env of the task a copy of that model: parsing takes 0.27 s, a copy 0.015 s, and a
    CW10 run builds 18 envs (8 to train on, 10 to evaluate). The copy is the model as parsed, before any env changed
    it, so each env starts from what its own parse would give (``tests/test_meta_world.py`` runs the same episodes
    on both). An object, not a bound function, so the env still pickles.

    :param env: The Meta-World env under construction.
    """

    def __init__(self, env: Any) -> None:
        self.env = env

    def __call__(self) -> tuple[Any, Any]:
        import mujoco

        env = self.env
        key = (env.fullpath, env.width, env.height)
        if key not in _PARSED_MODELS:
            model, data = type(env)._initialize_simulation(env)
            _PARSED_MODELS[key] = copy.deepcopy(model)
            while len(_PARSED_MODELS) > PARSED_MODELS_KEPT:
                _PARSED_MODELS.popitem(last=False)
            return model, data
        _PARSED_MODELS.move_to_end(key)
        model = copy.deepcopy(_PARSED_MODELS[key])
        return model, mujoco.MjData(model)


def _sawyer_touching_object() -> Any:
    from metaworld.sawyer_xyz_env import SawyerXYZEnv

    return SawyerXYZEnv.touching_object


class TouchingObject:
    """Meta-World's ``SawyerXYZEnv.touching_object``, the same answer without a Python loop over MuJoCo's contacts.

    Whether both gripper pads push on an object (a positive summed contact force for each) is part of most tasks'
    reward; Meta-World walks ``data.contact`` twice in Python at every step, a quarter of a push step in our
    profiles. This selects the pad-object contacts with array masks and sums their forces in contact order, as
    Meta-World does (``tests/test_meta_world.py`` compares the two on scripted episodes). An object, not a bound
    function, so the env still pickles.

    :param env: The unwrapped Meta-World env.
    """

    def __init__(self, env: Any) -> None:
        self.env = env

    def __call__(self, object_geom_id: int) -> bool:
        data = self.env.data
        contact = data.contact
        geom1, geom2 = contact.geom1, contact.geom2
        with_object = (geom1 == object_geom_id) | (geom2 == object_geom_id)
        forces = []
        for pad in ("leftpad_geom", "rightpad_geom"):
            pad_id = data.geom(pad).id
            pairs = with_object & ((geom1 == pad_id) | (geom2 == pad_id))
            forces.append(sum(data.efc_force[contact.efc_address[pairs]].tolist()))
        return forces[0] > 0 and forces[1] > 0


ORTHONORMAL_TOLERANCE = 1e-13
"""How far from orthonormal (largest entry of ``|M M^T - I|``) a matrix may be for :func:`matrix_quaternion`'s own
arithmetic: SciPy re-orthogonalizes a matrix beyond about 1e-12 first, so beyond this one SciPy answers."""


def matrix_quaternion(matrix: np.ndarray) -> np.ndarray:
    """The unit quaternion ``(x, y, z, w)`` of a rotation matrix, bit for bit what SciPy's
    ``Rotation.from_matrix(matrix).as_quat()`` returns, in about 4 us instead of 100 (Shepperd's method, SciPy's
    branch choice and order of operations); SciPy itself answers for a matrix that is not a rotation to within
    :data:`ORTHONORMAL_TOLERANCE`."""
    rows = matrix.tolist()
    (m00, m01, m02), (m10, m11, m12), (m20, m21, m22) = rows
    # in Python floats: numpy's matmul and det on a 3 x 3 cost more than the whole conversion
    gram = [sum(a * b for a, b in zip(rows[i], rows[j])) - (i == j) for i in range(3) for j in range(i, 3)]
    determinant = m00 * (m11 * m22 - m12 * m21) - m01 * (m10 * m22 - m12 * m20) + m02 * (m10 * m21 - m11 * m20)
    if max(map(abs, gram)) > ORTHONORMAL_TOLERANCE or determinant <= 0:
        from scipy.spatial.transform import Rotation

        return Rotation.from_matrix(matrix).as_quat()
    trace = m00 + m11 + m22
    decision = (m00, m11, m22, trace)
    choice = max(range(4), key=decision.__getitem__)  # the first largest, as numpy's argmax
    if choice == 0:
        q = (1 - trace + 2 * m00, m10 + m01, m20 + m02, m21 - m12)
    elif choice == 1:
        q = (m10 + m01, 1 - trace + 2 * m11, m21 + m12, m02 - m20)
    elif choice == 2:
        q = (m20 + m02, m21 + m12, 1 - trace + 2 * m22, m10 - m01)
    else:
        q = (m21 - m12, m02 - m20, m10 - m01, 1 + trace)
    norm = math.sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2] + q[3] * q[3])
    return np.array([q[0] / norm, q[1] / norm, q[2] / norm, q[3] / norm])


class ObjectQuaternion:
    """Meta-World's ``_get_quat_objects`` for a task of :data:`OBJECT_FRAMES`, the same array without SciPy's
    ``Rotation`` (100 us a call, as long as the physics step of a push step in our profiles) on every observation.
    ``tests/test_meta_world.py`` compares the two on scripted episodes of every such task. An object, not a bound
    function, so the env still pickles.

    :param env: The unwrapped Meta-World env.
    :param kind: ``"geom"``, ``"site"`` or ``"body"``: which of ``env.data``'s accessors names the frame.
    :param name: The frame's name.
    :param zeros: Zeros appended (the stick tasks' second, absent object).
    """

    def __init__(self, env: Any, kind: str, name: str, zeros: int = 0) -> None:
        self.env, self.kind, self.name, self.zeros = env, kind, name, zeros

    def __call__(self) -> np.ndarray:
        frame = getattr(self.env.data, self.kind)(self.name)
        quaternion = matrix_quaternion(frame.xmat.reshape(3, 3))
        return np.hstack((quaternion, np.zeros(self.zeros))) if self.zeros else quaternion


def scripted_expert(registered_id: str) -> Any:
    """Meta-World's scripted policy for the task of ``MetaWorld-<task>-v3`` (``get_action(observation)``): the expert
    of the behaviour cloning that pretrains a Meta-World base (``pretrain_cloning.expert``).

    :raises ValueError: for an id that is not a Meta-World task's.
    """
    task = registered_id.removeprefix("MetaWorld-").removesuffix("-v3")
    if registered_id != env_id(task) or task not in MT50:
        raise ValueError(f"{registered_id!r} is not a Meta-World task id; expected MetaWorld-<task>-v3 of {list(MT50)}")
    _v3_environments()  # the clear error when Meta-World is not installed
    from metaworld.policies import ENV_POLICY_MAP

    return ENV_POLICY_MAP[f"{task}-v3"]()
