"""Pretraining by behaviour cloning (eva_rl/experiments/cloning.py): demonstrations, the fit, the written agent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from stable_baselines3 import PPO

from eva_rl.errors import ConfigError
from eva_rl.experiments.cloning import clone, collect_demonstrations, discounted_returns
from eva_rl.experiments.pretrain import model_card_markdown, pretrain
from eva_rl.experiments.tasks import CloningSettings, TaskConfig
from eva_rl.loading import load_pretrained


class PendulumExpert:
    """A PD controller toward upright: torque from the angle (cos, sin) and the angular velocity."""

    def get_action(self, observation: np.ndarray) -> np.ndarray:
        cos, sin, velocity = observation
        return np.array([-10.0 * np.arctan2(sin, cos) - 1.0 * velocity], dtype=np.float32)


def pendulum_expert(env_id: str) -> PendulumExpert:
    return PendulumExpert()


EXPERT = f"{__name__}:pendulum_expert"


def test_discounted_returns_match_the_sum_they_define() -> None:
    rewards, gamma = [1.0, -2.0, 0.5, 3.0], 0.9
    expected = [sum(gamma**k * r for k, r in enumerate(rewards[t:])) for t in range(len(rewards))]
    np.testing.assert_allclose(discounted_returns(rewards, gamma), expected, rtol=1e-6)


def test_demonstrations_record_the_experts_actions_not_the_noisy_ones() -> None:
    settings = CloningSettings(envs=["Pendulum-v1"], expert=EXPERT, episodes=2, action_noise=0.5)
    demonstrations = collect_demonstrations(settings, gamma=0.99, seed=0, progress=False)
    assert len(demonstrations) == 400 and demonstrations.observations.shape == (400, 3)
    expert = PendulumExpert()
    recorded = np.stack([np.clip(expert.get_action(o), -2.0, 2.0) for o in demonstrations.observations])
    np.testing.assert_allclose(demonstrations.actions, recorded, rtol=1e-6)
    assert demonstrations.expert_success == {"Pendulum-v1": None}  # Pendulum reports no success
    again = collect_demonstrations(settings, gamma=0.99, seed=0, progress=False)
    np.testing.assert_array_equal(again.observations, demonstrations.observations)


def test_cloning_fits_the_actor_to_the_expert_and_the_value_head_to_the_returns() -> None:
    settings = CloningSettings(envs=["Pendulum-v1"], expert=EXPERT, episodes=4, epochs=30, batch_size=64)
    demonstrations = collect_demonstrations(settings, gamma=0.9, seed=0, progress=False)
    model = PPO("MlpPolicy", "Pendulum-v1", seed=0, device="cpu", policy_kwargs={"net_arch": [64, 64]})
    observations = demonstrations.observations

    def action_error() -> float:
        predicted = model.policy.predict(observations, deterministic=True)[0]
        return float(np.mean((predicted - demonstrations.actions) ** 2))

    def value_error() -> float:
        values = model.policy.predict_values(model.policy.obs_to_tensor(observations)[0]).detach().numpy().ravel()
        return float(np.sqrt(np.mean((values - demonstrations.returns) ** 2)))

    before_action, before_value = action_error(), value_error()
    fit = clone(model, demonstrations, settings, seed=0, progress=False)
    assert action_error() < 0.25 * before_action
    assert value_error() < 0.5 * before_value and fit["value_rmse"] < 0.5 * before_value
    assert np.isfinite(fit["log_likelihood"])


def test_pretrain_clones_writes_the_card_and_an_agent_that_loads(tmp_path: Path) -> None:
    task = TaskConfig(
        name="PendulumClone",
        target_env="Pendulum-v1",
        n_envs=1,
        policy_kwargs={"net_arch": [32]},
        ppo={"n_steps": 64, "batch_size": 64},
        pretrain_cloning={"envs": ["Pendulum-v1"], "expert": EXPERT, "episodes": 1, "epochs": 1},
        eval={"episodes": 2, "n_envs": 1},
    )
    card = pretrain(task, tmp_path, device="cpu", progress=False)
    assert card["cloning"]["transitions"] == 200 and card["cloning"]["success"] == {"Pendulum-v1": None}
    assert card["eval_episodes"] == 2 and "timesteps" not in card
    assert json.loads((tmp_path / "card.json").read_text()) == card
    markdown = model_card_markdown(card)
    assert markdown.startswith("# PendulumClone source agent") and "Cloned from" in markdown
    assert load_pretrained(tmp_path, device="cpu").model.observation_space.shape == (3,)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"envs": [], "expert": EXPERT}, "pretrain_cloning.envs=\\[\\] is invalid"),
        ({"envs": ["Pendulum-v1"], "expert": "no_colon"}, "expected 'module:function'"),
        ({"envs": ["Pendulum-v1"], "expert": EXPERT, "episodes": 0}, "pretrain_cloning.episodes=0 is invalid"),
        ({"envs": ["Pendulum-v1"], "expert": EXPERT, "action_noise": -1}, "action_noise=-1 is invalid"),
        ({"envs": ["Pendulum-v1", "Pendulum-v1"], "expert": EXPERT}, "listed twice"),
    ],
)
def test_bad_cloning_settings_are_one_error_naming_the_value(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TaskConfig(name="t", target_env="Pendulum-v1", pretrain_cloning=settings)


def test_discrete_actions_are_refused_by_name() -> None:
    settings = CloningSettings(envs=["CartPole-v1"], expert=EXPERT, episodes=1)
    with pytest.raises(ConfigError, match="needs continuous \\(Box\\) actions; 'CartPole-v1' has Discrete"):
        collect_demonstrations(settings, gamma=0.99, seed=0, progress=False)
