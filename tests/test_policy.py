"""The SB3 wrapper: adapt, step-0 equality, trainable parameters, save/load, merge, SB3 tooling."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.policies import ActorCriticPolicy

import eva_rl
from eva_rl import EvaConfig, LoraConfig, SpaceMismatchError
from eva_rl.layers import LoraLayer
from eva_rl.policies import LoraPolicyMixin
from tests.conftest import VARIANTS, DeadBranchExtractor, make_pretrained

# Pendulum's 3 observation features are fewer than round(r*rho)=4: EVA clips and warns, as it should.
pytestmark = pytest.mark.filterwarnings("ignore:EVA:UserWarning")

# EVA's own rollouts: adapt() returns the EVA-initialized adapters, to be inspected before any learning
FAST_EVA = EvaConfig(batch_size=64, max_batches=60, on_max_batches="warn", data_source="rollouts")


def sample_obs(model: PPO, n: int = 16, seed: int = 0) -> torch.Tensor | dict[str, torch.Tensor]:
    model.observation_space.seed(seed)
    samples = [model.observation_space.sample() for _ in range(n)]
    if isinstance(samples[0], dict):
        stacked = {k: np.stack([s[k] for s in samples]) for k in samples[0]}
    else:
        stacked = np.stack(samples)
    return model.policy.obs_to_tensor(stacked)[0]


def outputs(policy: ActorCriticPolicy, obs) -> tuple[torch.Tensor, torch.Tensor]:
    """Action-distribution parameters (probs, or mean and std) and values."""
    with torch.no_grad():
        dist = policy.get_distribution(obs).distribution
        params = dist.probs if hasattr(dist, "probs") else torch.cat([dist.mean, dist.stddev], -1)
        return params, policy.predict_values(obs)


def adapted(variant: str, method: str = "eva", lora: LoraConfig | None = None, **kwargs) -> tuple[PPO, PPO]:
    base = make_pretrained(variant)
    env_fn = VARIANTS[variant][0]
    model = eva_rl.adapt(base, env_fn(), method=method, lora=lora or LoraConfig(r=2), eva=FAST_EVA, **kwargs)
    return base, model


@pytest.mark.parametrize("method", ["eva", "lora"])
def test_adapted_policy_equals_pretrained_at_step_zero(variant: str, method: str) -> None:
    base, model = adapted(variant, method)
    assert isinstance(model.policy, LoraPolicyMixin)
    assert model.policy.lora_layers, "no adapter was injected"
    obs = sample_obs(base)
    base_params, base_values = outputs(base.policy, obs)
    params, values = outputs(model.policy, obs)
    assert (params - base_params).abs().max() < 1e-6
    assert (values - base_values).abs().max() < 1e-6
    if method == "eva":
        report = model.policy.eva_report
        assert report.env_steps > 0 and report.batches_used >= 2 and report.seconds > 0
        assert sum(report.ranks.values()) == 2 * len(report.ranks)
        assert model.policy.lora_ranks == {k: v for k, v in report.ranks.items() if v > 0}
        for name, layer in model.policy.lora_layers.items():
            assert layer.scaling == pytest.approx(1.0), name  # alpha adjusted with the rank: alpha / r unchanged
            rows = layer.lora_A.detach().reshape(layer.r, -1)
            torch.testing.assert_close(rows @ rows.T, torch.eye(layer.r), atol=1e-4, rtol=0)
    else:
        assert model.policy.eva_report is None


def test_cnn_policy_gets_eva_on_its_convolutions() -> None:
    _, model = adapted("cnn-discrete")
    ranks = model.policy.eva_report.ranks
    assert any(name.startswith("features_extractor.cnn.") and rank > 0 for name, rank in ranks.items()), ranks
    conv = model.policy.features_extractor.cnn[0]
    assert isinstance(conv, eva_rl.LoraConv2d)


def test_a_layer_eva_gives_rank_zero_keeps_no_adapter_and_round_trips(tmp_path: Path) -> None:
    base = PPO(
        "MlpPolicy",
        "CartPole-v1",
        n_steps=32,
        batch_size=32,
        seed=0,
        device="cpu",
        policy_kwargs={"features_extractor_class": DeadBranchExtractor},
    )
    model = eva_rl.adapt(base, gym.make("CartPole-v1"), lora=LoraConfig(r=2), eva=FAST_EVA)
    ranks = model.policy.eva_report.ranks
    assert ranks["features_extractor.dead"] == 0
    assert sum(ranks.values()) == 2 * len(ranks)
    assert isinstance(model.policy.features_extractor.dead, torch.nn.Linear)
    assert not isinstance(model.policy.features_extractor.dead, LoraLayer)
    assert "features_extractor.dead" not in model.policy.lora_ranks
    model.learn(32)
    model.save(tmp_path / "rank0.zip")
    reloaded = PPO.load(tmp_path / "rank0.zip", device="cpu")
    assert reloaded.policy.lora_ranks == model.policy.lora_ranks
    obs = sample_obs(model)
    for got, want in zip(outputs(reloaded.policy, obs), outputs(model.policy, obs)):
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("lora", "eva", "message"),
    [
        (LoraConfig(r=4), EvaConfig(rho=2.0, batch_size=5), r"EvaConfig.batch_size=5 is below the 8 components"),
        (LoraConfig(target_modules=["attention"]), EvaConfig(), r"'attention' matches no Linear/Conv2d layer"),
    ],
)
def test_adapt_rejects_bad_configs_up_front(lora: LoraConfig, eva: EvaConfig, message: str) -> None:
    base = make_pretrained("mlp-discrete")
    with pytest.raises(ValueError, match=message):
        eva_rl.adapt(base, gym.make("CartPole-v1"), method="eva", lora=lora, eva=eva)


def trainable_names(policy: torch.nn.Module) -> set[str]:
    return {name for name, p in policy.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("lora", "expected_extra"),
    [
        (LoraConfig(r=2), set()),
        (
            LoraConfig(r=2, train_heads=True),
            {"action_net.weight", "action_net.bias", "value_net.weight", "value_net.bias"},
        ),
        (LoraConfig(r=2, train_bias=True), {"bias"}),
    ],
)
def test_only_adapters_and_configured_parameters_train(lora: LoraConfig, expected_extra: set[str]) -> None:
    base, model = adapted("mlp-box", method="lora", lora=lora, n_steps=32, batch_size=32, n_epochs=2)
    policy = model.policy
    trainable = trainable_names(policy)
    adapters = {n for n in trainable if n.rpartition(".")[2].startswith("lora_")}
    others = trainable - adapters
    if expected_extra == {"bias"}:
        assert others - {"log_std"} == {n for n, _ in policy.named_parameters() if n.endswith("bias")}
    else:
        assert others == {"log_std"} | expected_extra
    assert adapters
    optimized = {id(p) for group in policy.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in policy.parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    model.learn(64)
    after = dict(policy.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())
    assert any(not torch.equal(after[n], before[n]) for n in adapters if "lora_B" in n)


SUBPROCESS_CHECK = r"""
import json, sys
import numpy as np
from stable_baselines3 import PPO
model = PPO.load(sys.argv[1], device="cpu")
obs = np.load(sys.argv[2], allow_pickle=True).item()
obs = obs["obs"] if "obs" in obs else obs
actions, _ = model.predict(obs, deterministic=True)
print(json.dumps({"actions": np.asarray(actions).tolist(),
                  "ranks": {n: m.r for n, m in model.policy.named_modules() if hasattr(m, "lora_A")},
                  "policy": type(model.policy).__name__,
                  "report": model.policy.eva_report.to_dict() if getattr(model.policy, "eva_report", None) else None}))
