"""The algorithm recorded in the zip decides how an agent is fine-tuned; agents trained with VecNormalize are
fine-tuned, evaluated and saved with their statistics."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.vec_env import VecNormalize

import eva_rl
from eva_rl.experiments.cli import finetune_main
from eva_rl.loading import load_agent, load_pretrained

pytestmark = pytest.mark.filterwarnings("ignore:(EVA|eva|lora):UserWarning")

ZOO_RUN = Path(__file__).resolve().parent / "fixtures" / "zoo" / "ppo" / "Pendulum-v1_1"
TINY = ["--eval-episodes", "4", "--no-progress", "--eva-batch-size", "64"]


@pytest.fixture(scope="module")
def a2c_agent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("a2c") / "a2c.zip"
    A2C("MlpPolicy", "CartPole-v1", seed=0, device="cpu").learn(500).save(path)
    return path


def run(argv: list[str], log_dir: Path) -> int:
    return finetune_main([*argv, *TINY, "--log-dir", str(log_dir)])


def result(log_dir: Path, method: str, task: str = "CartPole-v1") -> dict:
    return json.loads((log_dir / task / method / "seed0" / "result.json").read_text())


def test_an_a2c_agent_is_fine_tuned_with_a2c(a2c_agent: Path, tmp_path: Path) -> None:
    argv = ["--env", "CartPole-v1", "--pretrained", str(a2c_agent), "--methods", "eva,full"]
    assert run([*argv, "--total-timesteps", "200", "--eval-freq", "100"], tmp_path) == 0
    for method in ("eva", "full"):
        assert result(tmp_path, method)["algorithm"] == "a2c"
        model = load_agent(tmp_path / "CartPole-v1" / method / "seed0" / "model.zip", device="cpu")
        assert isinstance(model, A2C) and model.n_steps == 5  # A2C's own rollout, not PPO's
        assert isinstance(model.policy.optimizer, torch.optim.RMSprop)


def test_algo_overrides_where_the_policies_allow_it(a2c_agent: Path, tmp_path: Path, capsys) -> None:
    argv = ["--env", "CartPole-v1", "--pretrained", str(a2c_agent), "--methods", "lora", "--algo", "ppo"]
    assert run([*argv, "--total-timesteps", "256", "--eval-freq", "128"], tmp_path) == 2
    # PPO's own n_steps, with the agent's one env (it was trained with one; no task file says otherwise)
    assert "total_timesteps=256 is below one rollout of PPO (2048 steps: n_steps 2048 x n_envs 1)" in (
        capsys.readouterr().err
    )
    argv += ["--n-envs", "1", "--total-timesteps", "2048", "--eval-freq", "1024", "--lr", "1e-3"]
    assert run(argv, tmp_path) == 0
    assert result(tmp_path, "lora")["algorithm"] == "ppo"
    model = load_agent(tmp_path / "CartPole-v1" / "lora" / "seed0" / "model.zip", device="cpu")
    assert isinstance(model, PPO) and isinstance(model.policy.optimizer, torch.optim.Adam)
    capsys.readouterr()
    code = run(["--env", "Pendulum-v1", "--pretrained", str(ZOO_RUN), "--algo", "sac", "--methods", "full"], tmp_path)
    assert code == 2
    assert "a PPO agent cannot be fine-tuned with SAC" in capsys.readouterr().err


def test_a_zoo_agent_with_vecnormalize_works_with_default_settings(tmp_path: Path, capsys) -> None:
    """Pendulum's 3 observation features are narrower than the default rank 4: capped, with a warning."""
    argv = ["--env", "Pendulum-v1", "--pretrained", str(ZOO_RUN), "--methods", "eva"]
    capped = r"rank capped at the layer's width \(fan-in\) for mlp_extractor.policy_net.0 \(4 -> 3\)"
    with pytest.warns(UserWarning, match=capped):
        assert run([*argv, "--n-envs", "1", "--total-timesteps", "1024", "--eval-freq", "1024"], tmp_path) == 0
    assert "agent: PPO (rl-zoo3, VecNormalize statistics" in capsys.readouterr().out
    run_dir = tmp_path / "Pendulum-v1" / "eva" / "seed0"
    assert {"vecnormalize.pkl", "model.zip", "eva.json"} <= {p.name for p in run_dir.iterdir()}
    assert (run_dir / "adapter" / "vecnormalize.pkl").is_file()
    jumpstart = result(tmp_path, "eva", "Pendulum-v1")["jumpstart"]
    assert jumpstart > -400, "evaluated with the agent's statistics (raw observations give about -1400)"
    # The adapter folder carries the statistics: load_adapter wraps a raw env in them.
    base = load_pretrained(ZOO_RUN, device="cpu").model
    restored = eva_rl.load_adapter(base, run_dir / "adapter", env=gym.make("Pendulum-v1"))
    assert isinstance(restored.get_env(), VecNormalize) and not restored.get_env().training
    fine_tuned = load_agent(run_dir / "model.zip", device="cpu")
    obs = restored.get_env().normalize_obs(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 2.0]], dtype=np.float32))
    np.testing.assert_allclose(
        restored.predict(obs, deterministic=True)[0], fine_tuned.predict(obs, deterministic=True)[0], atol=1e-5
    )


