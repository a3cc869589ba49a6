"""SB3 callbacks for adapted policies."""

from __future__ import annotations

import weakref
from contextlib import ExitStack
from typing import Any

import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from torch.optim.optimizer import register_optimizer_step_pre_hook

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


CRITIC_PREFIXES = ("mlp_extractor.value_net.", "value_net.", "vf_features_extractor.")
"""Names of an SB3 actor-critic policy's parameters that only the value function uses (a shared features extractor
is the actor's too)."""


class CriticWarmup(BaseCallback):
    """The first ``updates`` updates of an on-policy algorithm (PPO, A2C) step only the critic: the actor, and any
    parameter it shares with the critic, keeps its weights and its optimizer state until the warm-up ends.

    A pretrained agent's value head was fitted on its source task (or on demonstrations); on a new task its advantages
    are noise at first, and the first policy updates follow that noise away from what the agent knew (a cloned
    Meta-World agent's training return on push fell from 278 to 157 in 34k steps even at a learning rate of 1e-5,
    its critic explaining 0.11 of the return variance at the first update). The warm-up lets the
    critic fit the target's returns before the actor moves; its env steps count in the budget like any other::

        model.learn(100_000, callback=CriticWarmup(updates=5))

    An update is one call of the algorithm's ``train`` (PPO's ``n_epochs`` passes over a rollout, A2C's one step), as
    ``model._n_updates`` counts them, so a resumed run picks up where it was; with EVA on PPO's rollouts
    (:class:`~eva_rl.eva_ppo.EvaPPO`) the updates EVA deferred count one each, and the adapters EVA sets up mid-run
    stay frozen until the warm-up ends. Gradients are dropped before each optimizer step (a global optimizer step
    pre-hook, scoped to the policy's optimizer), so the losses, clipping and logs are the algorithm's own.

    :param updates: Updates that train only the critic (0: none).
    """

    def __init__(self, updates: int, verbose: int = 0) -> None:
        super().__init__(verbose)
        if isinstance(updates, bool) or not isinstance(updates, int) or updates < 0:
            raise ValueError(f"updates={updates!r} is invalid: expected an integer >= 0")
        self.updates = updates
        self._handle: Any = None

    def _on_training_start(self) -> None:
        if not isinstance(self.model, OnPolicyAlgorithm):
            raise TypeError(
                f"CriticWarmup is for on-policy algorithms (PPO, A2C), not {type(self.model).__name__}, whose critic "
                "is a separate network with its own optimizer"
            )
        if self.updates > 0:
            # A global hook, since EVA on PPO's rollouts replaces the optimizer mid-run. It holds the callback weakly
            # and goes with it, so a learn() that raised (no _on_training_end) leaves no hook behind once the
            # callback is dropped.
            callback = weakref.ref(self)

            def drop_actor_gradients(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
                alive = callback()
                if alive is not None:
                    alive._drop_actor_gradients(optimizer, args, kwargs)

            self._handle = register_optimizer_step_pre_hook(drop_actor_gradients)
            weakref.finalize(self, self._handle.remove)

    @property
    def updates_made(self) -> int:
        """Updates the algorithm has made (``_n_updates`` counts PPO's epochs)."""
        per_update = self.model.n_epochs if isinstance(self.model, PPO) else 1
        return self.model._n_updates // per_update

    @property
    def warming_up(self) -> bool:
        return self.updates_made < self.updates

    def _drop_actor_gradients(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if optimizer is not self.model.policy.optimizer or not self.warming_up:
            return
        for name, parameter in self.model.policy.named_parameters():
            if not name.startswith(CRITIC_PREFIXES):
                parameter.grad = None

    def _on_step(self) -> bool:
        return True

    def _on_training_end(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
