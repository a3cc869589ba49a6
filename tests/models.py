"""Tiny models and data streams for the model-agnostic EVA tests."""

from __future__ import annotations

import torch
from torch import nn


def decaying_stream(n_batches: int, rows: int, features: int, seed: int = 0, noise: float = 0.02) -> list[torch.Tensor]:
    """Batches whose covariance has a decaying, well-separated spectrum (scales 1, 0.7, 0.49, ...) plus noise."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(features, features, generator=torch.Generator().manual_seed(1234)))
    scales = 0.7 ** torch.arange(features, dtype=torch.float32)
    return [
        (
            torch.randn(rows, features, generator=generator) * scales
            + noise * torch.randn(rows, features, generator=generator)
        )
        @ basis.T
        for _ in range(n_batches)
    ]


class ActorCriticMLP(nn.Module):
    """The shape of SB3's default MlpPolicy: two branches reading the same features, then two heads."""

    def __init__(self, features: int = 10, hidden: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.policy_net = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.value_net = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.action_net = nn.Linear(hidden, 3)
        self.critic = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.action_net(self.policy_net(x)), self.critic(self.value_net(x))


class ConvNet(nn.Module):
    """One 2x2 convolution (fan-in 2*2*2 = 8) feeding a Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 3, 2)
        self.fc = nn.Linear(3 * 4 * 4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def image_stream(n_batches: int, rows: int, seed: int = 0) -> list[torch.Tensor]:
    """5x5 two-channel images mixing three fixed smooth patterns, so patch statistics have a clear spectrum."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.linspace(-1, 1, 5)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    patterns = torch.stack([torch.stack([xx, yy]), torch.stack([xx * yy, xx]), torch.stack([yy.square(), -xx])])
    weights = torch.tensor([1.0, 0.5, 0.25])
    return [
        torch.einsum("np,pchw->nchw", torch.randn(rows, 3, generator=generator) * weights, patterns)
        + 0.01 * torch.randn(rows, 2, 5, 5, generator=generator)
        for _ in range(n_batches)
    ]
