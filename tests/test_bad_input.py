"""Bad values in task and suite files: one ``error:`` line naming the value, exit code 2, before any env is built
or agent loaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from eva_rl.experiments import cli

BASE = {"target_env": "CartPole-v1", "agent": "nowhere.zip"}


def one_error_line(err: str) -> str:
    """The single ``error:`` line ``err`` must consist of (no traceback, nothing else); returned for its content."""
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


BAD_TASKS = [
    ({"eva": {"rho": "high"}}, "EvaConfig.rho='high' is invalid"),
    ({"eva": {"tau": [0.9]}}, "EvaConfig.tau=[0.9] is invalid"),
    ({"lora": {"alpha": "big"}}, "LoraConfig.alpha='big' is invalid"),
    ({"lora": {"train_heads": "yes"}}, "LoraConfig.train_heads='yes' is invalid"),
    ({"ppo": {"learning_rate": "fast"}}, "ppo.learning_rate='fast' is invalid: expected a finite number > 0"),
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
    ({"seeds": [-1]}, "seeds=[-1] is invalid: expected a non-empty list of integers in [0, 2147483647]"),
    ({"ppo": {"learning_rate": float("inf")}}, "ppo.learning_rate=inf is invalid: expected a finite number > 0"),
    ({"ppo": {"max_grad_norm": float("nan")}}, "ppo.max_grad_norm=nan is invalid: expected a finite number > 0"),
    ({"methods": ["eva", "eva"]}, "methods=['eva', 'eva'] is invalid: a method is listed twice"),
    ({"algo": "ddpg"}, "algo='ddpg' is invalid"),
    ({"update_obs_stats": "yes"}, "update_obs_stats='yes' is invalid"),
    ({"pretrain_normalize": 1}, "pretrain_normalize=1 is invalid: expected true or false"),
    ({"target_env": 5}, "target_env=5 is invalid"),
    ({"ppo": {"target_kl": -1}}, "ppo.target_kl=-1 is invalid: expected a number > 0, or null"),
    ({"ppo": {"normalize_advantage": "no"}}, "ppo.normalize_advantage='no' is invalid: expected true or false"),
    ({"ppo": {"use_sde": 1}}, "ppo.use_sde=1 is invalid: expected true or false"),
    ({"ppo": {"train_freq": [4, "steps"]}}, "ppo.train_freq=[4, 'steps'] is invalid"),
    ({"seeds": [2**32]}, "seeds=[4294967296] is invalid: expected a non-empty list of integers in [0, 2147483647]"),
    ({"eval": {"seed": -1}}, "eval.seed=-1 is invalid: expected an integer in [0, 2147483647]"),
    ({"name": "../../x"}, "name='../../x' is invalid: expected one folder name"),
    ({"name": "/tmp/x"}, "name='/tmp/x' is invalid: expected one folder name"),
    ({"name": ".."}, "name='..' is invalid: expected one folder name"),
]


@pytest.mark.parametrize(("values", "message"), BAD_TASKS, ids=[m.split(" is")[0] for _, m in BAD_TASKS])
def test_a_bad_task_value_is_one_error_line(
    values: dict, message: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("eva_rl.experiments.finetune.finetune", lambda *a, **k: pytest.fail("the run started"))
    config = tmp_path / "task.yaml"
    config.write_text(yaml.safe_dump({**BASE, **values}))
    assert cli.finetune_main(["--env", "x", "--config", str(config), "--no-progress"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert message in err and str(config) in err


PUBLISHED = {"source": "a paper", "statistic": "mean success", "setting": "offline", "scores": {"eva": 0.9}}
BAD_SUITES = [
    ({"tasks": [{"task": "PointGoal", "threshold": "high"}]}, "threshold='high' is invalid: expected a finite number"),
    ({"tasks": [{"task": "PointGoal", "threshold": float("inf")}]}, "threshold=inf is invalid"),
    ({"tasks": [{"task": "PointGoal", "threshold": 0.5, "total_timesteps": 0}]}, "total_timesteps=0 is invalid"),
    ({"tasks": [{"task": "PointGoal", "threshold": 0.5}], "seeds": [1, 1]}, "a seed is listed twice"),
    ({"tasks": [{"task": "PointGoal", "threshold": 0.5}], "seeds": "five"}, "seeds='five' is invalid"),
    ({"tasks": [{"task": "PointGoal", "threshold": 0.5}], "seeds": [0, -2]}, "list of integers in [0, 2147483647]"),
    (
        {"tasks": [{"task": "PointGoal", "threshold": 0.5}], "tuning_grid": {"learning_rate": [1e-3, "x"]}},
        "tuning_grid['learning_rate']='x' is invalid",
    ),
    (
        {"tasks": [{"task": "PointGoal", "threshold": 0.5}], "method_tuning_grid": {"dora": {"learning_rate": [1e-4]}}},
        "method_tuning_grid={'dora': {'learning_rate': [0.0001]}} is invalid: expected {method: {setting: [values]}} "
        "with methods out of the suite's ['eva', 'full']",
    ),
    (
        {
            "tasks": [{"task": "PointGoal", "threshold": 0.5}],
            "tuning_grid": {"learning_rate": [1e-3]},
            "method_tuning_grid": {"eva": {"r": [8]}},
        },
        "method_tuning_grid['eva'] keys ['r'] are invalid: expected keys out of tuning_grid's ['learning_rate']",
    ),
    (
        {"tasks": [{"task": "PointGoal", "threshold": 0.5}], "method_tuning_grid": {"eva": {"learning_rate": [-1]}}},
        "method_tuning_grid['eva']['learning_rate']=-1 is invalid",
    ),
    (
        {
            "tasks": [{"task": "PointGoal", "threshold": 0.5}],
            "rank_study": {"task": "PointGoal", "ranks": [1, 2], "methods": ["eva"], "tuning_grid": {"lr": [1e-3]}},
        },
        "rank_study.tuning_grid keys ['lr'] are invalid",
    ),
    ({"tasks": [{"task": "PointGoal", "threshold": 0.5}], "methods": ["eva", "eva"]}, "eva is listed twice"),
    ({"tasks": [{"task": "PointGoal", "threshold": 0.5}] * 2}, "PointGoal is listed twice"),
    ({"tasks": [{"task": "PointGoal", "threshold": 0.5}], "name": "../../x"}, "suite name='../../x' is invalid"),
    ({"tasks": []}, "tasks=[] is invalid: expected a non-empty list"),
    ({"tasks": [{"task": "PointGoal"}]}, "suite task: missing key(s) ['threshold']; required: ['task', 'threshold']"),
    (
        {"tasks": [{"task": "PointGoal", "threshold": 0.5}], "published": {**PUBLISHED, "scores": {"dora": 0.9}}},
        "published: scores=['dora'] is invalid: expected a non-empty list out of ['eva', 'full']",
    ),
    (
        {"tasks": [{"task": "PointGoal", "threshold": 0.5}], "published": {**PUBLISHED, "scores": {"eva": "high"}}},
        "published: scores['eva']='high' is invalid: expected a finite number",
    ),
    (
        {"tasks": [{"task": "PointGoal", "threshold": 0.5}], "published": {**PUBLISHED, "source": ""}},
        "published: source='' is invalid: expected a non-empty string",
    ),
    (
        {"tasks": [{"task": "PointGoal", "threshold": 0.5}], "published": {"source": "x", "scores": {"eva": 0.9}}},
        "published: missing key(s) ['statistic', 'setting']; required: ['source', 'statistic', 'setting']",
    ),
]


@pytest.mark.parametrize(("values", "message"), BAD_SUITES, ids=[m.split(" is")[0][:40] for _, m in BAD_SUITES])
def test_a_bad_suite_value_is_one_error_line(
    values: dict, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"methods": ["eva", "full"], **values}))
    assert cli.compare_main(["--suite", str(suite), "--log-dir", str(tmp_path / "runs")]) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


def test_target_modules_that_match_nothing_stop_before_any_run(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("eva_rl.experiments.execute.SideBySide.run", lambda *a, **k: pytest.fail("ran"))
    config = tmp_path / "task.yaml"
    task = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "PointGoal.yaml").read_text())
    task["lora"]["target_modules"] = ["nonexistent"]
    task["agent"] = str(Path(__file__).resolve().parents[1] / "agents" / "PointGoal-v0" / "model.zip")
    config.write_text(yaml.safe_dump(task))
    assert cli.finetune_main(["--env", "x", "--config", str(config), "--no-progress", "--log-dir", str(tmp_path)]) == 2
    assert "target_modules entry 'nonexistent' matches no Linear/Conv2d layer" in capsys.readouterr().err


# --- Through the ``eva-rl`` command: every kind of bad input a user gives on the command line or in a file ---------

POINT_AGENT = str(Path(__file__).resolve().parents[1] / "agents" / "PointGoal-v0" / "model.zip")
FAULTY = "tests.fixtures.faulty_envs"
TINY = ["--no-progress", "--methods", "lora", "--total-timesteps", "512", "--eval-freq", "512", "--eval-episodes", "2"]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Damaged, foreign and misplaced files, made once for the whole matrix."""
    import zipfile

    from stable_baselines3 import PPO

    root = tmp_path_factory.mktemp("bad")
    with zipfile.ZipFile(POINT_AGENT) as source, zipfile.ZipFile(root / "no_data.zip", "w") as damaged:
        for item in source.infolist():  # a zip that opens, with the entry SB3 needs first gone
            if item.filename != "data":
                damaged.writestr(item, source.read(item))
    (root / "not_a_zip.zip").write_text("this is not an SB3 agent")
    (root / "empty_dir").mkdir()
    (root / "two_zips").mkdir()
    for name in ("a.zip", "b.zip"):
        (root / "two_zips" / name).write_bytes(Path(POINT_AGENT).read_bytes())
    PPO("MlpPolicy", "CartPole-v1", n_steps=64, device="cpu").save(root / "cartpole.zip")
    plain = root / "plain_run"
    plain.mkdir()
    PPO("MlpPolicy", "CartPole-v1", n_steps=64, device="cpu").save(plain / "model.zip")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "broken.yaml").write_text("target_env: [unclosed\n")
    (root / "a_file").write_text("a file, not a folder")
    (root / "adapter").mkdir()  # the layout of a run's adapter/ folder, where a bank is expected
    for name in ("adapter_config.json", "adapter.safetensors"):
        (root / "adapter" / name).write_text("{}")
    task = {"target_env": "envs.point_goal:PointGoalEnv", "agent": POINT_AGENT}
    (root / "unknown_key.yaml").write_text(yaml.safe_dump({**task, "learning_rate": 0.1}))
    (root / "env_kwargs.yaml").write_text(yaml.safe_dump({**task, "env_kwargs": {"goal_x": 1}}))
    (root / "pattern.yaml").write_text(yaml.safe_dump({**task, "lora": {"target_modules": "(.*.*)*X"}}))
    (root / "suite_unknown_task.yaml").write_text(yaml.safe_dump({"tasks": [{"task": "Nope", "threshold": 0.5}]}))
    for name, text in (("damaged_result", "{not json"), ("result_not_object", "[1]")):
        (root / name).mkdir()
        (root / name / "result.json").write_text(text)
    os.mkfifo(root / "fifo.yaml")
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)
    )
    (root / "alias_bomb.yaml").write_text(
        f"target_env: CartPole-v1\nenv_kwargs:\n  {bomb.replace(chr(10), chr(10) + '  ')}"
    )
    smoke = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "sequences" / "smoke.yaml").read_text())
    (root / "sequence_escapes.yaml").write_text(yaml.safe_dump({**smoke, "name": "../../escaped"}))
    (root / "sequence_twice.yaml").write_text(yaml.safe_dump({**smoke, "methods": ["eva", "eva"]}))
    return root


