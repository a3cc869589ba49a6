"""Shared fixtures: tiny environments and pretrained-looking agents for every policy variant."""

from __future__ import annotations

import gymnasium as gym
import minigrid  # noqa: F401  (registers the MiniGrid ids)
import numpy as np
import pytest
import torch
from gymnasium import spaces
from minigrid.wrappers import ImgObsWrapper
from stable_baselines3 import PPO
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from eva_rl.extractors import MinigridCNN


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist runs one worker process per core; torch's own intra-op threads on top oversubscribe the cores, and
    # a SAC update of a 16-wide network then waits 20x longer than it computes.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


class DictPointEnv(gym.Env):
    """A 2-D point that should reach the origin; observations are a Dict of two Boxes."""

    def __init__(self) -> None:
        self.observation_space = spaces.Dict(
            {"position": spaces.Box(-2, 2, (2,), np.float32), "velocity": spaces.Box(-1, 1, (3,), np.float32)}
        )
        self.action_space = spaces.Discrete(4)
        self._pos = np.zeros(2, np.float32)
        self._t = 0

    def _obs(self) -> dict[str, np.ndarray]:
        vel = np.array([self._pos[0] * 0.5, self._pos[1] * 0.25, np.sin(self._t)], np.float32)
        return {"position": self._pos.copy(), "velocity": np.clip(vel, -1, 1)}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._pos = self.np_random.uniform(-1.5, 1.5, 2).astype(np.float32)
        self._t = 0
        return self._obs(), {}

    def step(self, action: int):
        moves = np.array([[0.1, 0], [-0.1, 0], [0, 0.1], [0, -0.1]], np.float32)
        self._pos = np.clip(self._pos + moves[int(action)], -2, 2)
        self._t += 1
        reward = -float(np.linalg.norm(self._pos))
        return self._obs(), reward, False, self._t >= 50, {}


def make_minigrid(env_id: str = "MiniGrid-Empty-5x5-v0") -> gym.Env:
    return ImgObsWrapper(gym.make(env_id))


VARIANTS = {
    # name: (env factory, policy, policy_kwargs)
    "mlp-discrete": (lambda: gym.make("CartPole-v1"), "MlpPolicy", {}),
    "mlp-box": (lambda: gym.make("Pendulum-v1"), "MlpPolicy", {}),
    "cnn-discrete": (
        make_minigrid,
        "CnnPolicy",
        {"features_extractor_class": MinigridCNN, "features_extractor_kwargs": {"features_dim": 32}},
    ),
    "dict-discrete": (DictPointEnv, "MultiInputPolicy", {}),
}


def make_pretrained(variant: str, seed: int = 0, perturb: bool = True) -> PPO:
    """A PPO agent for ``variant`` whose weights look trained (not SB3's ortho init, which zeroes biases)."""
    env_fn, policy, policy_kwargs = VARIANTS[variant]
    model = PPO(
        policy, env_fn(), n_steps=64, batch_size=32, n_epochs=1, seed=seed, device="cpu", policy_kwargs=policy_kwargs
    )
    if perturb:
        generator = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for param in model.policy.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


@pytest.fixture(params=list(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    return request.param


class DeadBranchExtractor(BaseFeaturesExtractor):
    """Features from a live Linear branch and a branch that only ever sees zeros (its input has no variance)."""

    def __init__(self, observation_space: spaces.Box) -> None:
        super().__init__(observation_space, features_dim=16)
        n = int(np.prod(observation_space.shape))
        self.live = nn.Linear(n, 8)
        self.dead = nn.Linear(n, 8)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        flat = observations.flatten(1)
        return torch.cat([torch.tanh(self.live(flat)), torch.tanh(self.dead(torch.zeros_like(flat)))], dim=1)


@pytest.fixture(scope="module")
def normalized_agent(tmp_path_factory: pytest.TempPathFactory):
    """A PointGoal agent trained inside VecNormalize (its statistics beside the zip), as the MuJoCo agents are."""
    from eva_rl.experiments.environments import import_packages
    from eva_rl.experiments.pretrain import pretrain
    from eva_rl.experiments.tasks import find_task

    import_packages(["envs"])
    out = tmp_path_factory.mktemp("normalized")
    task = find_task("PointGoal").with_overrides({"pretrain_timesteps": 1024, "pretrain_normalize": True})
    pretrain(task, out, eval_episodes=2, device="cpu", progress=False)
    return out / "model.zip"
