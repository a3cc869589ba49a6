"""Agents made elsewhere, continued faithfully: every fixture under ``tests/fixtures/zoo/`` was trained by
``python -m rl_zoo3.train`` (the command is in its ``command.txt``), and is brought both as rl-zoo3's run folder and
laid out as ``rl_zoo3.push_to_hub`` uploads it.

Two invariants per agent: its jumpstart agrees with ``rl_zoo3.enjoy`` within 3 standard errors (the same from either
layout), and fine-tuned on its own env it does not collapse (its final return within a stated margin of its
jumpstart)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from eva_rl.experiments.finetune import pretrained_return
from eva_rl.experiments.tasks import EvalSettings, TaskConfig

ZOO = Path(__file__).resolve().parent / "fixtures" / "zoo"

pytest.importorskip("rl_zoo3")


@dataclass(frozen=True)
class Client:
    """An rl-zoo3 fixture and how it is checked.

    :param algo: rl-zoo3's ``--algo``.
    :param env: Its ``--env``.
    :param budget: Fine-tuning steps on its own env (past the agent's ``learning_starts``).
    :param margin: How far below its jumpstart a fine-tuned agent may end before it counts as collapsed.
    :param episode_steps: Steps per episode at most (an Atari game of this barely trained agent: about 150).
    """

    algo: str
    env: str
    budget: int
    margin: float
    episode_steps: int

    @property
    def run(self) -> Path:
        return ZOO / self.algo / f"{self.env}_1"

    @property
    def atari(self) -> bool:
        return "NoFrameskip" in self.env

    def __str__(self) -> str:
        return f"{self.algo}-{self.env}"


CLIENTS = [
    Client("ppo", "Pendulum-v1", 4096, 100.0, 200),  # gSDE, VecNormalize
    Client("a2c", "CartPole-v1", 2000, 100.0, 500),  # VecNormalize
    Client("sac", "Pendulum-v1", 1000, 100.0, 200),  # VecNormalize, a learned entropy coefficient of 3e-4
    Client("td3", "Pendulum-v1", 2000, 100.0, 200),  # learning_starts 1000, action noise
    Client("dqn", "CartPole-v1", 2048, 100.0, 500),  # learning_starts 1000, train_freq 256, gradient_steps 128
    Client("ppo", "BreakoutNoFrameskip-v4", 1024, 1.0, 250),  # AtariWrapper, 4 stacked frames, NatureCNN
]
EPISODES = 20


def as_hub_folder(client: Client, root: Path) -> Path:
    """``client``'s run laid out as ``rl_zoo3.push_to_hub`` uploads it: ``<algo>-<env>.zip`` and the same zip
    unpacked beside it, ``config.yml``, ``args.yml``, ``env_kwargs.yml``, ``vec_normalize.pkl`` (underscore),
    ``train_eval_metrics.zip``, ``results.json`` and a model card."""
    name = f"{client.algo}-{client.env}"
    hub = root / name
    hub.mkdir(parents=True)
    shutil.copy(client.run / f"{client.env}.zip", hub / f"{name}.zip")
    with zipfile.ZipFile(hub / f"{name}.zip") as archive:
        archive.extractall(hub / name)
    recorded = client.run / client.env
    for file in ("config.yml", "args.yml"):
        shutil.copy(recorded / file, hub / file)
    (hub / "env_kwargs.yml").write_text("{}\n")
    if (recorded / "vecnormalize.pkl").exists():
        shutil.copy(recorded / "vecnormalize.pkl", hub / "vec_normalize.pkl")
    with zipfile.ZipFile(hub / "train_eval_metrics.zip", "w") as metrics:
        metrics.writestr("evaluations.npz", b"")
    (hub / "results.json").write_text(json.dumps({"mean_reward": 0.0, "std_reward": 0.0}))
    (hub / "README.md").write_text(f"---\nlibrary_name: stable-baselines3\n---\n# {name}\n")
    return hub


def own_task(client: Client, episodes: int) -> TaskConfig:
    """The ad-hoc task ``--env <its env>`` makes: greedy evaluation except on Atari, as rl-zoo3 evaluates."""
    return TaskConfig(name=client.env, target_env=client.env,
                      eval=EvalSettings(episodes=episodes, deterministic=not client.atari))  # fmt: skip


def enjoy_returns(client: Client) -> list[float]:
    """The episode returns ``rl_zoo3.enjoy`` reports for ``client`` (Atari: the games' scores it prints, not its
    per-life, clipped ``Mean reward``)."""
    steps = client.episode_steps * EPISODES
    done = subprocess.run(
        [sys.executable, "-m", "rl_zoo3.enjoy", "--algo", client.algo, "--env", client.env, "-f", str(ZOO),
         "--exp-id", "1", "-n", str(steps), "--no-render", "--seed", "3", "--num-threads", "1"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    pattern = r"Atari Episode Score: (-?[\d.]+)" if client.atari else r"Episode Reward: (-?[\d.]+)"
    return [float(value) for value in re.findall(pattern, done.stdout)][:EPISODES]


@pytest.mark.slow
@pytest.mark.parametrize("client", CLIENTS, ids=str)
def test_the_jumpstart_agrees_with_rl_zoo3_enjoy_from_either_layout(client: Client, tmp_path: Path) -> None:
    theirs = enjoy_returns(client)
    assert len(theirs) >= EPISODES // 2, f"rl_zoo3.enjoy finished {len(theirs)} episodes"
    mean = sum(theirs) / len(theirs)
    std = (sum((value - mean) ** 2 for value in theirs) / len(theirs)) ** 0.5
    ours = pretrained_return(own_task(client, EPISODES), client.run, device="cpu")
    # 3 standard errors of the gap (a floor of 1 for an agent whose episodes all score alike)
    assert abs(ours - mean) < 3 * max(std, 1.0) * (1 / EPISODES + 1 / len(theirs)) ** 0.5, (ours, mean, std)
    hub = as_hub_folder(client, tmp_path)
    assert pretrained_return(own_task(client, EPISODES), hub, device="cpu") == ours


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["rl-zoo3", "hub"])
@pytest.mark.parametrize("client", CLIENTS, ids=str)
def test_fine_tuning_on_its_own_env_does_not_collapse(client: Client, layout: str, tmp_path: Path) -> None:
    from eva_rl.experiments.cli import finetune_main

    agent = client.run if layout == "rl-zoo3" else as_hub_folder(client, tmp_path / "hub")
    method = "full" if layout == "rl-zoo3" else "eva"
    argv = ["--env", client.env, "--pretrained", str(agent), "--methods", method, "--no-progress", "--workers", "1"]
    argv += ["--total-timesteps", str(client.budget), "--eval-freq", str(client.budget), "--eval-episodes", "4"]
    assert finetune_main([*argv, "--log-dir", str(tmp_path / "runs")]) == 0
    result = json.loads((tmp_path / "runs" / client.env / method / "seed0" / "result.json").read_text())
    jumpstart, final = result["jumpstart"], result["final_return"]
    assert final >= jumpstart - client.margin, (method, result["eval_curve"])


ATARI = next(client for client in CLIENTS if client.atari)


def test_an_atari_episode_is_a_whole_game_and_each_evaluation_starts_new_ones() -> None:
    """rl-zoo3 puts the Monitor below ``AtariWrapper``, whose episodes end at each lost life with clipped rewards:
    a returned episode is a game (it ends with no lives left), and an evaluation does not play on in the games the
    previous one left unfinished."""
    from eva_rl.experiments.environments import agent_env
    from eva_rl.experiments.training import evaluate
    from eva_rl.loading import load_pretrained

    agent = load_pretrained(ATARI.run, device="cpu")
    env = agent_env(own_task(ATARI, 1), agent, 2, 0, evaluation=True)
    observation, games, life_ends = env.reset(), [], 0
    while len(games) < 2:
        action, _ = agent.model.predict(observation, deterministic=False)
        observation, _, dones, infos = env.step(action)
        life_ends += int(dones.sum())
        games += [info["lives"] for info in infos if "episode" in info]
    assert games == [0] * len(games) and life_ends > len(games)
    assert evaluate(agent.model, env, 3, 7) == evaluate(agent.model, env, 3, 7)
    env.close()