def _cases() -> list[tuple[str, list[str], str]]:
    """``(id, argv, what the error line must say)``; ``{files}`` in an argument is the folder of bad files."""
    env = ["finetune", "--env", "PointGoal", "--no-progress"]
    ad_hoc = ["finetune", "--pretrained", POINT_AGENT, "--no-progress", "--env"]
    return [
        ("unknown command", ["finetun"], "unknown command 'finetun'; expected one of pretrain, finetune"),
        ("no --env", ["finetune"], "the following arguments are required: --env"),
        ("unknown flag", [*env, "--rnak", "2"], "unrecognized arguments: --rnak 2"),
        ("rank not a number", [*env, "--rank", "two"], "argument --rank: invalid int value: 'two'"),
        ("threads 0", [*env, "--threads", "0"], "argument --threads: 0 is invalid: expected an integer >= 1"),
        ("workers not a number", [*env, "--workers", "two"], "--workers: 'two' is invalid: expected an integer"),
        ("unknown algo", [*env, "--algo", "ddpg"], "argument --algo: invalid choice: 'ddpg'"),
        ("unknown env", ["finetune", "--env", "MiniGrid-DoorKye"], "unknown env 'MiniGrid-DoorKye'"),
        ("env kwarg no colon", [*env, "--env-kwargs", "goal"], "'goal' is invalid: expected key:value"),
        ("env kwarg no literal", [*env, "--env-kwargs", "goal:far"], "the value 'far' is no Python literal"),
        ("env kwarg unknown", [*env, "--env-kwargs", "speed:3", *TINY], "unexpected keyword argument 'speed'"),
        ("bad device", [*env, "--device", "tpu"], "'tpu'"),
        ("lr 0", [*env, "--lr", "0"], "--lr 0.0: ppo.learning_rate=0.0 is invalid"),
        ("lr negative", [*env, "--lr", "-1"], "--lr -1.0: ppo.learning_rate=-1.0 is invalid"),
        ("lr inf", [*env, "--lr", "inf"], "--lr inf: ppo.learning_rate=inf is invalid: expected a finite"),
        ("alpha nan", [*env, "--alpha", "nan"], "lora.alpha=nan is invalid: expected a finite number > 0"),
        (
            "seed negative",
            [*env, "--seeds", "0", "-1"],
            "--seeds: -1 is invalid: expected an integer in [0, 2147483647]",
        ),
        ("empty methods", [*env, "--methods", ","], "methods=[] is invalid"),
        ("seed twice", [*env, "--seeds", "0", "0"], "a seed is listed twice"),
        ("eval episodes 0", [*env, "--eval-episodes", "0"], "eval.episodes=0 is invalid"),
        ("checkpoint freq 0", [*env, "--checkpoint-freq", "0"], "checkpoint_freq=0 is invalid"),
        ("budget below a rollout", [*env, "--total-timesteps", "10"], "total_timesteps=10 is below one rollout"),
        ("critic warm-up negative", [*env, "--critic-warmup", "-2"], "critic_warmup=-2 is invalid"),
        (
            "critic warm-up over the budget",
            [*env, "--critic-warmup", "99", *TINY],
            "critic_warmup=99 is invalid: the budget makes",
        ),
        ("missing agent", [*env, "--pretrained", "{files}/nowhere.zip"], "nowhere.zip' does not exist"),
        ("zip without data", [*env, "--pretrained", "{files}/no_data.zip"], "no_data.zip' is not an SB3 zip (KeyError"),
        ("not a zip", [*env, "--pretrained", "{files}/not_a_zip.zip"], "not_a_zip.zip"),
        ("folder without zip", [*env, "--pretrained", "{files}/empty_dir"], "holds no SB3 zip"),
        ("folder with two zips", [*env, "--pretrained", "{files}/two_zips"], "holds several zips ['a.zip', 'b.zip']"),
        ("agent of other spaces", [*env, "--pretrained", "{files}/cartpole.zip"], "space does not match"),
        ("missing task file", [*env, "--config", "{files}/nowhere.yaml"], "nowhere.yaml: no such file"),
        (
            "task file not YAML",
            [*env, "--config", "{files}/broken.yaml"],
            "broken.yaml: not valid YAML (expected ',' or ']', but got '<stream end>' at line 2",
        ),
        ("task file a list", [*env, "--config", "{files}/list.yaml"], "expected a mapping of task settings"),
        ("unknown task key", [*env, "--config", "{files}/unknown_key.yaml"], "unknown key(s) ['learning_rate']"),
        ("bad env kwargs", [*env, "--config", "{files}/env_kwargs.yaml"], "unexpected keyword argument 'goal_x'"),
        ("backtracking regex", [*env, "--config", "{files}/pattern.yaml"], "a repetition inside a repeated group"),
        ("unknown gym package", [*env, "--gym-package", "no_such_pkg"], "cannot import gym package 'no_such_pkg'"),
        ("wrapper module", [*env, "--wrapper", "no_such_mod:Wrap"], "cannot import module 'no_such_mod'"),
        ("wrapper class", [*env, "--wrapper", "minigrid.wrappers:Nope"], "has no 'Nope'"),
        ("wrapper spec", [*env, "--wrapper", "Wrap"], "'Wrap' is not of the form 'module:Name'"),
        ("log dir under a file", [*env, *TINY, "--log-dir", "{files}/a_file/runs"], "runs cannot be written (Not a"),
        ("NaN observation", [*ad_hoc, f"{FAULTY}:NaNObservationEnv"], "returned an observation with NaN or inf"),
        ("inf reward", [*ad_hoc, f"{FAULTY}:InfRewardEnv"], "returned the reward inf in step()"),
        ("env raises", [*ad_hoc, f"{FAULTY}:RaisingEnv"], "failed: IndexError: simulator state out of range"),
        ("old Gym step", [*ad_hoc, f"{FAULTY}:OldGymStepEnv"], "step() returned a 4-tuple; Gymnasium's API returns"),
        ("reset without info", [*ad_hoc, f"{FAULTY}:ObservationOnlyResetEnv"], "reset() returned a ndarray alone"),
        ("wrong shape", [*ad_hoc, f"{FAULTY}:WrongShapeEnv"], "returned an observation of shape (7,), but its"),
        ("None reward", [*ad_hoc, f"{FAULTY}:NoneRewardEnv"], "step() returned the reward None; expected a number"),
        ("None info", [*ad_hoc, f"{FAULTY}:NoneInfoEnv"], "step() returned the info None; expected a dict"),
        ("not an env", [*ad_hoc, f"{FAULTY}:not_an_env"], "made a str, not a gymnasium.Env"),
        ("raw MiniGrid dict", [*ad_hoc, "MiniGrid-Empty-5x5-v0"], "which SB3 policies cannot take"),
        ("pretrain dict without policy", ["pretrain", "--env", f"{FAULTY}:DictObservationEnv"], "MultiInputPolicy"),
        ("pretrain unknown policy", ["pretrain", "--env", "PointGoal", "--policy", "Nope"], "policy='Nope' cannot"),
        ("pretrain card episodes", ["pretrain", "--env", "PointGoal", "--card-episodes", "0"], "0 is invalid"),
        (
            "pretrain over the bundled agent",
            ["pretrain", "--env", "PointGoal"],
            "agents/PointGoal-v0 already holds an agent (model.zip); pass --overwrite to replace it",
        ),  # fmt: skip
        ("suite missing", ["compare", "--suite", "nowhere"], "nowhere"),
        ("suite unknown task", ["compare", "--suite", "{files}/suite_unknown_task.yaml"], "task 'Nope' is not in"),
        ("suite unknown method", ["compare", "--suite", "smoke", "--methods", "eva,foo"], "'foo'"),
        ("compare workers 0", ["compare", "--suite", "smoke", "--workers", "0"], "--workers: 0 is invalid"),
        ("compare backend", ["compare", "--suite", "smoke", "--backend", "gpu"], "invalid choice: 'gpu'"),
        ("no rank study", ["compare", "--suite", "pendulum", "--rank-study"], "suite pendulum has no rank_study"),
        ("rank study methods", ["compare", "--suite", "smoke", "--rank-study", "--methods", "eva"], "drop --methods"),
        (
            "report of nothing",
            ["compare", "--suite", "smoke", "--report-only", "--log-dir", "{files}/none"],
            "no completed runs of suite",
        ),  # fmt: skip
        ("merge missing", ["merge", "{files}/nowhere"], "nowhere"),
        ("merge without adapters", ["merge", "{files}/plain_run"], "has no LoRA adapters to merge"),
        ("merge damaged zip", ["merge", "{files}/no_data.zip"], "no_data.zip' is not an SB3 zip"),
        ("record an unfinished run", ["record", "{files}/empty_dir"], "holds no completed run (no result.json)"),
        ("record max steps 0", ["record", "{files}/empty_dir", "--max-steps", "0"], "--max-steps: 0 is invalid"),
        ("inspect unknown env", ["inspect", "--env", "Nope-v9"], "unknown env 'Nope-v9'"),
        ("inspect a run's adapter", ["inspect", "{files}/adapter"], "is one run's adapter folder, not a bank"),
        (
            "bank base missing",
            ["inspect", "{files}/adapter", "--base", "{files}/nowhere.zip"],
            "nowhere.zip is invalid: expected the bank's base agent zip file",
        ),  # fmt: skip
        ("inspect rank 0", ["inspect", "--env", "PointGoal", "--rank", "0"], "--rank 0: lora.r=0 is invalid"),
        # an output path under a file: its folder cannot be made, which must stop the command before any work
        ("inspect out", ["inspect", "--env", "PointGoal", "--out", "{files}/no_data.zip/a.png"], "cannot be written"),
        ("merge out", ["merge", "{files}/plain_run", "--out", "{files}/no_data.zip/m.zip"], "cannot be written"),
        ("pretrain out", ["pretrain", "--env", "PointGoal", "--out", "{files}/no_data.zip/agent"], "cannot be written"),
        ("compare log dir", ["compare", "--suite", "smoke", "--log-dir", "{files}/no_data.zip/r"], "cannot be written"),
        ("continual log dir", ["continual", "--sequence", "smoke", "--log-dir", "{files}/no_data.zip/r"], "be written"),
        ("bench unknown task", ["bench", "--env", "Nope", "--quick"], "'Nope'"),
        (
            "record seed -1",
            ["record", "{files}/empty_dir", "--eval-seed", "-1"],
            "-1 is invalid: expected an integer in",
        ),
        (
            "seed 2**32",
            [*env, "--seeds", "4294967296"],
            "4294967296 is invalid: expected an integer in [0, 2147483647]",
        ),
        ("record a damaged result", ["record", "{files}/damaged_result"], "result.json is damaged (not JSON"),
        ("record a result not an object", ["record", "{files}/result_not_object"], "is damaged (not a JSON object)"),
        ("inspect out not an image", ["inspect", "--env", "PointGoal", "--out", "{files}/a.txt"], "an image file"),
        ("a FIFO as --config", [*env, "--config", "{files}/fifo.yaml"], "fifo.yaml: not a regular file"),
        ("a YAML alias bomb", [*env, "--config", "{files}/alias_bomb.yaml"], "more than 20 YAML aliases"),
        ("/dev/zero as --pretrained", [*ad_hoc, "CartPole-v1", "--pretrained", "/dev/zero"], "not a regular file"),
        (
            "sequence name escapes the log dir",
            ["continual", "--sequence", "{files}/sequence_escapes.yaml", "--log-dir", "{files}/runs"],
            "sequence name='../../escaped' is invalid: expected one folder name",
        ),  # fmt: skip
        (
            "sequence method twice",
            ["continual", "--sequence", "{files}/sequence_twice.yaml", "--log-dir", "{files}/runs"],
            "methods=['eva', 'eva'] is invalid: eva is listed twice",
        ),  # fmt: skip
        (
            "bench weight cache unknown task",
            ["bench", "--env", "Nope", "--weight-cache-only"],
            "'Nope' is not a task with a bundled agent; these are: [",
        ),  # fmt: skip
    ]


