"""The adapted-weight cache: an eva-rl policy's online LoRA layers keep ``W + s B A`` between calls without gradients,
its target networks never do; a kept weight is never stale; and learning with the cache is bit for bit learning
without it (PPO, and SAC, whose target networks are Polyak-averaged through ``.data``). CachedAdapterWeights opens
the cache for any module during rollouts."""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch
from stable_baselines3 import SAC
from stable_baselines3.common.callbacks import BaseCallback

import eva_rl
from eva_rl import LoraConfig
from eva_rl.callbacks import CachedAdapterWeights
from eva_rl.layers import LoraLayer, keep_adapted_weights
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


def without_cache(model):
    """``model`` with every LoRA layer computing ``W + s B A`` at each call (as before the cache was the default)."""
    keep_adapted_weights([layer for layer in model.policy.modules() if isinstance(layer, LoraLayer)], keep=False)
    return model


def test_the_callback_opens_the_cache_during_rollouts_only() -> None:
    model = without_cache(lora_ppo())
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


class StaleProbe(BaseCallback):
    """At every env step, checks each LoRA layer's kept weight: one that still claims to match its parameters must
    equal ``W + s B A`` computed now, bit for bit."""

    def __init__(self) -> None:
        super().__init__()
        self.checked = 0

    def _on_step(self) -> bool:
        for layer in self.model.policy.modules():
            cache = getattr(layer, "_weight_cache", None)
            if cache is not None and cache.matches(layer._weight_sources(), layer.scaling):
                with torch.no_grad():
                    assert torch.equal(cache.weight, layer.adapted_weight()), "a stale adapted weight"
                self.checked += 1
        return True


def test_online_layers_keep_their_weight_targets_never_and_no_kept_weight_is_stale() -> None:
    model = lora_sac()
    targets = [m for m in model.policy.critic_target.modules() if isinstance(m, LoraLayer)]
    online = list(model.policy.lora_layers.values())
    assert online and all(layer._cache_weights for layer in online)
    probe = StaleProbe()
    model.learn(192, callback=probe)
    assert probe.checked > 0
    assert targets and not any(layer._cache_weights or layer._weight_cache is not None for layer in targets)
    actor = [layer for name, layer in model.policy.lora_layers.items() if name.startswith("actor.")]
    assert any(layer._weight_cache is not None for layer in actor)  # acting used the kept weights


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
    plain = _trained_state(without_cache(make()), None)
    cached = _trained_state(make(), CachedAdapterWeights())
    assert plain.keys() == cached.keys()
    moved = [name for name in plain if "lora_B" in name and plain[name].abs().max() > 0]
    assert moved  # the adapters trained, so equality below says something
    for name in plain:
        assert torch.equal(plain[name], cached[name]), name
