"""Example environments and task variants; importing this package registers their ids (``--gym-package envs``)."""

from gymnasium.envs.registration import register

from envs.meta_world import EPISODE_STEPS, MT50
from envs.meta_world import env_id as meta_world_id
from envs.point_goal import PointGoalEnv

register(id="PointGoal-v0", entry_point="envs.point_goal:PointGoalEnv", kwargs={"goal": (0.7, 0.7)})
register(id="PointGoal-Shifted-v0", entry_point="envs.point_goal:PointGoalEnv", kwargs={"goal": (0.3, 0.7)})
# Gymnasium's Pendulum with gravity 14 instead of 10: the off-policy transfer task (configs/Pendulum-Gravity.yaml).
register(
    id="Pendulum-HighGravity-v0",
    entry_point="gymnasium.envs.classic_control.pendulum:PendulumEnv",
    kwargs={"g": 14.0},
    max_episode_steps=200,
)

# HalfCheetah-v5 with a changed body: the MuJoCo transfer tasks (configs/HalfCheetah-*.yaml). Chosen by measuring the
# bundled HalfCheetah agent's zero-shot return on variants (agents/HalfCheetah-v5/card.json, docs/results/mujoco/).
register(
    id="HalfCheetah-FrontThighOff-v0",
    entry_point="eva_rl.physics:make_variant",
    kwargs={"base_id": "HalfCheetah-v5", "physics": {"actuator_gear": {"fthigh": 0.0}}},
)
register(
    id="HalfCheetah-HeavyTorso-v0",
    entry_point="eva_rl.physics:make_variant",
    kwargs={"base_id": "HalfCheetah-v5", "physics": {"body_mass": {"torso": 3.0}}},
)

# Meta-World's 50 tasks as Continual World runs them (envs/meta_world.py; Meta-World is imported on first make, so
# registering needs only Gymnasium).
for _task in MT50:
    register(
        id=meta_world_id(_task),
        entry_point="envs.meta_world:MetaWorldTask",
        kwargs={"task": _task},
        max_episode_steps=EPISODE_STEPS,
    )

__all__ = ["PointGoalEnv"]
