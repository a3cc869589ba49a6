"""Rollouts as EVA's data source: observation batches from running a policy in the target environment."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.vec_env import VecEnv, VecNormalize, unwrap_vec_wrapper

Observation = np.ndarray | dict[str, np.ndarray]


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


class RolloutBatches:
    """Iterate observation batches collected by running ``policy`` in ``env``.

    Streams: only the batch being filled is held. The observations are those the policy sees in PPO,
    after every VecEnv wrapper (``VecNormalize`` and ``VecTransposeImage`` included); the policy's own
    preprocessing (image scaling, one-hot encoding) runs in :func:`policy_forward`. ``VecNormalize`` statistics
    are frozen while collecting, so EVA sees the same preprocessing the pretrained policy was evaluated with.
    Actions are sampled from a private RNG stream seeded by ``seed``, leaving the global torch RNG untouched.

    :param policy: The acting policy (the pretrained one; an EVA-initialized adapter with B = 0 acts the same).
    :param env: The target environment, vectorized.
    :param batch_size: Observations (environment steps) per batch.
    :param deterministic: Act greedily; by default actions are sampled, as PPO will.
    :param seed: Seeds the environments and the action sampling.
    :ivar env_steps: Environment steps taken so far (all sub-environments counted).
    """

    def __init__(
        self,
        policy: BasePolicy,
        env: VecEnv,
        batch_size: int,
        deterministic: bool = False,
        seed: int | None = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is invalid: expected an integer >= 1")
        self.policy = policy
        self.env = env
        self.batch_size = batch_size
        self.deterministic = deterministic
        self.seed = seed
        self.env_steps = 0

    def _act(self, obs: Observation, rng_state: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(rng_state)
            actions, _ = self.policy.predict(obs, deterministic=self.deterministic)
            return actions, torch.get_rng_state()

    def __iter__(self) -> Iterator[Observation]:
        normalizer = unwrap_vec_wrapper(self.env, VecNormalize)
        was_updating = normalizer.training if normalizer is not None else False
        if normalizer is not None:
            normalizer.training = False
        generator = torch.Generator().manual_seed(0 if self.seed is None else self.seed)
        rng_state = generator.get_state()
        try:
            if self.seed is not None:
                self.env.seed(self.seed)
            obs = self.env.reset()
            pending: Observation | None = None
            while True:
                pending = obs if pending is None else _concat([pending, obs])
                while _rows(pending) >= self.batch_size:
                    batch, pending = _split(pending, self.batch_size)
                    yield batch
                actions, rng_state = self._act(obs, rng_state)
                obs, _, _, _ = self.env.step(actions)
                self.env_steps += self.env.num_envs
        finally:
            if normalizer is not None:
                normalizer.training = was_updating


def policy_forward(policy: ActorCriticPolicy, obs: Observation) -> tuple[torch.Tensor, torch.Tensor]:
    """Run every layer of an actor-critic policy once on ``obs``, without sampling.

    Mirrors ``ActorCriticPolicy.forward`` (preprocessing, features, both MLP branches, both heads) but returns
    the action-distribution parameters and values instead of sampled actions, so EVA's forward passes neither
    consume nor depend on the RNG.
    """
    obs_tensor, _ = policy.obs_to_tensor(obs)
    features = policy.extract_features(obs_tensor)
    if policy.share_features_extractor:
        latent_pi, latent_vf = policy.mlp_extractor(features)
    else:
        pi_features, vf_features = features
        latent_pi = policy.mlp_extractor.forward_actor(pi_features)
        latent_vf = policy.mlp_extractor.forward_critic(vf_features)
    return policy.action_net(latent_pi), policy.value_net(latent_vf)
