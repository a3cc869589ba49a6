"""Example environments and task variants; importing this package registers their ids (``--gym-package envs``)."""

from gymnasium.envs.registration import register

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

__all__ = ["PointGoalEnv"]
