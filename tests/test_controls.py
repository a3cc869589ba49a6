"""The controls that take EVA's init apart: random orthonormal A (``lora-orth``), EVA's rows at Kaiming-uniform's
norm (``eva-rescaled``) or carrying its signal (``eva-signal``), A frozen (``eva-fa``, ``lora-fa``,
``lora-orth-fa``), and rsLoRA's ``alpha / sqrt(r)`` scaling. That each keeps the pretrained policy's outputs at step
0 is checked with every other method in ``tests/test_methods.py``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from torch import nn

import eva_rl
from eva_rl import EvaConfig, LoraConfig
from eva_rl.inits import KAIMING_ROW_NORM, kaiming_signal
from eva_rl.layers import LoraLinear
from eva_rl.plan import AdapterPlan
from tests.conftest import VARIANTS, make_pretrained

pytestmark = pytest.mark.filterwarnings("ignore:(EVA|eva|lora):UserWarning")

EVA = EvaConfig(batch_size=64, max_batches=60, on_max_batches="warn", data_source="rollouts")


def adapted(method: str, variant: str = "mlp-discrete", lora: LoraConfig | None = None, seed: int = 0) -> PPO:
    base = make_pretrained(variant)
    env = VARIANTS[variant][0]()
    # the random inits draw from torch's global generator, as Kaiming-uniform does, which the model's seed sets
    settings = dict(n_steps=64, batch_size=64, n_epochs=2, seed=seed)
    return eva_rl.adapt(base, env, method, lora or LoraConfig(r=2), EVA, **settings)


def adapted_with(method: str, eva: EvaConfig) -> PPO:
    """``method`` on the mlp-box agent at r = 2 with ``eva`` and the agent's own PPO settings."""
    return eva_rl.adapt(make_pretrained("mlp-box"), VARIANTS["mlp-box"][0](), method, LoraConfig(r=2), eva)


def rows(layer: eva_rl.LoraLayer) -> torch.Tensor:
    return layer.lora_A.detach().reshape(layer.r, -1)


def test_kaiming_row_norm_is_the_norm_of_kaiming_uniform_rows() -> None:
    for fan_in in (16, 256, 4096):
        a = torch.empty(512, fan_in)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # what LoRA's reset_lora_parameters draws
        assert a.norm(dim=1).mean().item() == pytest.approx(KAIMING_ROW_NORM, rel=0.02)


@pytest.mark.parametrize("variant", ["mlp-discrete", "cnn-discrete"])
@pytest.mark.parametrize("method", ["lora-orth", "lora-orth-fa"])
def test_lora_orth_draws_orthonormal_rows_that_differ_by_seed(variant: str, method: str) -> None:
    first, second = adapted(method, variant, seed=0), adapted(method, variant, seed=1)
    for name, layer in first.policy.lora_layers.items():
        a = rows(layer)
        torch.testing.assert_close(a @ a.T, torch.eye(layer.r), atol=1e-5, rtol=0)
        assert not torch.allclose(a, rows(second.policy.lora_layers[name]))
        assert layer.lora_B.abs().sum() == 0


def test_eva_rescaled_keeps_evas_directions_at_kaimings_norm() -> None:
    eva, rescaled = adapted("eva"), adapted("eva-rescaled")
    assert rescaled.policy.lora_ranks == eva.policy.lora_ranks
    for name, layer in rescaled.policy.lora_layers.items():
        want = rows(eva.policy.lora_layers[name])  # unit-norm principal directions
        torch.testing.assert_close(rows(layer), KAIMING_ROW_NORM * want, atol=1e-5, rtol=0)


def test_kaiming_signal_rows_vary_on_the_inputs_as_kaiming_uniform_rows_do() -> None:
    generator = torch.Generator().manual_seed(0)
    fan_in, rank = 24, 4
    scales = torch.logspace(0, -2, fan_in, dtype=torch.float64)  # a few directions carry most of the variance
    inputs = torch.randn(20000, fan_in, generator=generator, dtype=torch.float64) * scales + 3.0
    variances, vectors = torch.linalg.eigh(torch.cov(inputs.T))
    layer = LoraLinear(nn.Linear(fan_in, 8), r=rank, alpha=rank)
    layer.set_lora_A(vectors[:, -rank:].flip(1).T.float())  # the top directions, as EVA sets A
    kaiming_signal(layer, variances.flip(0)[:rank] / variances.sum())
    signal = (inputs @ rows(layer).double().T).var(dim=0)
    # the oracle: how much a Kaiming-uniform row's output varies on these inputs, over many draws of the row
    kaiming = torch.empty(20000, fan_in)
    nn.init.kaiming_uniform_(kaiming, a=math.sqrt(5), generator=generator)
    expected = (inputs @ kaiming.double().T).var(dim=0).mean().item()
    assert signal.tolist() == pytest.approx([expected] * rank, rel=0.03)
    cosines = nn.functional.cosine_similarity(rows(layer).double(), vectors[:, -rank:].flip(1).T, dim=1)
    torch.testing.assert_close(cosines.abs(), torch.ones(rank, dtype=torch.float64))
    # the top directions carry more than an average direction's variance, so their rows are shorter than Kaiming's
    norms = rows(layer).norm(dim=1)
    assert (norms < KAIMING_ROW_NORM).all() and (norms.diff() > 0).all()


