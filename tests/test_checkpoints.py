"""Adapter-only checkpoints (safetensors + JSON, no pickle) and env-free merging."""

from __future__ import annotations

import pickle
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import PPO

import eva_rl
from eva_rl import EvaConfig, LoraConfig
from eva_rl.checkpoints import load_adapter, save_adapter
from tests.conftest import make_pretrained

pytestmark = pytest.mark.filterwarnings("ignore:EVA:UserWarning", "ignore:(pissa|olora):UserWarning")


def trained(method: str) -> tuple[PPO, PPO]:
    base = make_pretrained("mlp-discrete")
    model = eva_rl.adapt(
        base,
        gym.make("CartPole-v1"),
        method=method,
        lora=LoraConfig(r=2),
        eva=EvaConfig(batch_size=64),
        n_steps=32,
        batch_size=32,
    )
    model.learn(64)
    return base, model


@pytest.mark.parametrize("method", ["eva", "pissa", "eva+dora", "head"])
def test_round_trip_gives_identical_actions_without_pickle(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, model = trained(method)
    folder = save_adapter(model, tmp_path / "adapter", method=method)

    def refuse(*args, **kwargs):
        raise AssertionError("loading an adapter must not unpickle anything")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    rebuilt = load_adapter(base, folder, env=gym.make("CartPole-v1"))
    monkeypatch.undo()
    obs = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    np.testing.assert_array_equal(
        rebuilt.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0]
    )
    for key, value in model.policy.state_dict().items():
        assert torch.equal(rebuilt.policy.state_dict()[key], value), key
    assert rebuilt.policy.lora_ranks == model.policy.lora_ranks


def test_adapter_is_a_small_fraction_of_the_full_zip(tmp_path: Path) -> None:
    _, model = trained("eva")
    model.save(tmp_path / "full.zip")
    folder = save_adapter(model, tmp_path / "adapter", method="eva")
    ratio = (folder / "adapter.safetensors").stat().st_size / (tmp_path / "full.zip").stat().st_size
    assert ratio < 0.2, ratio


def test_a_foreign_folder_and_a_mismatched_agent_are_clear_errors(tmp_path: Path) -> None:
    base, model = trained("lora")
    with pytest.raises(ValueError, match="is not an eva-rl adapter"):
        load_adapter(base, tmp_path)
    folder = save_adapter(model, tmp_path / "adapter")
    other = PPO("MlpPolicy", "CartPole-v1", policy_kwargs={"net_arch": [32]}, device="cpu")
    with pytest.raises(ValueError, match="does not fit this agent"):
        load_adapter(other, folder)


def test_merge_needs_no_environment(tmp_path: Path) -> None:
    _, model = trained("dora")
    model.save(tmp_path / "adapted.zip")
    loaded = PPO.load(tmp_path / "adapted.zip", device="cpu")
    assert loaded.get_env() is None
    merged = eva_rl.merge(loaded)
    obs = np.random.default_rng(1).normal(size=(32, 4)).astype(np.float32)
    np.testing.assert_array_equal(
        merged.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0]
    )
    assert type(merged.policy).__module__.startswith("stable_baselines3")
