"""CachedAdapterWeights: the cache is open exactly during rollouts, and learning with it is bit for bit learning
without it (PPO, and SAC, whose target networks are Polyak-averaged through ``.data`` between rollouts)."""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch
from stable_baselines3 import SAC
from stable_baselines3.common.callbacks import BaseCallback

import eva_rl
from eva_rl import LoraConfig
from eva_rl.callbacks import CachedAdapterWeights
from eva_rl.layers import LoraLayer
from tests.conftest import make_pretrained

pytestmark = pytest.mark.filterwarnings("ignore:(EVA|lora):UserWarning")


class CacheProbe(BaseCallback):
    """Records, per env step, whether every LoRA layer of the policy computes with a cached weight."""

    def __init__(self) -> None:
        super().__init__()
        self.states: list[bool] = []

    def _on_step(self) -> bool:
        layers = [m for m in self.model.policy.modules() if isinstance(m, LoraLayer)]
        self.states.append(all(layer._cache_weights and layer._weight_cache is not None for layer in layers))
        return True


def lora_ppo(seed: int = 0):
    base = make_pretrained("mlp-box", seed)
    return eva_rl.adapt(base, gym.make("Pendulum-v1"), "lora", LoraConfig(r=2), seed=seed, n_steps=64, batch_size=32)


def test_the_cache_is_open_during_rollouts_only() -> None:
    model = lora_ppo()
    layers = [m for m in model.policy.modules() if isinstance(m, LoraLayer)]
    in_updates: list[bool] = []
    train = model.train

    def probed_train() -> None:
        in_updates.append(any(layer._cache_weights for layer in layers))
        train()

    model.train = probed_train
    probe = CacheProbe()
    model.learn(192, callback=[CachedAdapterWeights(), probe])
    assert probe.states and all(probe.states)  # every step of the three rollouts computed with cached weights
    assert in_updates == [False, False, False]
    assert layers and not any(layer._cache_weights or layer._weight_cache is not None for layer in layers)


def _trained_state(model, callback) -> dict[str, torch.Tensor]:
    model.learn(192, callback=callback)
    return {name: value.clone() for name, value in model.policy.state_dict().items()}


def lora_sac(seed: int = 0):
    base = SAC("MlpPolicy", "Pendulum-v1", policy_kwargs={"net_arch": [16, 16]}, learning_starts=32, seed=seed,
               buffer_size=500, device="cpu")  # fmt: skip
    # several gradient steps per update: a target network cached across them would miss its Polyak updates
    settings = {"learning_starts": 32, "train_freq": 4, "gradient_steps": 4}
    return eva_rl.adapt(base, gym.make("Pendulum-v1"), "lora", LoraConfig(r=2), seed=seed, **settings)


@pytest.mark.parametrize("make", [lora_ppo, lora_sac], ids=["ppo", "sac"])
def test_learning_with_the_cache_is_learning_without_it(make) -> None:
    plain = _trained_state(make(), None)
    cached = _trained_state(make(), CachedAdapterWeights())
    assert plain.keys() == cached.keys()
    moved = [name for name in plain if "lora_B" in name and plain[name].abs().max() > 0]
    assert moved  # the adapters trained, so equality below says something
    for name in plain:
        assert torch.equal(plain[name], cached[name]), name
