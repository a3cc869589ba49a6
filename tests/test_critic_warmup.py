"""CriticWarmup: the first updates step only the critic, for full fine-tuning, LoRA and EVA on PPO's rollouts (whose
adapters appear mid-run), with PPO and A2C; after the warm-up the actor trains."""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch
from stable_baselines3 import SAC

import eva_rl
from eva_rl import EvaConfig, LoraConfig
from eva_rl.callbacks import CRITIC_PREFIXES, CriticWarmup
from tests.conftest import make_pretrained

pytestmark = pytest.mark.filterwarnings("ignore:(EVA|lora):UserWarning")


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.policy.named_parameters()}


def _moved(before: dict[str, torch.Tensor], model) -> dict[str, bool]:
    """Which parameters changed (a parameter that did not exist before, such as EVA's adapters, counts as moved if it
    is not where the placeholder was)."""
    return {
        name: name not in before or before[name].shape != p.shape or not torch.equal(before[name], p.detach())
        for name, p in model.policy.named_parameters()
        if p.requires_grad
    }


def _critic(name: str) -> bool:
    return name.startswith(CRITIC_PREFIXES)


@pytest.mark.parametrize(
    ("method", "algorithm"), [("full", "ppo"), ("lora", "ppo"), ("lora", "a2c")], ids=["full-ppo", "lora-ppo", "a2c"]
)
def test_the_warmup_updates_move_the_critic_only_and_the_actor_trains_after(method: str, algorithm: str) -> None:
    base = make_pretrained("mlp-box")
    env = gym.make("Pendulum-v1")
    kwargs = {"n_steps": 64, "batch_size": 32} if algorithm == "ppo" else {"n_steps": 64}
    model = eva_rl.adapt(base, env, method, LoraConfig(r=2), algorithm=algorithm, seed=0, **kwargs)
    before = _snapshot(model)
    warmup = CriticWarmup(updates=2)
    model.learn(128, callback=warmup)  # two rollouts, two updates
    moved = _moved(before, model)
    assert any(moved[n] for n in moved if _critic(n)), "the critic trains during the warm-up"
    assert not any(moved[n] for n in moved if not _critic(n)), "the actor keeps its weights during the warm-up"
    assert warmup.updates_made == 2 and not warmup.warming_up
    actor = {n: p for n, p in _snapshot(model).items() if not _critic(n)}
    model.learn(64, callback=warmup, reset_num_timesteps=False)
    assert any(not torch.equal(actor[n], p.detach()) for n, p in model.policy.named_parameters() if n in actor)


def test_eva_on_ppo_rollouts_keeps_the_adapters_it_sets_up_frozen_until_the_warmup_ends() -> None:
    base = make_pretrained("mlp-box")
    eva = EvaConfig(data_source="ppo", batch_size=32, tau=1.0, max_batches=4, on_max_batches="warn")  # on rollout 2
    model = eva_rl.adapt(base, gym.make("Pendulum-v1"), "eva", LoraConfig(r=2), eva, seed=0, n_steps=64, batch_size=32)
    before = _snapshot(model)
    model.learn(192, callback=CriticWarmup(updates=3))  # EVA's 2 deferred updates and one more: the warm-up
    assert not model.eva_pending
    adapters = {n: p for n, p in model.policy.named_parameters() if "lora_B" in n and not _critic(n)}
    assert adapters and all(torch.count_nonzero(p) == 0 for p in adapters.values()), "actor B stays at EVA's zero"
    moved = _moved(before, model)
    assert any(moved[n] for n in moved if _critic(n) and "lora_B" in n)
    assert not any(moved[n] for n in moved if n in before and not _critic(n) and "lora" not in n)


def test_the_warmup_is_for_on_policy_algorithms_and_counts_updates() -> None:
    with pytest.raises(ValueError, match="updates=-1 is invalid: expected an integer >= 0"):
        CriticWarmup(updates=-1)
    model = SAC("MlpPolicy", "Pendulum-v1", learning_starts=0, seed=0)
    with pytest.raises(TypeError, match="CriticWarmup is for on-policy algorithms"):
        model.learn(2, callback=CriticWarmup(updates=1))


class _Interrupt(Exception):
    pass


def test_a_learn_that_raises_leaves_no_hook_once_the_callback_is_dropped() -> None:
    import gc

    from stable_baselines3.common.callbacks import BaseCallback
    from torch.optim.optimizer import _global_optimizer_pre_hooks

    class RaiseAtFirstStep(BaseCallback):
        def _on_step(self) -> bool:
            raise _Interrupt

    hooks = len(_global_optimizer_pre_hooks)
    model = eva_rl.adapt(make_pretrained("mlp-box"), gym.make("Pendulum-v1"), "full", n_steps=64, batch_size=32)
    warmup = CriticWarmup(updates=2)
    with pytest.raises(_Interrupt):
        model.learn(128, callback=[warmup, RaiseAtFirstStep()])
    assert len(_global_optimizer_pre_hooks) == hooks + 1, "the warm-up's hook is on while its learn() runs"
    del warmup
    gc.collect()
    assert len(_global_optimizer_pre_hooks) == hooks
    before = _snapshot(model)
    model.learn(128)  # no warm-up asked for: the actor trains from the first update
    moved = _moved(before, model)
    assert any(moved[n] for n in moved if not _critic(n))