def test_eva_signal_keeps_evas_directions_and_ranks_with_kaimings_signal() -> None:
    eva, signal = adapted("eva"), adapted("eva-signal")
    assert signal.policy.lora_ranks == eva.policy.lora_ranks
    for name, layer in signal.policy.lora_layers.items():
        ratios = torch.tensor(signal.policy.eva_report.explained_variance_ratio[name][: layer.r])
        want = rows(eva.policy.lora_layers[name]) / (3 * layer.fan_in * ratios).sqrt().unsqueeze(1)
        torch.testing.assert_close(rows(layer), want, atol=1e-5, rtol=1e-4)


def test_a_method_matching_evas_signal_needs_evas_directions() -> None:
    with pytest.raises(eva_rl.ConfigError, match="match_signal scales EVA's directions: it needs eva_directions"):
        eva_rl.register_method(eva_rl.Method("signal-only", "no EVA", match_signal=True))


@pytest.mark.parametrize("method", ["eva-fa", "lora-fa", "lora-orth-fa"])
def test_frozen_a_methods_train_b_only_and_keep_a_through_save_and_load(method: str, tmp_path: Path) -> None:
    model = adapted(method)
    before = {name: rows(layer).clone() for name, layer in model.policy.lora_layers.items()}
    optimized = {id(p) for group in model.policy.optimizer.param_groups for p in group["params"]}
    assert not any(id(layer.lora_A) in optimized for layer in model.policy.lora_layers.values())
    model.learn(256)
    for name, layer in model.policy.lora_layers.items():
        torch.testing.assert_close(rows(layer), before[name], atol=0, rtol=0)
    assert any(layer.lora_B.abs().sum() > 0 for layer in model.policy.lora_layers.values())
    model.save(tmp_path / "model.zip")
    loaded = PPO.load(tmp_path / "model.zip", device="cpu")
    assert not loaded.policy.lora_config.train_A
    assert not any(layer.lora_A.requires_grad for layer in loaded.policy.lora_layers.values())


@pytest.mark.parametrize("method", ["eva-fa", "lora-fa", "lora-orth-fa"])
def test_frozen_a_adapter_checkpoints_keep_a(method: str, tmp_path: Path) -> None:
    model = adapted(method)
    model.learn(128)
    eva_rl.save_adapter(model, tmp_path / "adapter")
    loaded = eva_rl.load_adapter(make_pretrained("mlp-discrete"), tmp_path / "adapter")
    for name, layer in model.policy.lora_layers.items():
        torch.testing.assert_close(rows(loaded.policy.lora_layers[name]), rows(layer), atol=0, rtol=0)
    obs = torch.as_tensor(np.stack([model.observation_space.sample() for _ in range(8)]))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.policy.get_distribution(obs).distribution.logits,
            model.policy.get_distribution(obs).distribution.logits,
        )


def test_rslora_scales_by_alpha_over_sqrt_r_in_the_forward_pass() -> None:
    torch.manual_seed(0)
    base = nn.Linear(8, 5)
    layer = eva_rl.LoraLinear(base, r=4, alpha=2.0, use_rslora=True)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 8)
    want = base(x) + (2.0 / math.sqrt(4)) * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), want)
    assert eva_rl.LoraLinear(nn.Linear(8, 5), r=4, alpha=2.0).scaling == pytest.approx(0.5)


@pytest.mark.parametrize("method", ["lora", "eva"])
def test_rslora_carries_into_every_adapter_the_plan_and_a_reloaded_model(method: str, tmp_path: Path) -> None:
    model = adapted(method, lora=LoraConfig(r=2, use_rslora=True))
    layers = model.policy.lora_layers
    # EVA rescales alpha with the rank as peft does (alpha * r_new / r); the scaling is then alpha / sqrt(r_new)
    assert all(layer.scaling == pytest.approx(layer.alpha / math.sqrt(layer.r)) for layer in layers.values())
    plan = model.policy.lora_plan
    assert plan.use_rslora and AdapterPlan.from_dict(plan.to_dict()) == plan
    model.save(tmp_path / "model.zip")
    loaded = PPO.load(tmp_path / "model.zip", device="cpu")
    assert {n: la.scaling for n, la in loaded.policy.lora_layers.items()} == {n: la.scaling for n, la in layers.items()}