"""


def load_in_subprocess(path: Path, obs, tmp_path: Path) -> dict:
    obs_file = tmp_path / "obs.npy"
    np.save(obs_file, {"obs": obs}, allow_pickle=True)
    done = subprocess.run(
        [sys.executable, "-c", SUBPROCESS_CHECK, str(path), str(obs_file)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def numpy_obs(model: PPO, n: int = 8):
    model.observation_space.seed(1)
    samples = [model.observation_space.sample() for _ in range(n)]
    if isinstance(samples[0], dict):
        return {k: np.stack([s[k] for s in samples]) for k in samples[0]}
    return np.stack(samples)


@pytest.mark.parametrize("variant_name", ["mlp-discrete", "cnn-discrete", "dict-discrete"])
def test_save_then_plain_load_in_a_fresh_process(variant_name: str, tmp_path: Path) -> None:
    _, model = adapted(variant_name, n_steps=32, batch_size=32, n_epochs=1)
    model.learn(64)  # non-zero B, so identical actions mean the adapters really were restored
    path = tmp_path / "adapted.zip"
    model.save(path)
    obs = numpy_obs(model)
    expected, _ = model.predict(obs, deterministic=True)
    loaded = load_in_subprocess(path, obs, tmp_path)
    assert loaded["actions"] == np.asarray(expected).tolist()
    assert loaded["ranks"] == model.policy.lora_ranks
    assert loaded["report"]["ranks"] == model.policy.eva_report.ranks
    reloaded = PPO.load(path, device="cpu")
    assert all(
        torch.equal(a, b) for a, b in zip(reloaded.policy.state_dict().values(), model.policy.state_dict().values())
    )
    reloaded.set_env(make_vec_env(VARIANTS[variant_name][0], n_envs=1))
    reloaded.learn(32)  # the restored optimizer state fits the trainable parameters


@pytest.mark.parametrize("variant_name", ["mlp-box", "cnn-discrete"])
def test_merge_equals_the_adapted_model(variant_name: str, tmp_path: Path) -> None:
    _, model = adapted(variant_name, n_steps=32, batch_size=32, n_epochs=1)
    model.learn(32)  # a trained policy holds cached distributions; merge must not need to copy it
    with torch.no_grad():
        for layer in model.policy.lora_layers.values():
            layer.lora_B.normal_(std=0.1)
    merged = eva_rl.merge(model)
    assert type(merged.policy).__module__ == ActorCriticPolicy.__module__  # SB3's own class
    assert not any(isinstance(m, LoraLayer) for m in merged.policy.modules())
    obs = sample_obs(model)
    for got, want in zip(outputs(merged.policy, obs), outputs(model.policy, obs)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    path = tmp_path / "merged.zip"
    merged.save(path)
    loaded = load_in_subprocess(path, numpy_obs(model), tmp_path)
    assert loaded["ranks"] == {} and loaded["policy"] in ("ActorCriticPolicy", "ActorCriticCnnPolicy")


def test_evaluate_policy_callbacks_and_vecenvs_work() -> None:
    base = make_pretrained("mlp-discrete")
    vec_env = make_vec_env("CartPole-v1", n_envs=3, seed=0)
    model = eva_rl.adapt(base, vec_env, lora=LoraConfig(r=2), eva=FAST_EVA, n_steps=32, batch_size=48)

    class CountCalls(BaseCallback):
        calls = 0

        def _on_step(self) -> bool:
            CountCalls.calls += 1
            return True

    model.learn(96, callback=CountCalls())
    assert CountCalls.calls == 96 // 3
    mean, std = evaluate_policy(model, vec_env, n_eval_episodes=3, deterministic=False)
    assert np.isfinite(mean) and mean > 0


def test_space_mismatch_shows_both_spaces() -> None:
    base = make_pretrained("mlp-discrete")
    with pytest.raises(
        SpaceMismatchError,
        match=r"observation space does not match.*pretrained agent: Box.*\(4,\).*; target env: Box.*\(3,\)",
    ):
        eva_rl.adapt(base, gym.make("Pendulum-v1"))


def test_bad_method_and_double_adaptation_are_refused() -> None:
    base, model = adapted("mlp-discrete", method="lora")
    with pytest.raises(ValueError, match="method='qlora' is invalid: expected one of \\('eva', 'lora', 'pissa'"):
        eva_rl.adapt(base, gym.make("CartPole-v1"), method="qlora")
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        eva_rl.adapt(model, gym.make("CartPole-v1"))


def test_hyperparameters_are_inherited_unless_overridden() -> None:
    base = make_pretrained("mlp-discrete")
    model = eva_rl.adapt(base, gym.make("CartPole-v1"), method="lora", learning_rate=1e-3)
    assert model.n_steps == base.n_steps and model.batch_size == base.batch_size and model.gamma == base.gamma
    assert model.learning_rate == 1e-3
    assert model.policy.optimizer.param_groups[0]["lr"] == 1e-3
