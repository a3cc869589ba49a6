"""The adapter plan: resolved once from a LoraConfig, carried with the policy, and read back unchanged."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import eva_rl
from eva_rl import AdapterPlan, ConfigError, EvaConfig, LoraConfig
from tests.models import ActorCriticMLP, ConvNet


def test_resolve_gives_every_target_its_rank_alpha_fan_in_and_eva_components() -> None:
    lora = LoraConfig(r=4, alpha=8, rank_pattern={"critic": 0, "action_net": 2}, alpha_pattern={"policy_net.0": 2.0})
    plan = AdapterPlan.resolve(ActorCriticMLP(), lora, EvaConfig(rho=2.0, extra_components=3))
    assert list(plan.layers) == [
        "policy_net.0", "policy_net.2", "value_net.0", "value_net.2", "action_net", "critic"
    ]  # fmt: skip
    first = plan.layers["policy_net.0"]
    assert (first.rank, first.alpha, first.fan_in, first.out_features) == (4, 2.0, 10, 16)
    assert (first.eva_cap, first.eva_components) == (8, 10)  # 8 + 3 extra, clipped to the fan-in 10
    assert plan.layers["action_net"].rank == 2 and plan.layers["action_net"].eva_cap == 4
    assert plan.layers["critic"].rank == 0 and plan.layers["critic"].eva_components == 0
    assert plan.budget == 4 * 4 + 2 and set(plan.adapted) == set(plan.layers) - {"critic"}
    assert plan.eva_components == 11  # policy_net.2 has fan-in 16: 8 + 3


def test_a_rank_above_what_a_layer_can_use_is_capped_with_one_warning() -> None:
    model = nn.Sequential(nn.Linear(3, 16), nn.Linear(16, 1))
    with pytest.warns(UserWarning, match=r"LoRA: rank capped at the layer's width \(fan-in\) for 0 \(4 -> 3\)$"):
        plan = AdapterPlan.resolve(model, LoraConfig(r=4, alpha=8), EvaConfig(rho=2.0))
    assert plan.ranks == {"0": 3, "1": 4} and plan.layers["0"].alpha == pytest.approx(6.0)
    assert plan.layers["0"].eva_cap == 3  # round(3 * 2) clipped to the fan-in
    with pytest.warns(UserWarning, match=r"pissa: rank capped at min\(out, fan_in\) for 0 \(4 -> 3\), 1 \(4 -> 1\)"):
        plan = AdapterPlan.resolve(model, LoraConfig(r=4, alpha=8), method="pissa", cap_at_weight_rank=True)
    assert plan.ranks == {"0": 3, "1": 1}
    assert plan.layers["1"].alpha / plan.layers["1"].rank == pytest.approx(2.0)  # alpha / r kept


def test_with_ranks_keeps_the_scaling_and_lora_config_resolves_back_to_the_plan() -> None:
    module = ConvNet()
    plan = AdapterPlan.resolve(module, LoraConfig(r=2, alpha=4), EvaConfig(rho=2.0))
    redistributed = plan.with_ranks({"conv": 4, "fc": 0})
    assert redistributed.ranks == {"conv": 4, "fc": 0}
    assert redistributed.layers["conv"].alpha == 8.0 and redistributed.layers["fc"].alpha == 4.0
    assert plan.with_ranks({"conv": 4}, keep_scaling=False).layers["conv"].alpha == 4.0
    config = redistributed.lora_config(LoraConfig(r=2, alpha=4))
    again = AdapterPlan.resolve(module, config)
    assert again.ranks == redistributed.ranks
    assert {n: layer.alpha for n, layer in again.layers.items()} == {"conv": 8.0, "fc": 4.0}


def test_the_plan_round_trips_through_json_and_rejects_what_is_not_one() -> None:
    plan = AdapterPlan.resolve(ConvNet(), LoraConfig(r=2, use_dora=True), EvaConfig(), method="eva+dora")
    assert AdapterPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    with pytest.raises(ConfigError, match="not an adapter plan"):
        AdapterPlan.from_dict({"layers": {"fc": {"rank": 2}}})


def test_a_plan_that_does_not_fit_the_module_is_a_clear_error() -> None:
    plan = AdapterPlan.resolve(ConvNet(), LoraConfig(r=2))
    other = nn.Sequential()
    other.add_module("conv", nn.Conv2d(3, 3, 2))
    with pytest.raises(ConfigError, match=r"does not fit Sequential: conv \(fan-in 12, planned 8\), fc \(missing\)"):
        eva_rl.inject_adapters(other, plan)


def test_inject_follows_the_plan_exactly() -> None:
    module = ActorCriticMLP()
    plan = AdapterPlan.resolve(module, LoraConfig(r=2)).with_ranks({"policy_net.0": 5, "critic": 0})
    layers = eva_rl.inject_adapters(module, plan)
    assert {name: layer.r for name, layer in layers.items()} == {n: r for n, r in plan.ranks.items() if r > 0}
    assert layers["policy_net.0"].scaling == pytest.approx(1.0)
    assert isinstance(module.critic, nn.Linear)
    x = torch.randn(4, 10)
    assert torch.isfinite(module(x)[0]).all()


def test_the_policy_carries_its_plan_through_save_and_load(tmp_path) -> None:
    import gymnasium as gym
    from stable_baselines3 import PPO

    from tests.conftest import make_pretrained

    base = make_pretrained("mlp-discrete")
    model = eva_rl.adapt(base, gym.make("CartPole-v1"), "lora", LoraConfig(r=2, rank_pattern={"value_net": 0}))
    assert model.policy_kwargs["lora_plan"] == model.policy.lora_plan.to_dict()
    model.save(tmp_path / "m.zip")
    loaded = PPO.load(tmp_path / "m.zip", device="cpu")
    assert loaded.policy.lora_plan == model.policy.lora_plan
    assert loaded.policy.lora_ranks == model.policy.lora_ranks and "value_net" not in loaded.policy.lora_ranks