def test_inspect_and_runs_work_with_an_off_policy_agent(tmp_path: Path, capsys) -> None:
    from stable_baselines3 import SAC

    from eva_rl.experiments.cli import inspect_main

    agent = tmp_path / "sac.zip"
    SAC("MlpPolicy", "Pendulum-v1", policy_kwargs={"net_arch": [32, 32]}, learning_starts=0, seed=0).learn(64).save(
        agent
    )
    code = inspect_main(
        ["--env", "Pendulum-v1", "--pretrained", str(agent), "--no-progress", "--out", str(tmp_path / "a.png")]
    )
    assert code == 0
    rows = {
        line.split()[0]: line.split()
        for line in capsys.readouterr().out.splitlines()
        if line.startswith(("actor", "critic"))
    }
    assert rows["critic.qf0.0"][1] == "4" and int(rows["critic.qf0.0"][2]) > 0  # 3 observation features + 1 action
    argv = ["--env", "Pendulum-v1", "--pretrained", str(agent), "--methods", "eva,scratch", "--checkpoint-freq", "128"]
    assert run([*argv, "--total-timesteps", "256", "--eval-freq", "256"], tmp_path) == 0
    assert {result(tmp_path, m, "Pendulum-v1")["algorithm"] for m in ("eva", "scratch")} == {"sac"}


def test_the_pendulum_task_changes_gravity_and_bundles_a_sac_agent() -> None:
    from eva_rl.experiments.environments import import_packages
    from eva_rl.experiments.tasks import find_task
    from eva_rl.loading import detect_algorithm

    import_packages(["envs"])
    task = find_task("Pendulum-Gravity")
    assert (task.algo, gym.make(task.source_env).unwrapped.g, gym.make(task.target_env).unwrapped.g) == (
        "sac",
        10.0,
        14.0,
    )
    assert detect_algorithm(task.agent_path) == "sac"
    card = json.loads((task.agent_path.parent / "card.json").read_text())
    assert card["target_return"] < card["eval_return"] - 500, "a clear gap for fine-tuning to close"


def test_eva_on_a2cs_own_rollouts(a2c_agent: Path, tmp_path: Path) -> None:
    from stable_baselines3.common.env_util import make_vec_env

    from eva_rl import EvaConfig, LoraConfig
    from eva_rl.eva_ppo import EvaA2C

    agent = A2C.load(a2c_agent, device="cpu")
    eva = EvaConfig(batch_size=32, data_source="ppo", max_batches=60, on_max_batches="warn")
    model = eva_rl.adapt(agent, make_vec_env("CartPole-v1", n_envs=16, seed=0), "eva", LoraConfig(r=2), eva)
    assert isinstance(model, EvaA2C) and model.eva_pending
    model.learn(16 * 5 * 40)
    assert not model.eva_pending and model.policy.eva_report.data_source == "ppo"
    model.save(tmp_path / "a2c_eva.zip")
    loaded = A2C.load(tmp_path / "a2c_eva.zip", device="cpu")
    assert loaded.policy.lora_ranks == model.policy.lora_ranks


def test_the_statistics_stay_frozen_unless_asked_to_update(tmp_path: Path) -> None:
    pretrained = VecNormalize.load(
        str(ZOO_RUN / "Pendulum-v1" / "vecnormalize.pkl"), PPO("MlpPolicy", "Pendulum-v1").get_env()
    )
    argv = ["--env", "Pendulum-v1", "--pretrained", str(ZOO_RUN), "--methods", "lora", "--n-envs", "1"]
    counts = {}
    for flag, log_dir in (([], tmp_path / "frozen"), (["--update-obs-stats"], tmp_path / "updating")):
        assert run([*argv, "--total-timesteps", "1024", "--eval-freq", "1024", *flag], log_dir) == 0
        saved = VecNormalize.load(
            str(log_dir / "Pendulum-v1" / "lora" / "seed0" / "vecnormalize.pkl"),
            PPO("MlpPolicy", "Pendulum-v1").get_env(),
        )
        counts[log_dir.name] = saved.obs_rms.count
        if not flag:
            np.testing.assert_array_equal(saved.obs_rms.mean, pretrained.obs_rms.mean)
    assert counts["frozen"] == pretrained.obs_rms.count
    assert counts["updating"] >= pretrained.obs_rms.count + 1024
