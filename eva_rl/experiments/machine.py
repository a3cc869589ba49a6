"""What a run was made on: CPU, torch build, threads and device, recorded in every ``result.json`` and named on every
page, since returns move in their second or third decimal across CPUs, torch builds and thread counts."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from collections.abc import Iterable, Mapping
from functools import cache
from typing import Any

import torch

from eva_rl.physics import simulator_packages


@cache
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what :func:`platform.processor` says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_platform(device: str | torch.device = "cpu", env_id: str | None = None) -> dict[str, Any]:
    """The platform of a run on ``device``, as ``result.json`` records it.

    :param env_id: The run's env: a MuJoCo env adds the simulator's version, since its physics moves returns across
        versions too (the bundled HalfCheetah agent: -2% on FrontThighOff from mujoco 4.0.1 to 3.3.0), and a
        Meta-World task Meta-World's.
    :return: ``cpu`` (model and logical cores), ``torch`` (version), ``torch_build`` (``"cpu"`` or ``"cuda X"``),
        ``threads`` (torch's intra-op threads), ``device`` (with the GPU's name on CUDA), and ``simulator``
        (``"mujoco X"``, ``"mujoco X, metaworld Y"`` for a Meta-World task) for a MuJoCo env.
    """
    device = torch.device(device)
    described = str(device)
    if device.type == "cuda":
        described = f"{device} ({torch.cuda.get_device_name(device)})"
    platform = {
        "cpu": f"{cpu_model()}, {os.cpu_count()} logical cores",
        "torch": torch.__version__,
        "torch_build": f"cuda {torch.version.cuda}" if torch.version.cuda else "cpu",
        "threads": torch.get_num_threads(),
        "device": described,
    }
    simulators = simulator_packages(env_id) if env_id is not None else ()
    if simulators:
        platform["simulator"] = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in simulators)
    return platform


def platform_line(platforms: Iterable[Mapping[str, Any] | None]) -> str:
    """One Markdown line naming every distinct platform the runs were made on (and how many were not recorded)."""
    seen: dict[str, int] = {}
    missing = 0
    for entry in platforms:
        if not entry:
            missing += 1
            continue
        text = (
            f"{entry['cpu']}; torch {entry['torch']} ({entry['torch_build']}), {entry['threads']} thread(s), "
            f"device {entry['device']}"
        )
        if "simulator" in entry:
            text += f", {entry['simulator']}"
        seen[text] = seen.get(text, 0) + 1
    parts = [f"{text} ({count} runs)" for text, count in seen.items()]
    if missing:
        parts.append(f"not recorded for {missing} runs (made before runs recorded it, 2026-12-05)")
    return "Platform: " + "; ".join(parts) + "."
