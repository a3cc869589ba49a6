"""A CnnPolicy agent trained by a user's own SB3 script on an HWC uint8 image env: fine-tuned and evaluated through the
same image pipeline SB3 trained it with (SB3 transposes channel-last frames for every env it trains on)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from stable_baselines3 import PPO
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import DummyVecEnv, VecTransposeImage

from eva_rl.experiments.cli import finetune_main
from eva_rl.experiments.environments import agent_env
from eva_rl.experiments.tasks import EvalSettings, TaskConfig
from eva_rl.loading import load_pretrained
from tests.image_envs import ColorTargetEnv

ENTRY_POINT = "tests.image_envs:ColorTargetEnv"


@pytest.fixture(scope="module")
def cnn_agent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a user's script makes: PPO's CnnPolicy on the raw HWC env, saved as a zip."""
    agent = PPO(
        "CnnPolicy",
        ColorTargetEnv(),
        n_steps=64,
        batch_size=32,
        n_epochs=1,
        seed=0,
        device="cpu",
        policy_kwargs={"features_extractor_kwargs": {"features_dim": 16}},
    )
    agent.learn(128)
    path = tmp_path_factory.mktemp("cnn") / "agent.zip"
    agent.save(path)
    return path


def test_the_evaluation_env_sees_the_frames_the_policy_was_trained_on(cnn_agent: Path) -> None:
    agent = load_pretrained(cnn_agent, device="cpu")
    task = TaskConfig(name="colours", target_env=ENTRY_POINT, eval=EvalSettings(deterministic=True))
    env = agent_env(task, agent, 2, seed=0, evaluation=True)
    assert isinstance(env, VecTransposeImage) and env.observation_space == agent.model.observation_space


def test_a_cnn_agent_on_an_hwc_image_env_fine_tunes_from_its_own_return(cnn_agent: Path, tmp_path: Path) -> None:
    argv = ["--env", ENTRY_POINT, "--pretrained", str(cnn_agent), "--methods", "eva,lora,full", "--n-envs", "2"]
    argv += ["--total-timesteps", "256", "--eval-freq", "128", "--eval-episodes", "4", "--eva-batch-size", "64"]
    assert finetune_main([*argv, "--no-progress", "--workers", "1", "--log-dir", str(tmp_path)]) == 0
    # SB3's own evaluation of the agent, on the env SB3 wraps the way it trained it
    model = PPO.load(cnn_agent, device="cpu")
    venv = VecTransposeImage(DummyVecEnv([ColorTargetEnv] * 4))
    venv.seed(10_000)
    expected, _ = evaluate_policy(model, venv, n_eval_episodes=4, deterministic=True)
    for method in ("eva", "lora", "full"):
        result = json.loads(
            (tmp_path / "tests.image_envs-ColorTargetEnv" / method / "seed0" / "result.json").read_text()
        )
        assert result["jumpstart"] == pytest.approx(expected), method


def test_without_a_task_file_a_run_takes_the_agents_own_number_of_envs(cnn_agent: Path) -> None:
    from eva_rl.experiments.cli import COMMANDS, resolve_task

    parser = COMMANDS["finetune"].parser()
    assert resolve_task(parser.parse_args(["--env", ENTRY_POINT, "--pretrained", str(cnn_agent)])).n_envs == 1
    given = parser.parse_args(["--env", ENTRY_POINT, "--pretrained", str(cnn_agent), "--n-envs", "3"])
    assert resolve_task(given).n_envs == 3
