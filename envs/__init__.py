"""Example custom environments. Importing this package registers their ids (``--gym-package envs``)."""

from gymnasium.envs.registration import register

from envs.point_goal import PointGoalEnv

register(id="PointGoal-v0", entry_point="envs.point_goal:PointGoalEnv", kwargs={"goal": (0.7, 0.7)})
register(id="PointGoal-Shifted-v0", entry_point="envs.point_goal:PointGoalEnv", kwargs={"goal": (0.3, 0.7)})

__all__ = ["PointGoalEnv"]
