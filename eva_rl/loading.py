"""Loading pretrained agents, with errors that name the file and what is wrong with it."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from stable_baselines3 import PPO

from eva_rl.errors import AgentError


def load_agent(path: Path, device: str = "auto", **kwargs: Any) -> PPO:
    """``PPO.load`` with clear errors for a missing or corrupt file.

    :param path: An SB3 PPO zip (a pickle: load only files you trust).
    :param device: Where the policy goes (``"auto"``: CUDA when present).
    :param kwargs: Passed on to ``PPO.load`` (``env=``, ``custom_objects=``...).
    :raises AgentError: naming the path and what is wrong with it.
    """
    path = Path(path)
    if not path.is_file():
        raise AgentError(f"pretrained agent {str(path)!r} does not exist; pass --pretrained path/to/agent.zip")
    try:
        return PPO.load(path, device=device, **kwargs)
    except (zipfile.BadZipFile, KeyError, EOFError, RuntimeError, ValueError, TypeError) as error:
        raise AgentError(
            f"pretrained agent {str(path)!r} cannot be loaded as an SB3 PPO zip ({type(error).__name__}: {error})"
        ) from error
