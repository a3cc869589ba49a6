"""Adapter-only checkpoints (safetensors + JSON, no pickle) and env-free merging."""

from __future__ import annotations

import json
import os
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


def _tamper_tensors(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "adapter.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "adapter.safetensors"))


def _tamper_config(folder: Path, change) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    change(config)
    (folder / "adapter_config.json").write_text(json.dumps(config))


def _first_b(tensors: dict) -> str:
    return next(k for k in tensors if k.endswith("lora_B"))


DEFECTS = {
    "missing tensor": (lambda f: _tamper_tensors(f, lambda t: t.pop(_first_b(t))), r"missing tensors \[.*lora_B"),
    "NaN tensor": (lambda f: _tamper_tensors(f, lambda t: t[_first_b(t)].fill_(float("nan"))), r"NaN or inf in \["),
    "int tensor": (
        lambda f: _tamper_tensors(f, lambda t: t.update({_first_b(t): t[_first_b(t)].to(torch.int32)})),
        r"non-float tensors \[",
    ),
    "bool tensor": (
        lambda f: _tamper_tensors(f, lambda t: t.update({_first_b(t): t[_first_b(t)] > 0})),
        r"non-float tensors \[",
    ),
    "DoRA without magnitudes": (
        lambda f: _tamper_tensors(f, lambda t: [t.pop(k) for k in [k for k in t if k.endswith("lora_magnitude")]]),
        r"missing tensors \[.*lora_magnitude",
    ),
    "keys disagree": (lambda f: _tamper_config(f, lambda c: c["keys"].pop()), "the config lists"),
    "keys not a list": (lambda f: _tamper_config(f, lambda c: c.update(keys="all")), r"keys='all' is invalid"),
    "unknown method": (lambda f: _tamper_config(f, lambda c: c.update(method="qlora")), r"method='qlora' is invalid"),
    "other policy class": (
        lambda f: _tamper_config(f, lambda c: c.update(policy_class="LoraSACPolicy")),
        r"saved from a 'LoraSACPolicy' policy",
    ),
    "backtracking regex": (  # matched against every layer name, it would not finish in a lifetime
        lambda f: _tamper_config(f, lambda c: c["lora_config"].update(target_modules="(.*.*)*X")),
        r"target_modules='\(\.\*\.\*\)\*X' is invalid: a repetition inside a repeated group",
    ),
    "polynomial regex": (  # 14 '.*' in a row took over 90 s on one layer name
        lambda f: _tamper_config(f, lambda c: c["lora_config"].update(target_modules=".*" * 14 + "X")),
        r"is invalid: longer than 500 characters or with more than 4 repetitions",
    ),
    "huge plan rank": (  # would allocate hundreds of GB
        lambda f: _tamper_config(f, lambda c: next(iter(c["lora_plan"]["layers"].values())).update(rank=10**9)),
        r"rank=1000000000 is invalid: expected an integer in \[0, fan_in=",
    ),
    "negative plan alpha": (
        lambda f: _tamper_config(f, lambda c: next(iter(c["lora_plan"]["layers"].values())).update(alpha=-1)),
        r"alpha=-1 is invalid: expected a finite number > 0",
    ),
    "plan dropout of 2": (
        lambda f: _tamper_config(f, lambda c: c["lora_plan"].update(dropout=2)),
        r"dropout=2 is invalid: expected a number in \[0, 1\)",
    ),
    "nested 100,000 deep": (
        lambda f: (f / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000),
        "nested too deeply",
    ),
    "a FIFO for a config": (
        lambda f: [(f / "adapter_config.json").unlink(), os.mkfifo(f / "adapter_config.json")],
        "is not an eva-rl adapter: expected adapter_config.json",
    ),
    "not JSON": (lambda f: (f / "adapter_config.json").write_text("{not json"), "not JSON"),
    "damaged tensors file": (
        lambda f: (f / "adapter.safetensors").write_bytes(b"\x00" * 16),
        "cannot be read as safetensors",
    ),
}


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_a_damaged_adapter_checkpoint_is_refused_with_what_is_wrong(defect: str, tmp_path: Path) -> None:
    base, model = trained("eva+dora")
    folder = save_adapter(model, tmp_path / "adapter")
    assert (folder / "adapter.safetensors").stat().st_mode & 0o777 == 0o644
    damage, message = DEFECTS[defect]
    damage(folder)
    with pytest.raises(eva_rl.CheckpointError, match=message):
        load_adapter(base, folder, env=gym.make("CartPole-v1"))