# variants where EVA moves rank between layers on this data (it keeps r = 2 everywhere on some)
@pytest.mark.parametrize(("variant", "data_source"), [("cnn-discrete", "ppo"), ("mlp-box", "rollouts")])
def test_lora_deferred_waits_for_eva_as_eva_does_but_keeps_loras_ranks_and_init(variant: str, data_source: str) -> None:
    eva = EvaConfig(batch_size=64, max_batches=60, on_max_batches="warn", data_source=data_source, rho=2.0)
    settings = dict(n_steps=64, batch_size=64, n_epochs=2, seed=3)
    models = {}
    for method in ("eva", "lora-deferred"):
        base = make_pretrained(variant)
        env = make_vec_env(VARIANTS[variant][0], n_envs=2, seed=0)
        models[method] = eva_rl.adapt(base, env, method, LoraConfig(r=2), eva, **settings)
        models[method].learn(6 * 128)
    eva_model, deferred = models["eva"], models["lora-deferred"]
    want, got = eva_model.policy.eva_report, deferred.policy.eva_report
    uniform = {name: 2 for name in want.ranks}
    assert want.ranks != uniform, "the test needs EVA to move rank between layers"
    assert got.ranks == uniform and deferred.policy.lora_ranks == uniform
    # the same pretrained policy acts until EVA converges, so both read the same data and wait as long
    for cost in ("batches_used", "env_steps", "deferred_steps"):
        assert getattr(got, cost) == getattr(want, cost), cost
    assert got.deferred_steps + got.env_steps > 0, "the test needs EVA to cost something"
    assert deferred._n_updates == eva_model._n_updates
    for layer in deferred.policy.lora_layers.values():
        norms = rows(layer).norm(dim=1)
        assert not torch.allclose(norms, torch.ones_like(norms), atol=0.05), "Kaiming-uniform rows, not EVA's"


def test_a_method_with_evas_directions_needs_evas_ranks() -> None:
    with pytest.raises(eva_rl.ConfigError, match="eva_directions needs eva_ranks"):
        eva_rl.register_method(eva_rl.Method("eva-uniform", "x", runs_eva=True, eva_directions=True, eva_ranks=False))


def test_eva_own_reads_rollouts_of_its_own_whatever_the_eva_config_says() -> None:
    from eva_rl.eva_ppo import EvaPPO

    on_ppo = EvaConfig(batch_size=64, max_batches=60, on_max_batches="warn", data_source="ppo")
    own = adapted_with("eva-own", on_ppo)
    assert not isinstance(own, EvaPPO) and not own.policy.eva_pending
    report = own.policy.eva_report
    assert report.data_source == "rollouts" and report.env_steps > 0
    on_rollouts = EvaConfig(batch_size=64, max_batches=60, on_max_batches="warn", data_source="rollouts")
    eva = adapted_with("eva", on_rollouts)
    assert own.policy.lora_ranks == eva.policy.lora_ranks
    for name, layer in own.policy.lora_layers.items():
        torch.testing.assert_close(rows(layer), rows(eva.policy.lora_layers[name]), atol=0, rtol=0)


def test_a_method_pins_evas_data_only_when_it_runs_eva() -> None:
    with pytest.raises(eva_rl.ConfigError, match="eva_data='rollouts' needs runs_eva"):
        eva_rl.register_method(eva_rl.Method("lora-own", "x", eva_data="rollouts"))


def test_eva_span_is_eva_with_the_subspace_test_whatever_the_eva_config_says() -> None:
    config = {"batch_size": 64, "max_batches": 60, "on_max_batches": "warn", "data_source": "rollouts"}
    span = adapted_with("eva-span", EvaConfig(**config))
    subspace = EvaConfig(**config, convergence="subspace")
    eva = adapted_with("eva", subspace)
    plain = adapted_with("eva", EvaConfig(**config))
    assert span.policy.eva_report.batches_used == eva.policy.eva_report.batches_used
    assert span.policy.eva_report.batches_used < plain.policy.eva_report.batches_used, (
        "the test needs the tests to differ"
    )
    assert span.policy.lora_ranks == eva.policy.lora_ranks
    for name, layer in span.policy.lora_layers.items():
        torch.testing.assert_close(rows(layer), rows(eva.policy.lora_layers[name]), atol=0, rtol=0)


def test_a_method_pins_evas_convergence_test_only_when_it_runs_eva() -> None:
    with pytest.raises(eva_rl.ConfigError, match="eva_convergence='subspace' needs runs_eva"):
        eva_rl.register_method(eva_rl.Method("lora-span", "x", eva_convergence="subspace"))
    with pytest.raises(eva_rl.ConfigError, match="eva_convergence='span' needs runs_eva and one of"):
        eva_rl.register_method(eva_rl.Method("eva-x", "x", runs_eva=True, eva_convergence="span"))
