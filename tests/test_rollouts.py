"""Rollout batches as EVA's data source."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecNormalize, VecTransposeImage

from eva_rl import LoraConfig, RolloutBatches, policy_forward
from eva_rl.config import EvaConfig
from eva_rl.eva import run_eva
from tests.conftest import make_minigrid, make_pretrained


def take(iterable, n: int) -> list:
    iterator = iter(iterable)
    return [next(iterator) for _ in range(n)]


def test_batches_have_the_configured_size_and_steps_are_counted_as_they_stream() -> None:
    model = make_pretrained("mlp-discrete")
    env = make_vec_env("CartPole-v1", n_envs=3, seed=0)
    rollouts = RolloutBatches(model.policy, env, batch_size=10)
    iterator = iter(rollouts)
    first = next(iterator)
    assert first.shape == (10, 4)
    steps_after_one = rollouts.env_steps
    assert steps_after_one < 10 + 3, "only enough steps for one batch were taken"
    batches = [first] + [next(iterator) for _ in range(9)]
    assert all(b.shape == (10, 4) for b in batches)
    assert 100 - 3 <= rollouts.env_steps + 3 <= 100 + 3
    rows = np.concatenate(batches)
    assert len(np.unique(rows, axis=0)) == 100, "no observation is repeated or dropped between batches"


def test_dict_observations_are_batched_per_key() -> None:
    model = make_pretrained("dict-discrete")
    env = make_vec_env(type(model.env.envs[0].unwrapped), n_envs=2, seed=0)
    batch = take(RolloutBatches(model.policy, env, batch_size=7), 2)[1]
    assert batch["position"].shape == (7, 2) and batch["velocity"].shape == (7, 3)


def test_vecnormalize_is_applied_and_its_statistics_are_frozen_during_collection() -> None:
    model = make_pretrained("mlp-discrete")
    env = VecNormalize(make_vec_env("CartPole-v1", n_envs=2, seed=0), norm_reward=False)
    env.reset()
    for _ in range(50):  # give the normalizer non-trivial statistics
        env.step(np.array([env.action_space.sample() for _ in range(2)]))
    mean, count = env.obs_rms.mean.copy(), env.obs_rms.count
    rollouts = RolloutBatches(model.policy, env, batch_size=2)
    iterator = iter(rollouts)
    for _ in range(20):
        batch = next(iterator)
        np.testing.assert_allclose(batch, env.normalize_obs(env.get_original_obs()), rtol=1e-5)
    assert env.obs_rms.count == count and np.array_equal(env.obs_rms.mean, mean)
    iterator.close()
    assert env.training, "the normalizer's training flag is restored"


def test_sampling_is_seeded_privately_and_stochastic_by_default() -> None:
    model = make_pretrained("mlp-discrete")
    state = torch.get_rng_state()
    runs = [
        np.concatenate(take(RolloutBatches(model.policy, make_vec_env("CartPole-v1", n_envs=2), 16, seed=s), 4))
        for s in (0, 0, 1)
    ]
    assert torch.equal(state, torch.get_rng_state()), "the global torch RNG is untouched"
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])
    greedy = RolloutBatches(model.policy, make_vec_env("CartPole-v1", n_envs=2), 16, deterministic=True, seed=0)
    assert not np.array_equal(np.concatenate(take(greedy, 4)), runs[0])


def test_policy_forward_touches_every_layer_once() -> None:
    model = make_pretrained("cnn-discrete")
    calls: dict[str, int] = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
        for name, m in model.policy.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    ]
    obs = np.stack([model.observation_space.sample() for _ in range(5)])
    logits, values = policy_forward(model.policy, obs)
    for handle in handles:
        handle.remove()
    assert logits.shape == (5, 7) and values.shape == (5, 1)
    assert set(calls.values()) == {1} and len(calls) == 10  # 3 convs, 1 linear, 2x2 MLP, 2 heads


@pytest.mark.filterwarnings("ignore:EVA:UserWarning")
def test_two_rollout_seeds_give_similar_directions() -> None:
    model = make_pretrained("cnn-discrete")
    results = []
    for seed in (0, 1):
        env = VecTransposeImage(make_vec_env(make_minigrid, n_envs=4, seed=seed))
        rollouts = RolloutBatches(model.policy, env, batch_size=128, seed=seed)
        results.append(run_eva(model.policy, rollouts, LoraConfig(r=2), EvaConfig(rho=1.0), forward_fn=policy_forward))
    cosines = []
    for name, a in results[0].A.items():
        b = results[1].A[name]
        cosines.extend(torch.nn.functional.cosine_similarity(a, b, dim=1).abs().tolist())
    assert np.mean(cosines) > 0.9, cosines
