"""SB3 callbacks for adapted policies."""

from __future__ import annotations

from contextlib import ExitStack

from stable_baselines3.common.callbacks import BaseCallback

from eva_rl.layers import cached_adapter_weights


class CachedAdapterWeights(BaseCallback):
    """Computes each LoRA layer's ``W + s B A`` once per rollout instead of once per env step.

    eva-rl's policies do so already for their online networks (they keep the weight between calls without
    gradients); the callback also covers LoRA layers injected into other modules, and target networks' layers while
    a rollout runs.

    Opens :func:`~eva_rl.layers.cached_adapter_weights` on the policy from the start of each rollout collection to
    its end, where SB3 (PPO, A2C, SAC, TD3, DQN) changes no parameter; the updates and target networks that follow
    run outside it. Pass it to ``learn`` beside your own callbacks::

        model.learn(100_000, callback=[CachedAdapterWeights(), my_callback])

    A callback that writes the policy's parameters through ``.data`` during a rollout must not be combined with it.
    """

    def __init__(self, verbose: int = 0) -> None:
        super().__init__(verbose)
        self._scope = ExitStack()

    def _on_rollout_start(self) -> None:
        self._scope.close()
        self._scope.enter_context(cached_adapter_weights(self.model.policy))

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self._scope.close()

    def _on_training_end(self) -> None:
        self._scope.close()


class StopTrainingOnEvaDone(BaseCallback):
    """Stops ``learn`` at the first env step after EVA on the algorithm's rollouts has initialized the adapters
    (:class:`~eva_rl.eva_ppo.EvaPPO`), after the updates of the rollouts it read: a way to run EVA, and only the
    updates its data pays for, within a budget large enough for it to converge::

        model = adapt(pretrained, env, eva=EvaConfig(data_source="ppo"))
        model.learn(100_000, callback=StopTrainingOnEvaDone())
        print(model.policy.eva_report.batches_used)
    """

    def _on_step(self) -> bool:
        return bool(getattr(self.model, "eva_pending", False))
