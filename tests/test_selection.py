"""Picking a bank's adapter for an unlabelled env by the subspaces of the base policy's layer inputs."""

from __future__ import annotations

from contextlib import closing

import numpy as np
import pytest
import torch

import eva_rl
from eva_rl import LoraConfig
from eva_rl.bank import AdapterBank
from eva_rl.errors import ConfigError
from eva_rl.experiments.environments import env_factory, make_vec
from eva_rl.experiments.tasks import find_task
from eva_rl.loading import load_agent
from eva_rl.selection import captured_energy, select_task, subspace_signature


def _subspace(seed: int, k: int = 3, d: int = 20) -> torch.Tensor:
    basis, _ = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed)))
    return basis.T  # (k, d), orthonormal rows


def test_signature_is_the_top_right_singular_subspace_of_the_stacked_inputs() -> None:
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(200, 12)) * np.linspace(3, 0.1, 12)
    signature = subspace_signature({"layer": torch.as_tensor(rows, dtype=torch.float32)}, k=4)["layer"]
    _, _, vh = np.linalg.svd(rows, full_matrices=False)  # the oracle, in float64
    # the same subspace (singular vectors are defined up to sign): equal projection matrices
    np.testing.assert_allclose(signature.T.numpy() @ signature.numpy(), vh[:4].T @ vh[:4], atol=1e-5)
    assert signature.shape == (4, 12)


def test_inputs_are_matched_to_the_subspace_they_come_from() -> None:
    generator = torch.Generator().manual_seed(1)
    signatures = {f"task{i}": {"a": _subspace(i), "b": _subspace(10 + i)} for i in range(3)}
    for truth in range(3):
        coefficients = torch.randn(64, 3, generator=generator)
        activations = {
            "a": coefficients @ _subspace(truth) + 0.01 * torch.randn(64, 20, generator=generator),
            "b": coefficients @ _subspace(10 + truth),
        }
        picked, scores = select_task(activations, signatures)
        assert picked == f"task{truth}"
        assert scores[picked] > 0.99 and all(0 <= s < 0.6 for t, s in scores.items() if t != picked)
    inside = {"a": torch.randn(8, 3, generator=generator) @ _subspace(0)}
    assert captured_energy(inside, {"a": _subspace(0)}) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="share no layer"):
        captured_energy(inside, {"other": _subspace(0)})
    with pytest.raises(ConfigError, match="no task has a signature"):
        select_task(inside, {})


@pytest.mark.filterwarnings("ignore:EVA:UserWarning")
def test_a_bank_identifies_minigrid_envs_it_has_signatures_for() -> None:
    task = find_task("MiniGrid-DoorKey")
    envs = {"empty": "MiniGrid-Empty-5x5-v0", "lava": "MiniGrid-LavaGapS5-v0", "doorkey": "MiniGrid-DoorKey-5x5-v0"}

    def vec(env_id: str, seed: int):
        return make_vec(env_factory(env_id, task.wrappers), 4, seed)

    base = load_agent(task.agent_path, device="cpu")
    bank = AdapterBank(load_agent(task.agent_path, device="cpu"), task.agent_path)
    for name, env_id in envs.items():
        with closing(vec(env_id, 0)) as env:
            bank.add(name, eva_rl.adapt(base, env, method="lora", lora=LoraConfig(r=2)))
            bank.set_signature(name, env, steps=512, seed=0)
    bank.activate("lava")
    for name, env_id in envs.items():
        with closing(vec(env_id, 7)) as env:  # other episodes than the signatures'
            picked, scores = bank.identify(env, steps=128, seed=7)
        assert picked == name, scores
    assert bank.active == "lava"  # identify acts with the base policy and puts the active task back
