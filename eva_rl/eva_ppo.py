"""EVA from the algorithm's own rollouts: the adapters are initialized from the first rollouts PPO (or A2C) collects
anyway, so EVA takes no environment steps of its own (``EvaConfig(data_source="ppo")``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from gymnasium import spaces
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm

from eva_rl.eva import EvaResult, EvaSession
from eva_rl.eva_logging import record_eva_report


def _time_major(observations: np.ndarray, rows: int, space: spaces.Space) -> np.ndarray:
    # The buffer holds (n_steps, n_envs, *shape); row order t0 env0, t0 env1, ... as EVA's own rollouts stream it.
    # A Discrete observation is stored with a trailing axis of 1 that the policy does not expect.
    shape = () if isinstance(space, spaces.Discrete) else observations.shape[2:]
    return observations.reshape(rows, *shape)


class EvaRolloutsMixin:
    """An on-policy algorithm that finishes its EVA initialization on its first rollouts.

    Until EVA has converged, the policy's adapters have ``B = 0``, so it acts exactly as the pretrained policy.
    After each rollout, the buffer's observations feed EVA; PPO skips its update on every rollout before the one
    where EVA converges. Then EVA's adapters replace the placeholder ones and PPO trains on that same rollout,
    which stays on-policy: the actions, log-probabilities and values in the buffer came from a policy whose outputs
    EVA's swap does not change. When EVA converges within the first rollout, it costs no environment steps.

    Once EVA is done, this is the plain algorithm: the saved zip loads with ``PPO.load`` (``A2C.load``).

    A model saved while EVA is pending keeps its policy's ``eva_pending`` (the session and its data are not saved):
    loaded, with this class or the plain one, it predicts as the pretrained policy but refuses to train, since it
    would train the placeholder adapters as plain LoRA.

    :ivar eva_skipped_steps: Env steps of rollouts that fed EVA without a PPO update (EVA's whole env-step cost).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.eva_session: EvaSession | None = None
        self.eva_apply: Callable[[EvaResult], None] | None = None
        self.eva_skipped_steps = 0

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "eva_session", "eva_apply"]

    def start_eva(self, session: EvaSession, apply: Callable[[EvaResult], None]) -> None:
        """Feed ``session`` from the coming rollouts and call ``apply`` with its result before the first update."""
        self.eva_session, self.eva_apply = session, apply

    @property
    def eva_pending(self) -> bool:
        """EVA has not finished yet (the adapters are placeholders)."""
        return self.eva_session is not None

    def _feed_eva(self) -> bool:
        """Feed this rollout to EVA; apply EVA's result when it is done. Return whether PPO may update."""
        session = self.eva_session
        buffer = self.rollout_buffer
        rows = buffer.buffer_size * buffer.n_envs
        batch_size = session.eva.batch_size
        if isinstance(buffer.observations, dict):
            space = self.observation_space
            observations: Any = {k: _time_major(v, rows, space[k]) for k, v in buffer.observations.items()}
        else:
            observations = _time_major(buffer.observations, rows, self.observation_space)
        for start in range(0, rows - batch_size + 1, batch_size):
            if session.done or session.capped:
                break
            end = start + batch_size
            if isinstance(observations, dict):
                session.feed({key: value[start:end] for key, value in observations.items()})
            else:
                session.feed(observations[start:end])
        if not (session.done or session.capped):
            self.eva_skipped_steps += rows
            return False
        stop_reason = None if session.done else f"max_batches={session.eva.max_batches} reached"
        result = session.result(stop_reason)
        result.env_steps, result.data_source, result.skipped_steps = 0, "ppo", self.eva_skipped_steps
        self.eva_apply(result)
        self.eva_session, self.eva_apply = None, None
        record_eva_report(self.logger, self.policy.eva_report)
        return True

    def learn(self, *args: Any, **kwargs: Any) -> Any:
        """The algorithm's ``learn``, refused before any rollout for a model saved before EVA finished."""
        if self.eva_session is None:
            self.policy.check_trainable()
        return super().learn(*args, **kwargs)  # type: ignore[misc]

    def train(self) -> None:
        if self.eva_session is not None and not self._feed_eva():
            return
        super().train()  # type: ignore[misc]


class EvaPPO(EvaRolloutsMixin, PPO):
    """PPO with EVA on its first rollouts (:class:`EvaRolloutsMixin`)."""


class EvaA2C(EvaRolloutsMixin, A2C):
    """A2C with EVA on its first rollouts (:class:`EvaRolloutsMixin`)."""


EVA_ROLLOUT_ALGORITHMS: dict[type[OnPolicyAlgorithm], type[OnPolicyAlgorithm]] = {PPO: EvaPPO, A2C: EvaA2C}
"""The EVA-on-rollouts variant of each on-policy algorithm."""
