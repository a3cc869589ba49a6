"""Bad values in task and suite files: one ``error:`` line naming the value, exit code 2, before any env is built
or agent loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from eva_rl.experiments import cli

BASE = {"target_env": "CartPole-v1", "agent": "nowhere.zip"}

BAD_TASKS = [
    ({"eva": {"rho": "high"}}, "EvaConfig.rho='high' is invalid"),
    ({"eva": {"tau": [0.9]}}, "EvaConfig.tau=[0.9] is invalid"),
    ({"lora": {"alpha": "big"}}, "LoraConfig.alpha='big' is invalid"),
    ({"lora": {"train_heads": "yes"}}, "LoraConfig.train_heads='yes' is invalid"),
    ({"ppo": {"learning_rate": "fast"}}, "ppo.learning_rate='fast' is invalid: expected a number > 0"),
    ({"ppo": {"learning_rate": -1}}, "ppo.learning_rate=-1 is invalid"),
    ({"ppo": {"n_steps": 0}}, "ppo.n_steps=0 is invalid: expected an integer >= 1"),
    ({"ppo": {"gamma": 1.5}}, "ppo.gamma=1.5 is invalid: expected a number in [0, 1]"),
    ({"ppo": [1, 2]}, "ppo=[1, 2] is invalid"),
    ({"env_kwargs": [1, 2]}, "env_kwargs=[1, 2] is invalid: expected a mapping"),
    ({"eval": {"seed": "ten"}}, "eval.seed='ten' is invalid: expected an integer"),
    ({"eval": {"deterministic": "no"}}, "eval.deterministic='no' is invalid"),
    ({"method_settings": {"eva": {"r": "x"}}}, "method_settings['eva']['r']='x' is invalid: expected an integer"),
    ({"method_settings": {"eva": {"learning_rate": 0}}}, "method_settings['eva']['learning_rate']=0 is invalid"),
    ({"method_settings": {"eva": 3}}, "method_settings['eva']=3 is invalid"),
    ({"wrappers": "a:B"}, "wrappers='a:B' is invalid: expected a list"),
    ({"seeds": [0, 0]}, "seeds=[0, 0] is invalid: a seed is listed twice"),
    ({"methods": ["eva", "eva"]}, "methods=['eva', 'eva'] is invalid: a method is listed twice"),
    ({"algo": "ddpg"}, "algo='ddpg' is invalid"),
    ({"update_obs_stats": "yes"}, "update_obs_stats='yes' is invalid"),
    ({"target_env": 5}, "target_env=5 is invalid"),
]


@pytest.mark.parametrize(("values", "message"), BAD_TASKS, ids=[m.split(" is")[0] for _, m in BAD_TASKS])
def test_a_bad_task_value_is_one_error_line(
    values: dict, message: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("eva_rl.experiments.finetune.finetune", lambda *a, **k: pytest.fail("the run started"))
    config = tmp_path / "task.yaml"
    config.write_text(yaml.safe_dump({**BASE, **values}))
    assert cli.finetune_main(["--env", "x", "--config", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err and str(config) in err


BAD_SUITES = [
    ({"tasks": [{"task": "PointGoal", "threshold": "high"}]}, "threshold='high' is invalid: expected a number"),
    ({"tasks": [{"task": "PointGoal", "threshold": 0.5, "total_timesteps": 0}]}, "total_timesteps=0 is invalid"),
    ({"tasks": [{"task": "PointGoal", "threshold": 0.5}], "seeds": [1, 1]}, "a seed is listed twice"),
    ({"tasks": [{"task": "PointGoal", "threshold": 0.5}], "seeds": "five"}, "seeds='five' is invalid"),
    (
        {"tasks": [{"task": "PointGoal", "threshold": 0.5}], "tuning_grid": {"learning_rate": [1e-3, "x"]}},
        "tuning_grid['learning_rate']['eva']['learning_rate']='x' is invalid",
    ),
]


@pytest.mark.parametrize(("values", "message"), BAD_SUITES, ids=[m.split(" is")[0][:40] for _, m in BAD_SUITES])
def test_a_bad_suite_value_is_one_error_line(
    values: dict, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"methods": ["eva", "full"], **values}))
    assert cli.compare_main(["--suite", str(suite), "--log-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "runs").exists()


def test_target_modules_that_match_nothing_stop_before_the_jumpstart(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("eva_rl.experiments.finetune.pretrained_return", lambda *a, **k: pytest.fail("evaluated"))
    config = tmp_path / "task.yaml"
    task = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "PointGoal.yaml").read_text())
    task["lora"]["target_modules"] = ["nonexistent"]
    task["agent"] = str(Path(__file__).resolve().parents[1] / "agents" / "PointGoal-v0" / "model.zip")
    config.write_text(yaml.safe_dump(task))
    assert cli.finetune_main(["--env", "x", "--config", str(config), "--no-progress", "--log-dir", str(tmp_path)]) == 2
    assert "target_modules entry 'nonexistent' matches no Linear/Conv2d layer" in capsys.readouterr().err
