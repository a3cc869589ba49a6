"""Agents from elsewhere: the algorithm read from the zip, rl-zoo3 and Hub folders with their VecNormalize
statistics, and the jumpstart rl-zoo3's own evaluation reports."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import gymnasium as gym
import pytest
from stable_baselines3 import A2C, DQN, PPO, SAC, TD3
from stable_baselines3.common.vec_env import VecNormalize

from eva_rl import AgentError
from eva_rl.experiments.finetune import pretrained_return
from eva_rl.experiments.tasks import EvalSettings, TaskConfig
from eva_rl.loading import detect_algorithm, load_pretrained, read_zoo_yaml

ZOO = Path(__file__).resolve().parent / "fixtures" / "zoo"
RUN = ZOO / "ppo" / "Pendulum-v1_1"  # written by rl_zoo3.train, see Pendulum-v1/command.txt


@pytest.mark.parametrize(
    ("algorithm", "env_id"),
    [(PPO, "CartPole-v1"), (A2C, "CartPole-v1"), (SAC, "Pendulum-v1"), (TD3, "Pendulum-v1"), (DQN, "CartPole-v1")],
)
def test_the_algorithm_is_read_from_the_zip(algorithm: type, env_id: str, tmp_path: Path) -> None:
    kwargs = {"learning_starts": 0, "buffer_size": 100} if algorithm in (SAC, TD3, DQN) else {}
    algorithm("MlpPolicy", env_id, device="cpu", **kwargs).save(tmp_path / "agent.zip")
    assert detect_algorithm(tmp_path / "agent.zip") == algorithm.__name__.lower()


def test_unsupported_and_broken_zips_are_named(tmp_path: Path) -> None:
    from stable_baselines3 import DDPG

    DDPG("MlpPolicy", "Pendulum-v1", buffer_size=100, device="cpu").save(tmp_path / "ddpg.zip")
    with pytest.raises(AgentError, match="saved by DDPG, which eva-rl does not support"):
        detect_algorithm(tmp_path / "ddpg.zip")
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(AgentError, match="is not an SB3 zip"):
        load_pretrained(tmp_path / "broken.zip")


def test_an_rl_zoo3_run_folder_brings_its_statistics_and_env() -> None:
    agent = load_pretrained(RUN, device="cpu")
    assert (agent.algorithm, agent.layout, agent.env_id) == ("ppo", "rl-zoo3", "Pendulum-v1")
    assert agent.path == RUN / "Pendulum-v1.zip"
    assert agent.vec_normalize == RUN / "Pendulum-v1" / "vecnormalize.pkl"
    env = agent.wrap_vec_env(PPO("MlpPolicy", "Pendulum-v1").get_env())
    assert isinstance(env, VecNormalize) and not env.training
    same = load_pretrained(RUN / "Pendulum-v1.zip", device="cpu")  # the zip inside the folder finds it too
    assert same.vec_normalize == agent.vec_normalize and same.layout == "rl-zoo3"


def test_a_hub_folder_brings_its_statistics(tmp_path: Path) -> None:
    hub = tmp_path / "ppo-Pendulum-v1"
    hub.mkdir()
    shutil.copy(RUN / "Pendulum-v1.zip", hub / "ppo-Pendulum-v1.zip")
    shutil.copy(RUN / "Pendulum-v1" / "config.yml", hub / "config.yml")
    shutil.copy(RUN / "Pendulum-v1" / "vecnormalize.pkl", hub / "vec_normalize.pkl")
    agent = load_pretrained(hub, device="cpu")
    assert (agent.layout, agent.vec_normalize) == ("hub", hub / "vec_normalize.pkl")
    # rl_zoo3.push_to_hub also writes the evaluations as a zip beside the agent's: not a second model
    with zipfile.ZipFile(hub / "train_eval_metrics.zip", "w") as metrics:
        metrics.writestr("evaluations.npz", b"")
    assert load_pretrained(hub, device="cpu").path == hub / "ppo-Pendulum-v1.zip"
    shutil.copy(hub / "ppo-Pendulum-v1.zip", hub / "ppo-Pendulum-v1-best.zip")
    with pytest.raises(AgentError, match=r"holds several zips \['ppo-Pendulum-v1-best.zip', 'ppo-Pendulum-v1.zip'\]"):
        load_pretrained(hub, device="cpu")
    (hub / "ppo-Pendulum-v1-best.zip").unlink()
    (hub / "vec_normalize.pkl").unlink()
    with pytest.raises(AgentError, match="trained with normalize=True but has no vecnormalize.pkl or vec_normalize"):
        load_pretrained(hub, device="cpu")


def test_zoo_yaml_is_read_without_running_code(tmp_path: Path) -> None:
    assert read_zoo_yaml(RUN / "Pendulum-v1" / "config.yml")["normalize"] is True
    marker = tmp_path / "ran"
    evil = tmp_path / "config.yml"
    evil.write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(AgentError, match="not an rl-zoo3 YAML file"):
        read_zoo_yaml(evil)
    assert not marker.exists()


@pytest.mark.parametrize("algo", ["ppo", "sac"])
def test_the_statistics_matter(algo: str) -> None:
    """The same policy on raw observations does far worse than with its VecNormalize statistics (the agreement with
    ``rl_zoo3.enjoy`` itself is in ``tests/test_clients.py``)."""
    from stable_baselines3.common.evaluation import evaluate_policy

    task = TaskConfig(name="p", target_env="Pendulum-v1", eval=EvalSettings(episodes=5, deterministic=True))
    normalized = pretrained_return(task, ZOO / algo / "Pendulum-v1_1", device="cpu")
    raw = load_pretrained(ZOO / algo / "Pendulum-v1_1" / "Pendulum-v1.zip", device="cpu")
    raw_mean, _ = evaluate_policy(raw.model, gym.make("Pendulum-v1"), n_eval_episodes=5, deterministic=True)
    assert normalized > -300 and raw_mean < normalized - 300, (normalized, raw_mean)


def test_recorded_wrappers_frame_stack_and_env_kwargs_build_the_agents_env(tmp_path: Path) -> None:
    """rl-zoo3's ``env_wrapper`` (with kwargs), ``vec_env_wrapper``, ``frame_stack`` and ``env_kwargs`` from the folder
    shape the env."""
    from stable_baselines3.common.vec_env import VecFrameStack

    from eva_rl.experiments.environments import agent_env

    run = tmp_path / "ppo" / "Pendulum-v1_1"
    shutil.copytree(RUN, run)
    config = (run / "Pendulum-v1" / "config.yml").read_text()
    config = config.replace("  - - normalize\n", "  - - env_wrapper\n    - gymnasium.wrappers.TimeLimit:\n"
                            "        max_episode_steps: 50\n  - - frame_stack\n    - 2\n"
                            "  - - vec_env_wrapper\n    - stable_baselines3.common.vec_env.VecMonitor\n"
                            "  - - normalize\n")  # fmt: skip
    (run / "Pendulum-v1" / "config.yml").write_text(config)
    args = (run / "Pendulum-v1" / "args.yml").read_text()
    (run / "Pendulum-v1" / "args.yml").write_text(
        args.replace("- - env_kwargs\n    - null", "- - env_kwargs\n    - g: 12.0")
    )
    agent = load_pretrained(run, device="cpu")
    assert agent.frame_stack == 2 and agent.env_kwargs == {"g": 12.0}
    assert agent.env_wrappers == [{"gymnasium.wrappers.TimeLimit": {"max_episode_steps": 50}}]
    env = agent_env(TaskConfig(name="t", target_env="Pendulum-v1"), agent, 2, 0, evaluation=True)
    assert isinstance(env, VecFrameStack) and env.observation_space.shape == (6,)
    assert env.get_attr("g") == [12.0, 12.0] and env.get_attr("_max_episode_steps") == [50, 50]
    # rl-zoo3's order: the vec_env_wrapper inside the statistics, the frame stack outside
    assert type(env.venv).__name__ == "VecNormalize" and type(env.venv.venv).__name__ == "VecMonitor"
    env.close()


def test_episodes_a_wrapper_ends_are_reported_though_the_monitor_sits_below_it() -> None:
    """The Monitor sits below the wrappers, as rl-zoo3 puts it; an episode a ``TimeLimit`` wrapper ends is still
    reported (SB3's ``evaluate_policy`` counts only reported ones, and would never finish)."""
    from eva_rl.experiments.environments import env_factory, make_vec

    limit = {"gymnasium.wrappers.TimeLimit": {"max_episode_steps": 50}}
    env = make_vec(env_factory("Pendulum-v1", [limit]), 2, 0)
    env.reset()
    episodes = []
    for _ in range(120):
        *_, infos = env.step([env.action_space.sample()] * 2)
        episodes += [info["episode"]["l"] for info in infos if "episode" in info]
    assert episodes == [50] * 4
    env.close()


def test_damaged_statistics_are_an_agent_error(tmp_path: Path) -> None:
    run = tmp_path / "ppo" / "Pendulum-v1_1"
    shutil.copytree(RUN, run)
    stats = run / "Pendulum-v1" / "vecnormalize.pkl"
    stats.write_bytes(stats.read_bytes()[:300])  # a truncated pickle
    agent = load_pretrained(run, device="cpu")
    with pytest.raises(AgentError, match=r"cannot be loaded for this env \(UnpicklingError"):
        agent.wrap_vec_env(PPO("MlpPolicy", "Pendulum-v1").get_env())
