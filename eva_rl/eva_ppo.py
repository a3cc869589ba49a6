"""EVA from the algorithm's own rollouts: the adapters are initialized from the first rollouts PPO (or A2C) collects
anyway, and PPO then trains on every one of them, so EVA costs no environment steps (``EvaConfig(data_source="ppo")``,
or ``"auto"`` for an on-policy algorithm)."""

from __future__ import annotations

import copy
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
    """An on-policy algorithm that finishes its EVA initialization on its first rollouts, and trains on all of them.

    Until EVA has converged, the policy's adapters have ``B = 0``, so it acts exactly as the pretrained policy.
    After each rollout, the buffer's observations feed EVA; while EVA has not converged, the rollout is kept and its
    update waits. On the rollout where EVA converges, EVA's adapters replace the placeholder ones (which leaves the
    policy's outputs unchanged), and the algorithm makes the update of every kept rollout, oldest first, then that
    of the converging one. All of those rollouts were collected by the pretrained policy, which is the adapted policy
    at its first update, so none is lost: EVA costs no environment steps and no update (the kept rollouts' updates
    after the first read data one or more updates old, which PPO's ratio to the log-probabilities they were collected
    with accounts for, as it does for its own epochs).

    If the budget's last rollout comes before EVA converges, EVA stops there and its current estimate (the batches
    it read, ``converged`` false for the layers still moving, and a warning, whatever ``on_max_batches`` says)
    initializes the adapters, which then train on every kept rollout as above.

    Once EVA is done, this is the plain algorithm: the saved zip loads with ``PPO.load`` (``A2C.load``).

    A model saved while EVA is pending keeps its policy's ``eva_pending`` (the session, its data and the kept
    rollouts are not saved): loaded, with this class or the plain one, it predicts as the pretrained policy but
    refuses to train, since it would train the placeholder adapters as plain LoRA.

    :ivar eva_deferred_steps: Env steps of the rollouts EVA read before the one it converged on, whose updates waited.
    """

    KEPT = ("observations", "actions", "rewards", "advantages", "returns", "episode_starts", "log_probs", "values")
    """The rollout buffer's arrays a kept rollout holds (what an update reads)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.eva_session: EvaSession | None = None
        self.eva_apply: Callable[[EvaResult], None] | None = None
        self.eva_deferred_steps = 0
        self.eva_rollouts: list[dict[str, Any]] = []

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "eva_session", "eva_apply", "eva_rollouts"]

    def start_eva(self, session: EvaSession, apply: Callable[[EvaResult], None]) -> None:
        """Feed ``session`` from the coming rollouts and call ``apply`` with its result before the first update."""
        self.eva_session, self.eva_apply = session, apply

    @property
    def eva_pending(self) -> bool:
        """EVA has not finished yet (the adapters are placeholders)."""
        return self.eva_session is not None

    def _feed_eva(self, last: bool = False) -> bool:
        """Feed this rollout to EVA; apply EVA's result when it is done, or with what it has on the ``last`` rollout
        of the budget. Return whether EVA is done."""
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
        if not (session.done or session.capped or last):
            self.eva_deferred_steps += rows
            return False
        budget_ended = not (session.done or session.capped)  # only on the last rollout, by the check above
        if session.done:
            stop_reason = None
        elif budget_ended:
            stop_reason = f"the training budget ended after {session.batches_used} batches"
        else:
            stop_reason = f"max_batches={session.eva.max_batches} reached"
        result = session.result(stop_reason, final=budget_ended)
        result.env_steps, result.data_source, result.deferred_steps = 0, "ppo", self.eva_deferred_steps
        self.eva_apply(result)
        self.eva_session, self.eva_apply = None, None
        record_eva_report(self.logger, self.policy.eva_report)
        return True

    def learn(self, *args: Any, **kwargs: Any) -> Any:
        """The algorithm's ``learn``, refused before any rollout for a model saved before EVA finished."""
        if self.eva_session is None:
            self.policy.check_trainable()
        return super().learn(*args, **kwargs)  # type: ignore[misc]

    def _rollout(self) -> dict[str, Any]:
        return {name: copy.deepcopy(getattr(self.rollout_buffer, name)) for name in self.KEPT}

    def _train_on(self, rollout: dict[str, Any]) -> None:
        for name, value in rollout.items():
            setattr(self.rollout_buffer, name, value)
        self.rollout_buffer.generator_ready = False  # the next update flattens these arrays anew
        super().train()  # type: ignore[misc]

    def train(self) -> None:
        if self.eva_session is not None:
            # A budget that ends before EVA converges still trains: EVA's current estimate initializes the adapters
            last = self.num_timesteps >= self._total_timesteps
            if not self._feed_eva(last):
                self.eva_rollouts.append(self._rollout())  # its update waits for EVA's adapters
                return
            # EVA is done: the kept rollouts' updates, oldest first, then this rollout's
            current = self._rollout()
            kls = []
            for rollout in [*self.eva_rollouts, current]:
                self._train_on(rollout)
                kls.append(self.logger.name_to_value.get("train/approx_kl"))
            self.eva_rollouts = []
            self._record_catch_up(kls)
            return
        super().train()  # type: ignore[misc]

    def _record_catch_up(self, kls: list[float | None]) -> None:
        """Log the updates made in a row once EVA was done: SB3's logger keeps a tag's last value, so ``train/`` shows
        only the row's last update; its first (the adapted policy's first update, as any method's) and largest get
        tags of their own (``init/``, beside EVA's report). A2C logs no KL: only the row's length then."""
        self.logger.record("init/catch_up_updates", len(kls))
        if all(kl is not None for kl in kls):
            self.logger.record("init/catch_up_first_approx_kl", float(kls[0]))
            self.logger.record("init/catch_up_max_approx_kl", float(max(kls)))


class EvaPPO(EvaRolloutsMixin, PPO):
    """PPO with EVA on its first rollouts (:class:`EvaRolloutsMixin`)."""


class EvaA2C(EvaRolloutsMixin, A2C):
    """A2C with EVA on its first rollouts (:class:`EvaRolloutsMixin`)."""


EVA_ROLLOUT_ALGORITHMS: dict[type[OnPolicyAlgorithm], type[OnPolicyAlgorithm]] = {PPO: EvaPPO, A2C: EvaA2C}
"""The EVA-on-rollouts variant of each on-policy algorithm."""