CASES = _cases()


@pytest.mark.parametrize(("argv", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_through_the_command_line_is_one_error_line(
    argv: list[str],
    message: str,
    bad_files: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Run from a folder of its own, whose ``runs/`` (the default --log-dir) is the one place it may write."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    argv = [arg.replace("{files}", str(bad_files)) for arg in argv]
    before = written_state(root, bad_files, tmp_path)
    try:
        code = cli.main(argv)
    except SystemExit as stop:  # argparse's errors exit from inside the parser
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if not line.startswith("warning: ")]
    assert message in one_error_line("".join(f"{line}\n" for line in lines))
    assert written_state(root, bad_files, tmp_path) == before, "a refused command wrote outside its run folder"


def written_state(root: Path, files: Path, cwd: Path) -> dict[str, int]:
    """Every file (and its modification time) a refused command could have touched outside its runs: the project's
    top level, agents, configs and runs, the bad files, and its working folder (less its own ``runs/``)."""
    paths = [*root.iterdir(), *files.rglob("*"), *(p for p in cwd.rglob("*") if "runs" not in p.relative_to(cwd).parts)]
    for folder in ("agents", "configs", "runs"):
        paths += (root / folder).rglob("*") if (root / folder).is_dir() else []
    return {str(path): path.lstat().st_mtime_ns for path in paths}


def test_a_changed_setting_on_a_completed_run_is_named_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["finetune", "--env", "PointGoal", *TINY, "--log-dir", str(tmp_path)]
    assert cli.main(argv) == 0
    capsys.readouterr()
    monkeypatch.setattr("eva_rl.experiments.execute.SideBySide.run", lambda *a, **k: pytest.fail("ran"))
    assert cli.main([*argv, "--lr", "0.0123", "--rank", "3"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "holds a completed run made with other settings" in err and "-> 0.0123" in err and "lora.r: 4 -> 3" in err
    assert "--overwrite" in err
    monkeypatch.undo()
    assert cli.main([*argv, "--lr", "0.0123", "--rank", "3", "--overwrite"]) == 0
    result = json.loads((tmp_path / "PointGoal" / "lora" / "seed0" / "result.json").read_text())
    assert result["settings"]["hyperparameters"]["learning_rate"] == 0.0123 and result["settings"]["lora"]["r"] == 3


def test_a_full_disk_is_one_error_line_and_leaves_no_temp_file(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from eva_rl.files import atomic_write

    def full_disk(model, path: Path) -> None:
        def write(tmp: Path) -> None:
            tmp.write_bytes(b"the first half of a zip")
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

        atomic_write(path, write, suffix=".tmp.zip")

    monkeypatch.setattr("eva_rl.experiments.runs.atomic_save_model", full_disk)
    assert cli.main(["finetune", "--env", "PointGoal", *TINY, "--log-dir", str(tmp_path)]) == 2
    assert "No space left on device; no half-written file was kept" in one_error_line(capsys.readouterr().err)
    run_dir = tmp_path / "PointGoal" / "lora" / "seed0"
    assert not [p.name for p in run_dir.iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize(("board", "message"), [("missing", "is not a folder"), (".", "holds no runs")])
def test_plot_runs_of_a_folder_without_runs_is_one_error_line(
    board: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert cli.plot_runs_main([str(tmp_path / board), "--out", str(tmp_path / "runs.png")]) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "runs.png").exists()
