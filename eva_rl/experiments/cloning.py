"""Pretraining by behaviour cloning: scripted experts' demonstrations on several envs, cloned into an SB3 actor-critic
policy, the actor by the likelihood of the experts' actions and the value head on the demonstrations' discounted
returns. The result is an ordinary SB3 model, fine-tuned like any other agent.

The demonstrations are generated at pretraining time, never stored: the seed and the settings reproduce them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from tqdm.auto import tqdm

from eva_rl.errors import ConfigError
from eva_rl.experiments.environments import WrapperSpec, env_factory, load_object
from eva_rl.experiments.tasks import CloningSettings


@dataclass
class Demonstrations:
    """Transitions of the experts, all envs stacked.

    :ivar observations: ``(transitions, *observation shape)``, float32.
    :ivar actions: The experts' actions (without the executed noise), ``(transitions, *action shape)``.
    :ivar returns: Discounted return from each transition to its episode's end.
    :ivar expert_success: ``{env id: share of episodes with info["success"] at some step}``, noise included
        (``None`` for an env that never reports success).
    """

    observations: np.ndarray
    actions: np.ndarray
    returns: np.ndarray
    expert_success: dict[str, float | None]

    def __len__(self) -> int:
        return len(self.actions)


def discounted_returns(rewards: Sequence[float], gamma: float) -> np.ndarray:
    """``G_t = r_t + gamma * G_{t+1}`` for one episode, ``G`` after its last step being 0."""
    returns = np.zeros(len(rewards), dtype=np.float32)
    following = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        following = rewards[t] + gamma * following
        returns[t] = following
    return returns


def _demonstrate(
    env: gym.Env, expert: Any, action_noise: float, rng: np.random.Generator, seed: int | None
) -> tuple[list[np.ndarray], list[np.ndarray], list[float], bool | None]:
    """One episode of ``expert`` in ``env``: its observations, the expert's actions (the env executes them with
    noise), the rewards, and whether ``info["success"]`` was set at some step (``None``: the env never reports it)."""
    low, high = env.action_space.low, env.action_space.high
    observation, _ = env.reset(seed=seed)
    observations, actions, rewards, succeeded, done = [], [], [], None, False
    while not done:
        action = np.clip(np.asarray(expert.get_action(observation), dtype=np.float32), low, high)
        executed = np.clip(action + action_noise * rng.standard_normal(action.shape), low, high)
        observations.append(np.asarray(observation, dtype=np.float32))
        actions.append(action)
        observation, reward, terminated, truncated, info = env.step(executed)
        rewards.append(float(reward))
        if "success" in info:
            succeeded = bool(succeeded) or bool(info["success"])
        done = terminated or truncated
    return observations, actions, rewards, succeeded


def collect_demonstrations(
    settings: CloningSettings,
    gamma: float,
    seed: int,
    wrappers: Sequence[WrapperSpec] = (),
    progress: bool = True,
) -> Demonstrations:
    """Run each env's expert for ``settings.episodes`` episodes (the first reset of env ``k`` seeded ``seed + k``).

    :raises ConfigError: when the expert cannot be loaded or returns nothing for an env, or an env's actions are not
        continuous.
    """
    expert_for: Callable[[str], Any] = load_object(settings.expert, "pretrain_cloning.expert")
    rng = np.random.default_rng(seed)
    observations, actions, returns, expert_success = [], [], [], {}
    bar = tqdm(
        total=len(settings.envs) * settings.episodes, desc="demonstrations", unit="episode", disable=not progress
    )
    for k, env_id in enumerate(settings.envs):
        expert = expert_for(env_id)
        if not hasattr(expert, "get_action"):
            raise ConfigError(
                f"pretrain_cloning.expert={settings.expert!r} returned {expert!r} for {env_id!r}: expected an object "
                "with get_action(observation)"
            )
        successes = []
        with closing(env_factory(env_id, wrappers)()) as env:
            if not isinstance(env.action_space, spaces.Box):
                raise ConfigError(
                    f"pretrain_cloning needs continuous (Box) actions; {env_id!r} has {env.action_space}: the "
                    "experts' actions are cloned by a Gaussian's likelihood, with Gaussian exploration noise"
                )
            # the first episode seeds the env; the others go on from its generator, each with new positions
            for episode in range(settings.episodes):
                seen, acted, rewards, succeeded = _demonstrate(
                    env, expert, settings.action_noise, rng, seed + k if episode == 0 else None
                )
                observations += seen
                actions += acted
                returns.append(discounted_returns(rewards, gamma))
                successes += [] if succeeded is None else [succeeded]
                bar.update()
        expert_success[env_id] = float(np.mean(successes)) if successes else None
    bar.close()
    return Demonstrations(np.stack(observations), np.stack(actions), np.concatenate(returns), expert_success)


def clone(
    model: OnPolicyAlgorithm,
    demonstrations: Demonstrations,
    settings: CloningSettings,
    seed: int,
    progress: bool = True,
) -> dict[str, float]:
    """Fit ``model``'s policy to ``demonstrations``: the actor by the negative log-likelihood of the experts' actions
    (its log std learns the spread the clone cannot explain), the value head by the squared error to the returns.

    :return: The last epoch's mean ``log_likelihood`` (per action) and ``value_rmse``.
    """
    policy = model.policy
    policy.set_training_mode(True)
    generator = np.random.default_rng(seed)
    torch.manual_seed(seed)
    device = policy.device
    observations = torch.as_tensor(demonstrations.observations, device=device)
    actions = torch.as_tensor(demonstrations.actions, device=device)
    returns = torch.as_tensor(demonstrations.returns, device=device)
    with torch.no_grad():
        # Adam moves each weight by about the learning rate per step: the output bias starts at the mean return so
        # that the value head fits the returns' spread, not first their scale (hundreds on Meta-World)
        policy.value_net.bias.fill_(float(returns.mean()))
    optimizer = torch.optim.Adam(policy.parameters(), lr=settings.learning_rate)
    batches = -(-len(demonstrations) // settings.batch_size)
    bar = tqdm(total=settings.epochs * batches, desc="cloning", unit="batch", disable=not progress)
    for _ in range(settings.epochs):
        order = torch.as_tensor(generator.permutation(len(demonstrations)), device=device)
        likelihood, squared_error = 0.0, 0.0
        for batch in order.split(settings.batch_size):
            values, log_prob, _ = policy.evaluate_actions(observations[batch], actions[batch])
            value_loss = torch.mean((values.flatten() - returns[batch]) ** 2)
            loss = -log_prob.mean() + value_loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            likelihood += float(log_prob.detach().sum())
            squared_error += float(value_loss.detach()) * len(batch)
            bar.update()
    bar.close()
    policy.set_training_mode(False)
    return {
        "log_likelihood": likelihood / len(demonstrations),
        "value_rmse": float(np.sqrt(squared_error / len(demonstrations))),
    }
