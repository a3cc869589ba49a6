"""The README's quickstart runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    runnable = [block for block in blocks if "eva_rl.adapt(" in block]
    assert len(runnable) == 1, "expected one runnable quickstart block in the README"
    return runnable[0]


def test_quickstart_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(quickstart_block(), str(README), "exec"), namespace)
    assert (tmp_path / "cartpole_eva.zip").exists() and (tmp_path / "cartpole_merged.zip").exists()
    printed = capsys.readouterr().out
    assert "mlp_extractor.policy_net.0" in printed
    assert sum(namespace["report"].ranks.values()) == 2 * 6


def test_the_bank_snippet_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from a folder where the main job left its eva run (here: a LoRA adapter of the bundled DoorKey agent)."""
    from stable_baselines3 import PPO

    import eva_rl
    from eva_rl.bank import AdapterBank
    from eva_rl.checkpoints import save_adapter
    from eva_rl.experiments.environments import env_factory

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (block,) = [block for block in blocks if "AdapterBank(" in block and "bank.save" in block]
    (tmp_path / "agents").symlink_to(README.parent / "agents")
    monkeypatch.chdir(tmp_path)
    env = env_factory("MiniGrid-DoorKey-8x8-v0", ["eva_rl.wrappers:OneHotImage"])()
    adapted = eva_rl.adapt(PPO.load("agents/MiniGrid-DoorKey-5x5-v0/model.zip"), env, method="lora")
    save_adapter(adapted, tmp_path / "runs" / "MiniGrid-DoorKey" / "eva" / "seed0" / "adapter")
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    assert namespace["action"] in range(env.action_space.n)
    assert list(AdapterBank.load(tmp_path / "my_bank", device="cpu").tasks) == ["DoorKey-8x8"]
