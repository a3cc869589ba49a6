"""Rollouts as EVA's data source: observation batches from running a policy in the target environment."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.vec_env import VecEnv, VecNormalize, unwrap_vec_wrapper

Observation = np.ndarray | dict[str, np.ndarray]
RngState = tuple[torch.Tensor, torch.Tensor | None]
"""The private action-sampling stream: the CPU generator's state and, for a policy on CUDA, its device's."""


def _concat(parts: list[Observation]) -> Observation:
    if isinstance(parts[0], dict):
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    return np.concatenate(parts)


def _split(obs: Observation, n: int) -> tuple[Observation, Observation]:
    if isinstance(obs, dict):
        return {k: v[:n] for k, v in obs.items()}, {k: v[n:] for k, v in obs.items()}
    return obs[:n], obs[n:]


def _rows(obs: Observation) -> int:
    return len(next(iter(obs.values()))) if isinstance(obs, dict) else len(obs)


class Transition(NamedTuple):
    """One vectorized env step as an off-policy replay buffer's ``add`` takes it: observations as the env gave them
    (before ``VecNormalize``), the next ones (an episode's terminal observation where it ended), the actions as the
    buffer keeps them, the unnormalized rewards."""

    obs: Observation
    next_obs: Observation
    actions: np.ndarray
    rewards: np.ndarray
    dones: np.ndarray
    infos: list[dict[str, Any]]


def _next_observations(
    new_obs: Observation, dones: np.ndarray, infos: list[dict[str, Any]], normalizer: VecNormalize | None
) -> Observation:
    # A VecEnv resets a finished env at once: the step's real next observation is in its info (normalized by
    # VecNormalize like every observation, so it is unnormalized here, as SB3's off-policy algorithms store it).
    next_obs = copy.deepcopy(new_obs)
    for i, done in enumerate(dones):
        terminal = infos[i].get("terminal_observation") if done else None
        if terminal is None:
            continue
        if normalizer is not None:
            terminal = normalizer.unnormalize_obs(terminal)
        if isinstance(next_obs, dict):
            for key in next_obs:
                next_obs[key][i] = terminal[key]
        else:
            next_obs[i] = terminal
    return next_obs


class RolloutBatches:
    """Iterate observation batches collected by running ``policy`` in ``env``.

    Streams: only the batch being filled is held. The observations are those the policy sees in PPO,
    after every VecEnv wrapper (``VecNormalize`` and ``VecTransposeImage`` included); the policy's own
    preprocessing (image scaling, one-hot encoding) runs in :func:`policy_forward`. ``VecNormalize`` statistics
    are frozen while collecting, so EVA sees the same preprocessing the pretrained policy was evaluated with.
    Actions are sampled from a private RNG stream seeded by ``seed`` (on the policy's CUDA device too), leaving the
    global torch RNGs untouched.

    :param policy: The acting policy (the pretrained one; an EVA-initialized adapter with B = 0 acts the same).
    :param env: The target environment, vectorized.
    :param batch_size: Observations (environment steps) per batch.
    :param deterministic: Act greedily; by default actions are sampled, as PPO will.
    :param seed: Seeds the environments and the action sampling.
    :param with_actions: Yield ``(observations, actions)`` pairs, the actions as a critic sees them (scaled to
        ``[-1, 1]`` for Box action spaces, as off-policy replay buffers store them).
    :param exploration_rate: Take a uniformly random action with this probability (DQN's epsilon-greedy
        exploration), drawn from the same private stream.
    :param keep_transitions: Keep every env step as a :class:`Transition` in :attr:`transitions`, for an
        off-policy algorithm's replay buffer (the actions as a critic sees them, whatever ``with_actions``).
    :ivar env_steps: Environment steps taken so far (all sub-environments counted).
    :ivar transitions: The steps taken, with ``keep_transitions``.
    """

    def __init__(
        self,
        policy: BasePolicy,
        env: VecEnv,
        batch_size: int,
        deterministic: bool = False,
        seed: int | None = 0,
        with_actions: bool = False,
        exploration_rate: float = 0.0,
        keep_transitions: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is invalid: expected an integer >= 1")
        self.policy = policy
        self.env = env
        self.batch_size = batch_size
        self.deterministic = deterministic
        self.seed = seed
        self.with_actions = with_actions
        self.exploration_rate = exploration_rate
        self.keep_transitions = keep_transitions
        self.env_steps = 0
        self.transitions: list[Transition] = []

    def _initial_rng_state(self) -> RngState:
        """The private stream's start: the CPU generator, and the policy's CUDA device's when it samples there."""
        seed = 0 if self.seed is None else self.seed
        cpu = torch.Generator().manual_seed(seed).get_state()
        device = self.policy.device
        if device.type != "cuda":
            return cpu, None
        with torch.random.fork_rng(devices=[device]), torch.cuda.device(device):
            torch.cuda.manual_seed(seed)
            return cpu, torch.cuda.get_rng_state(device)

    def _act(self, obs: Observation, rng_state: RngState) -> tuple[np.ndarray, RngState]:
        # SB3 samples actions from the global generators of the policy's device; they run here on the private
        # stream's state and are restored afterwards, so EVA's rollouts neither read nor move the caller's RNG.
        cpu_state, cuda_state = rng_state
        device = self.policy.device
        cuda_devices = [device] if cuda_state is not None else []
        with torch.random.fork_rng(devices=cuda_devices):
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, device)
            actions, _ = self.policy.predict(obs, deterministic=self.deterministic)
            if self.exploration_rate > 0:
                explore = torch.rand(len(actions)) < self.exploration_rate
                random = torch.randint(self.env.action_space.n, (len(actions),)).numpy()
                actions = np.where(explore.numpy(), random, actions)
            cuda_after = torch.cuda.get_rng_state(device) if cuda_state is not None else None
            return actions, (torch.get_rng_state(), cuda_after)

    def _critic_actions(self, actions: np.ndarray) -> np.ndarray:
        if isinstance(self.env.action_space, spaces.Box):
            return self.policy.scale_action(actions).astype(np.float32)
        return actions

    def __iter__(self) -> Iterator[Observation]:
        normalizer = unwrap_vec_wrapper(self.env, VecNormalize)
        was_updating = normalizer.training if normalizer is not None else False
        if normalizer is not None:
            normalizer.training = False
        rng_state = self._initial_rng_state()
        try:
            if self.seed is not None:
                self.env.seed(self.seed)
            obs = self.env.reset()
            pending: Observation | None = None
            taken: np.ndarray | None = None  # the actions of the pending observations
            while True:
                actions, rng_state = self._act(obs, rng_state)
                pending = obs if pending is None else _concat([pending, obs])
                seen = self._critic_actions(actions) if self.with_actions else actions
                taken = seen if taken is None else _concat([taken, seen])
                while _rows(pending) >= self.batch_size:
                    batch, pending = _split(pending, self.batch_size)
                    batch_actions, taken = _split(taken, self.batch_size)
                    yield (batch, batch_actions) if self.with_actions else batch
                original_obs = normalizer.get_original_obs() if normalizer is not None else obs
                obs, rewards, dones, infos = self.env.step(actions)
                self.env_steps += self.env.num_envs
                if self.keep_transitions:
                    if normalizer is not None:
                        new_obs, rewards = normalizer.get_original_obs(), normalizer.get_original_reward()
                    else:
                        new_obs = obs
                    next_obs = _next_observations(new_obs, dones, infos, normalizer)
                    kept = self._critic_actions(actions)
                    self.transitions.append(Transition(original_obs, next_obs, kept, rewards, dones, infos))
        finally:
            if normalizer is not None:
                normalizer.training = was_updating


def policy_forward(policy: BasePolicy, batch: Observation | tuple[Observation, np.ndarray]) -> Any:
    """Run every online layer of a policy once on a batch, without sampling, so EVA's forward passes neither
    consume nor depend on the RNG.

    An actor-critic policy (PPO, A2C) takes observations and runs as ``ActorCriticPolicy.forward`` does
    (preprocessing, features, both MLP branches, both heads), returning the action-distribution parameters and
    values. An off-policy policy takes ``(observations, actions)``: the actor (or DQN's Q-network) acts greedily on
    the observations, and the critics see the observations with those actions, as in their training loss.
    """
    if not isinstance(policy, ActorCriticPolicy):
        obs, actions = batch if isinstance(batch, tuple) else (batch, None)
        obs_tensor, _ = policy.obs_to_tensor(obs)
        output = policy._predict(obs_tensor, deterministic=True)
        critic = getattr(policy, "critic", None)
        if critic is not None and actions is not None:
            output = critic(obs_tensor, torch.as_tensor(actions, dtype=torch.float32, device=policy.device))
        return output
    obs = batch
    obs_tensor, _ = policy.obs_to_tensor(obs)
    features = policy.extract_features(obs_tensor)
    if policy.share_features_extractor:
        latent_pi, latent_vf = policy.mlp_extractor(features)
    else:
        pi_features, vf_features = features
        latent_pi = policy.mlp_extractor.forward_actor(pi_features)
        latent_vf = policy.mlp_extractor.forward_critic(vf_features)
    return policy.action_net(latent_pi), policy.value_net(latent_vf)
