"""What a run records of its platform: the CPU, torch, threads, device, and MuJoCo's version for MuJoCo envs."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from eva_rl.experiments.machine import describe_platform, platform_line


def test_the_platform_names_the_torch_build_and_threads_of_this_process() -> None:
    platform = describe_platform("cpu")
    assert platform["torch"] == torch.__version__ and platform["threads"] == torch.get_num_threads()
    assert platform["device"] == "cpu" and "simulator" not in platform


@pytest.mark.parametrize(("env_id", "mujoco"), [("HalfCheetah-v5", True), ("CartPole-v1", False)])
def test_a_mujoco_env_adds_the_simulators_version(env_id: str, mujoco: bool) -> None:
    platform = describe_platform("cpu", env_id)
    assert ("simulator" in platform) == mujoco
    if mujoco:
        assert platform["simulator"] == f"mujoco {importlib.metadata.version('mujoco')}"
        assert platform["simulator"] in platform_line([platform])


def test_the_line_counts_each_platform_and_the_runs_that_did_not_record_one() -> None:
    here, cheetah = describe_platform("cpu"), describe_platform("cpu", "HalfCheetah-v5")
    line = platform_line([here, here, cheetah, None])
    assert line.startswith("Platform: ") and line.count("(2 runs)") == 1 and line.count("(1 runs)") == 1
    assert "not recorded for 1 runs" in line
