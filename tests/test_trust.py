"""The trust boundary (``eva_rl.experiments.trust``): a folder someone sent runs no code of theirs unless asked, and
every pickle a command loads from outside the bundled agents is named in a note."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import gymnasium as gym
import pytest
from stable_baselines3 import PPO

import eva_rl
from eva_rl import LoraConfig
from eva_rl.bank import AdapterBank
from eva_rl.experiments import cli
from eva_rl.experiments.environments import import_packages

ROOT = Path(__file__).resolve().parents[1]
POINT_AGENT = ROOT / "agents" / "PointGoal-v0" / "model.zip"
NOTE = "is unpickled to load it, which can run code"


@pytest.fixture
def payload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A module ``payload_env`` in the working directory that leaves a marker file when imported; returns the
    marker's path."""
    marker = tmp_path / "payload-ran"
    (tmp_path / "payload_env.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\nEnv = None\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "payload_env", raising=False)
    return marker


def adapted_point_agent() -> PPO:
    import_packages(["envs"])
    model = PPO.load(POINT_AGENT, device="cpu")
    return eva_rl.adapt(model, gym.make("PointGoal-v0"), method="lora", lora=LoraConfig(r=2))


def received_bank(folder: Path, env: str) -> Path:
    """A bank of the bundled PointGoal agent whose one task says to evaluate it on ``env``."""
    base = folder / "base.zip"
    shutil.copy(POINT_AGENT, base)
    bank = AdapterBank(PPO.load(base, device="cpu"), base)
    bank.add("t", adapted_point_agent(), info={"task": "PointGoal", "env": env})
    return bank.save(folder / "bank")


def error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_a_bank_imports_no_code_it_names_unless_trusted(
    payload: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bank = received_bank(tmp_path, "payload_env:Env")
    assert cli.main(["inspect", str(bank), "--evaluate", "--eval-episodes", "1"]) == 2
    out, err = capsys.readouterr()
    assert f"{tmp_path / 'base.zip'} {NOTE}: use only base agents you trust" in out
    assert "bank task 't''s env names 'payload_env:Env', code from package 'payload_env'" in err
    assert "--trust-code" in err and not payload.exists()
    cli.main(["inspect", str(bank), "--evaluate", "--eval-episodes", "1", "--trust-code"])  # asked: imported
    assert payload.exists()


def test_a_bank_copied_elsewhere_loads_with_its_base_given(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bank = received_bank(tmp_path, "PointGoal-v0")
    moved = shutil.move(bank, tmp_path / "elsewhere" / "bank")
    assert cli.main(["inspect", str(moved)]) == 2
    assert "is not there; pass its zip as base_file= (the command line: --base)" in error_line(capsys)
    assert cli.main(["inspect", str(moved), "--base", str(tmp_path / "base.zip")]) == 0
    assert "1 tasks" in capsys.readouterr().out
    assert (
        cli.main(["inspect", str(moved), "--base", str(ROOT / "agents" / "MiniGrid-DoorKey-5x5-v0" / "model.zip")]) == 2
    )
    assert "is not the one the bank was saved with (SHA-256 differs" in error_line(capsys)


def test_a_received_run_is_recorded_only_with_code_it_may_import(
    payload: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "runs" / "Mine" / "lora" / "seed0"
    run.mkdir(parents=True)
    shutil.copy(POINT_AGENT, run / "model.zip")
    settings = {"target_env": "PointGoal-v0", "wrappers": [{"payload_env.Wrapper": {}}], "eval": {}}
    result = {"task": "Mine", "method": "lora", "seed": 0, "total_timesteps": 10, "jumpstart": 0.0,
              "final_return": 0.0, "best_return": 0.0, "eval_curve": [], "trainable_params": 0, "total_params": 0,
              "wall_seconds": 0.0, "settings": settings, "agent": str(POINT_AGENT)}  # fmt: skip
    (run / "result.json").write_text(json.dumps(result))
    assert cli.main(["record", str(run), "--max-steps", "5"]) == 2
    assert "names 'payload_env.Wrapper', code from package 'payload_env'" in error_line(capsys)
    assert not payload.exists()


def test_every_pickle_from_outside_the_bundled_agents_gets_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A run folder (``result.json`` beside its ``model.zip``) is no exception: it may have been received."""
    run = tmp_path / "run"
    run.mkdir()
    adapted_point_agent().save(run / "model.zip")
    (run / "result.json").write_text("{}")
    assert cli.main(["merge", str(run)]) == 0
    assert f"[eva-rl] note: {run / 'model.zip'} {NOTE}: use only files you trust" in capsys.readouterr().out
    argv = ["finetune", "--env", "PointGoal", "--total-timesteps", "10"]
    for agent, noted in ((run / "model.zip", True), (POINT_AGENT, False)):
        assert cli.main([*argv, "--pretrained", str(agent)]) == 2  # stopped by the budget, after the note
        assert (NOTE in capsys.readouterr().out) == noted
