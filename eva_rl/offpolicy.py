"""Fine-tuning a pretrained off-policy agent (SAC, TD3, DQN): its warm-up acts with the pretrained policy.

SB3 fills the replay buffer with uniformly random actions for the first ``learning_starts`` steps, the right start
for an agent that knows nothing. A pretrained agent does know something, and random warm-up data would be what its
first updates learn from. These subclasses keep ``learning_starts`` (updates start after it, on a buffer of that
many transitions) but let the pretrained policy act during it, with the algorithm's own exploration (SAC's sampled
actions, TD3's action noise, DQN's epsilon-greedy). Training from scratch keeps SB3's random warm-up.

The saved zips load with the plain ``SAC.load`` / ``TD3.load`` / ``DQN.load``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from stable_baselines3 import DQN, SAC, TD3
from stable_baselines3.common.base_class import BaseAlgorithm


class PretrainedWarmupMixin:
    """An off-policy algorithm whose warm-up actions come from its (pretrained) policy, not a uniform draw."""

    def _sample_action(
        self, learning_starts: int, action_noise: Any = None, n_envs: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        return super()._sample_action(0, action_noise, n_envs)  # type: ignore[misc]


class PretrainedSAC(PretrainedWarmupMixin, SAC):
    """SAC fine-tuning a pretrained agent (:class:`PretrainedWarmupMixin`)."""


class PretrainedTD3(PretrainedWarmupMixin, TD3):
    """TD3 fine-tuning a pretrained agent (:class:`PretrainedWarmupMixin`)."""


class PretrainedDQN(PretrainedWarmupMixin, DQN):
    """DQN fine-tuning a pretrained agent (:class:`PretrainedWarmupMixin`)."""


PRETRAINED_WARMUP: dict[type[BaseAlgorithm], type[BaseAlgorithm]] = {
    SAC: PretrainedSAC,
    TD3: PretrainedTD3,
    DQN: PretrainedDQN,
}
"""The pretrained-warm-up variant of each off-policy algorithm."""
