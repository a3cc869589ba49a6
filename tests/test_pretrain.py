"""scripts/pretrain.py's library side: an agent trained inside VecNormalize is written with its statistics."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from stable_baselines3.common.vec_env import VecNormalize

import envs  # noqa: F401  (registers PointGoal)
from eva_rl.experiments.environments import env_factory, make_vec
from eva_rl.experiments.pretrain import model_card_markdown, pretrain
from eva_rl.experiments.tasks import find_task
from eva_rl.experiments.training import evaluate
from eva_rl.loading import load_pretrained


@pytest.mark.parametrize("normalize", [True, False])
def test_pretrain_writes_the_statistics_it_trained_with_and_evaluates_through_them(
    tmp_path: Path, normalize: bool
) -> None:
    task = find_task("PointGoal").with_overrides(dict(pretrain_timesteps=1024, pretrain_normalize=normalize))
    card = pretrain(task, tmp_path, eval_episodes=8, device="cpu", progress=False)
    stats = tmp_path / "vecnormalize.pkl"
    assert stats.is_file() == normalize and card["vec_normalize"] == ("vecnormalize.pkl" if normalize else None)
    assert json.loads((tmp_path / "card.json").read_text()) == card
    agent = load_pretrained(tmp_path, device="cpu")
    assert agent.vec_normalize == (stats if normalize else None)
    if not normalize:
        return
    with open(stats, "rb") as handle:
        saved = pickle.load(handle)
    # the statistics of the 1,024 training steps (8 envs), not fresh ones
    assert isinstance(saved, VecNormalize) and saved.obs_rms.count > 1000
    assert saved.gamma == task.ppo["gamma"]
    assert "Trained inside `VecNormalize`" in model_card_markdown(card)
    # the card's return is the one seen through the frozen statistics, with raw (unnormalized) rewards
    factory = env_factory(task.source_env, task.wrappers, task.env_kwargs)
    env = agent.wrap_vec_env(make_vec(factory, task.eval.env_count, task.eval.seed), norm_reward=False)
    mean, std, _ = evaluate(agent.model, env, 8, task.eval.seed, task.eval.deterministic)
    assert (mean, std) == (card["eval_return"], card["eval_return_std"])
    raw = make_vec(factory, task.eval.env_count, task.eval.seed)
    assert not np.isclose(evaluate(agent.model, raw, 8, task.eval.seed, task.eval.deterministic)[0], mean)


def test_the_bundled_zip_carries_an_empty_optimizer_and_its_parameter_count(tmp_path: Path) -> None:
    task = find_task("PointGoal").with_overrides(dict(pretrain_timesteps=1024))
    card = pretrain(task, tmp_path, eval_episodes=2, device="cpu", progress=False)
    agent = load_pretrained(tmp_path, device="cpu")  # SB3 loads it strictly: the optimizer entry is there
    optimizer = agent.model.policy.optimizer
    assert len(optimizer.state) == 0 and optimizer.param_groups[0]["lr"] == task.ppo["learning_rate"]
    assert card["parameters"] == sum(p.numel() for p in agent.model.policy.parameters()) > 0
    assert f"{card['parameters']:,} parameters" in model_card_markdown(card)


def test_the_agent_is_written_to_the_folder_the_task_names(tmp_path: Path) -> None:
    from eva_rl.experiments.pretrain import agent_folder

    task = find_task("PointGoal")
    assert agent_folder(task) == task.agent_path.parent
    assert agent_folder(task.with_overrides({"agent": str(tmp_path / "big" / "model.zip")})) == tmp_path / "big"
