"""``eval_mode``: the policy switched to eval mode once for a block of ``predict`` calls, not at every call."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from stable_baselines3 import PPO, SAC

from eva_rl.experiments.training import eval_mode


def _count_switches(model, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record every ``set_training_mode(mode)`` call that reaches the policy's class."""
    switches: list[bool] = []
    policy_class = type(model.policy)
    switch = policy_class.set_training_mode

    def counting(self, mode: bool) -> None:
        switches.append(mode)
        switch(self, mode)

    monkeypatch.setattr(policy_class, "set_training_mode", counting)
    return switches


def _ppo() -> PPO:
    return PPO("MlpPolicy", "CartPole-v1", n_steps=64, seed=0)


def _sac() -> SAC:
    return SAC("MlpPolicy", "Pendulum-v1", seed=0)


@pytest.mark.parametrize("make", [_ppo, _sac])
def test_predict_in_the_block_switches_no_more(make: Callable, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make()
    observation = np.zeros(model.observation_space.shape, np.float32)
    switches = _count_switches(model, monkeypatch)
    for _ in range(20):
        model.predict(observation)
    assert switches == [False] * 20  # what SB3 does without the block
    model.policy.set_training_mode(True)
    switches.clear()
    with eval_mode(model.policy):
        assert not model.policy.training
        for _ in range(20):
            model.predict(observation)
    assert switches == [False]
    assert not model.policy.training  # as predict leaves it
    assert "set_training_mode" not in vars(model.policy)


def test_a_switch_inside_the_block_is_made_and_predict_switches_back() -> None:
    model = _ppo()
    observation = np.zeros(model.observation_space.shape, np.float32)
    model.policy.set_training_mode(False)
    with eval_mode(model.policy):
        model.policy.set_training_mode(True)
        assert model.policy.training and model.policy.mlp_extractor.training
        model.predict(observation)
        assert not model.policy.training and not model.policy.mlp_extractor.training
    assert not model.policy.training


def test_the_policy_switches_again_after_a_block_that_raised() -> None:
    model = _ppo()
    with pytest.raises(RuntimeError), eval_mode(model.policy):
        raise RuntimeError
    assert "set_training_mode" not in vars(model.policy)
    model.policy.set_training_mode(True)
    assert model.policy.training and model.policy.mlp_extractor.training
