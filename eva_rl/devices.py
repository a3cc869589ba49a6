"""Device selection: ``get_device("auto")`` means CUDA when present; a run's ``"auto"`` (:func:`run_device`) means
CUDA only for a policy large enough to be faster there."""

from __future__ import annotations

import torch
from torch import nn

CUDA_MIN_PARAMETERS = 1_000_000
"""The smallest policy a run's ``--device auto`` trains on CUDA. Measured (issue 26, a 16-core machine with an H200):
the main job's 168,184-parameter DoorKey agent took 97 s on CUDA against 78 s on the CPU, since PPO's minibatches of
64 on 64-256-wide layers are too small to pay for the kernel launches and host-device copies. The crossover itself
has not been measured on a GPU yet (``eva-rl bench --device-crossover`` measures it); one million parameters, a
6x larger policy than the measured one, is where CUDA is assumed to start paying, until it is."""


def get_device(device: torch.device | str = "auto") -> torch.device:
    """``"auto"``: CUDA when present, else CPU; anything else is passed to ``torch.device``.

    :raises ValueError: for a device string torch does not know, or CUDA requested where there is none.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device={device!r} is invalid: expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available here; use 'auto' or 'cpu'")
    return resolved


def run_device(device: torch.device | str, policy: nn.Module) -> torch.device:
    """The device a run trains ``policy`` on: ``"auto"`` is CUDA where present and the policy has at least
    :data:`CUDA_MIN_PARAMETERS` parameters, else the CPU; any other value is :func:`get_device`'s."""
    if device != "auto":
        return get_device(device)
    large = sum(parameter.numel() for parameter in policy.parameters()) >= CUDA_MIN_PARAMETERS
    return torch.device("cuda" if large and torch.cuda.is_available() else "cpu")
