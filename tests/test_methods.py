"""The method zoo: every adapter initialization leaves the policy unchanged at step 0; DoRA/PiSSA merges are exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from stable_baselines3 import PPO

import eva_rl
from eva_rl import EvaConfig, LoraConfig
from eva_rl.layers import LoraConv2d, LoraLinear
from tests.conftest import VARIANTS, make_pretrained
from tests.test_policy import outputs, sample_obs

pytestmark = pytest.mark.filterwarnings("ignore:EVA:UserWarning", "ignore:(pissa|olora):UserWarning")

# EVA's own rollouts: adapt() returns the EVA-initialized adapters, to be inspected before any learning
FAST_EVA = EvaConfig(batch_size=64, max_batches=60, on_max_batches="warn", data_source="rollouts")


def adapt(variant: str, method: str, **kwargs) -> tuple[PPO, PPO]:
    base = make_pretrained(variant)
    model = eva_rl.adapt(base, VARIANTS[variant][0](), method=method, lora=LoraConfig(r=2), eva=FAST_EVA, **kwargs)
    return base, model


PRETRAINED_METHODS = [name for name, method in eva_rl.METHODS.items() if method.pretrained]


@pytest.mark.parametrize("variant", ["mlp-discrete", "mlp-box", "cnn-discrete"])
@pytest.mark.parametrize("method", PRETRAINED_METHODS)
def test_every_method_leaves_the_policy_unchanged_at_step_zero(variant: str, method: str) -> None:
    base, model = adapt(variant, method)
    spec = eva_rl.get_method(method)
    obs = sample_obs(base)
    for got, want in zip(outputs(model.policy, obs), outputs(base.policy, obs)):
        assert (got - want).abs().max() < 1e-5, method
    trainable = {n for n, p in model.policy.named_parameters() if p.requires_grad}
    if not spec.adapters:
        assert type(model.policy) is type(base.policy)
        assert trainable == {n for n, _ in model.policy.named_parameters()}
        return
    layers = model.policy.lora_layers
    assert model.policy.lora_plan.method == method
    if spec.trains == "heads":
        assert not layers
        assert trainable - {"log_std"} == {"action_net.weight", "action_net.bias", "value_net.weight", "value_net.bias"}
    else:
        assert layers
        assert all(layer.use_dora == spec.use_dora for layer in layers.values())
    if spec.rewrites_base:
        # The adapter holds part of W itself, unlike the zero-B methods.
        assert all(layer.lora_B.abs().sum() > 0 for layer in layers.values())


def test_scratch_is_the_same_architecture_freshly_initialized() -> None:
    base, model = adapt("mlp-discrete", "scratch")
    assert type(model.policy) is type(base.policy)
    assert model.policy.state_dict().keys() == base.policy.state_dict().keys()
    obs = sample_obs(base)
    assert (outputs(model.policy, obs)[0] - outputs(base.policy, obs)[0]).abs().max() > 1e-3


def test_lora_redist_takes_evas_ranks_but_random_directions() -> None:
    _, eva = adapt("cnn-discrete", "eva")
    _, redist = adapt("cnn-discrete", "lora-redist")
    assert redist.policy.lora_ranks == eva.policy.lora_ranks
    for name, layer in redist.policy.lora_layers.items():
        rows = layer.lora_A.detach().reshape(layer.r, -1)
        eva_rows = eva.policy.lora_layers[name].lora_A.detach().reshape(layer.r, -1)
        assert not torch.allclose(rows, eva_rows)


def test_pissa_caps_ranks_at_the_weight_rank_with_a_warning() -> None:
    base = make_pretrained("mlp-discrete")
    with pytest.warns(UserWarning, match=r"pissa: rank capped .*value_net \(2 -> 1\)"):
        model = eva_rl.adapt(base, VARIANTS["mlp-discrete"][0](), method="pissa", lora=LoraConfig(r=2))
    assert model.policy.lora_ranks["value_net"] == 1
    assert model.policy.lora_layers["value_net"].scaling == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("init", ["dora", "pissa"])
def test_dora_and_pissa_merge_exactly(kind: str, init: str) -> None:
    torch.manual_seed(0)
    if kind == "linear":
        base, x = torch.nn.Linear(6, 5), torch.randn(7, 6)
    else:
        base, x = torch.nn.Conv2d(3, 4, 2, padding=1), torch.randn(2, 3, 5, 5)
    expected = base(x)
    wrapper = LoraLinear if kind == "linear" else LoraConv2d
    layer = wrapper(base, 2, 4.0, use_dora=init == "dora")
    if init == "pissa":
        eva_rl.inits.pissa_init(layer)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_(std=0.3)
        if layer.use_dora:
            layer.lora_magnitude.mul_(torch.rand_like(layer.lora_magnitude) + 0.5)
    adapted = layer(x)
    weight_before = layer.base_layer.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), adapted, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.base_layer(x), adapted, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, weight_before, atol=1e-5, rtol=1e-5)


def test_dora_magnitude_trains_saves_and_merges(tmp_path: Path) -> None:
    _, model = adapt("mlp-discrete", "eva+dora", n_steps=32, batch_size=32, n_epochs=2)
    magnitudes = {n: p for n, p in model.policy.named_parameters() if n.endswith("lora_magnitude")}
    assert magnitudes and all(p.requires_grad for p in magnitudes.values())
    before = {n: p.detach().clone() for n, p in magnitudes.items()}
    model.learn(64)
    assert any(not torch.equal(p, before[n]) for n, p in magnitudes.items())
    model.save(tmp_path / "dora.zip")
    reloaded = PPO.load(tmp_path / "dora.zip", device="cpu")
    obs = sample_obs(model)
    for got, want in zip(outputs(reloaded.policy, obs), outputs(model.policy, obs)):
        assert torch.equal(got, want)
    merged = eva_rl.merge(model)
    for got, want in zip(outputs(merged.policy, obs), outputs(model.policy, obs)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.fixture
def pissa_dora():
    """A method that exists only in this test, registered with one entry and removed afterwards."""
    method = eva_rl.register_method(
        eva_rl.Method("pissa+dora", "PiSSA with DoRA", init=eva_rl.inits.pissa_init, rewrites_base=True, use_dora=True)
    )
    yield method
    del eva_rl.METHODS[method.name]


@pytest.mark.filterwarnings("ignore:pissa")
def test_a_new_method_is_one_registry_entry(pissa_dora, tmp_path: Path) -> None:
    from eva_rl.experiments.tasks import find_task

    base, model = adapt("cnn-discrete", "pissa+dora")
    obs = sample_obs(base)
    for got, want in zip(outputs(model.policy, obs), outputs(base.policy, obs)):
        assert (got - want).abs().max() < 1e-5
    assert all(layer.use_dora and layer.lora_B.abs().sum() > 0 for layer in model.policy.lora_layers.values())
    folder = eva_rl.save_adapter(model, tmp_path / "adapter")  # the method comes from the model's plan
    saved = eva_rl.checkpoints.adapter_state(model)
    assert any(key.endswith("base_layer.weight") for key in saved), "rewritten base weights are kept"
    restored = eva_rl.load_adapter(base, folder, env=VARIANTS["cnn-discrete"][0]())
    for got, want in zip(outputs(restored.policy, obs), outputs(model.policy, obs)):
        assert (got - want).abs().max() < 1e-6
    assert find_task("PointGoal").with_overrides(dict(methods=["pissa+dora", "full"])).methods == ["pissa+dora", "full"]
    with pytest.raises(eva_rl.ConfigError, match="already registered"):
        eva_rl.register_method(pissa_dora)
