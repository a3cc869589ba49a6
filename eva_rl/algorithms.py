"""The algorithms eva-rl loads and fine-tunes, by rl-zoo3's name.

Names only, in a module that imports neither torch nor stable-baselines3: the command line's choices (``--algo``)
and the task files' checks need no more, and ``eva-rl --help`` stays fast. :data:`eva_rl.loading.ALGORITHMS` maps
them to SB3's classes.
"""

from __future__ import annotations

ALGORITHM_NAMES: tuple[str, ...] = ("ppo", "a2c", "sac", "td3", "dqn")
"""Every algorithm eva-rl fine-tunes."""
