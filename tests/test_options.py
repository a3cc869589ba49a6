"""The command-line vocabulary: every flag declared once (``options.FLAGS``), the same name meaning the same thing with
the same default in every command, each setting flag applied to the task through ``TaskConfig.with_overrides``, and a
bad value one ``error:`` line with exit code 2 before any env is built or agent loaded."""

from __future__ import annotations

import argparse

import pytest

from eva_rl.experiments import cli
from eva_rl.experiments.options import FLAGS
from eva_rl.experiments.tasks import find_task
from tests.test_bad_input import one_error_line

VALID = {
    "--env-kwargs": ("max_steps:100", {"max_steps": 100}),
    "--n-envs": ("3", 3),
    "--wrapper": ("eva_rl.wrappers:OneHotImage", ["eva_rl.wrappers:OneHotImage"]),
    "--rank": ("3", 3),
    "--alpha": ("8", 8.0),
    "--rho": ("1.5", 1.5),
    "--tau": ("0.95", 0.95),
    "--eva-convergence": ("subspace", "subspace"),
    "--eva-batch-size": ("64", 64),
    "--methods": ("eva,lora", ["eva", "lora"]),
    "--seeds": ("4", [4]),
    "--total-timesteps": ("2048", 2048),
    "--lr": ("0.0007", 0.0007),
    "--eva-data": ("ppo", "ppo"),
    "--eval-freq": ("512", 512),
    "--eval-episodes": ("4", 4),
    "--eval-seed": ("7", 7),
    "--checkpoint-freq": ("1024", 1024),
    "--algo": ("a2c", "a2c"),
    "--update-obs-stats": (None, True),
    "--rslora": (None, True),
    "--critic-warmup": ("3", 3),
}
SETTING_FLAGS = [FLAGS[name] for name in cli.FINETUNE_FLAGS if FLAGS[name].setting is not None]


def field_at(task, path: str):
    from eva_rl.experiments.tasks import SETTINGS

    section, _, key = SETTINGS[path].path.partition(".") if path in SETTINGS else path.partition(".")
    holder = getattr(task, section)
    if not key:
        return holder
    return holder[key] if isinstance(holder, dict) else getattr(holder, key)


def finetune_args(*argv: str) -> argparse.Namespace:
    return cli.COMMANDS["finetune"].parser().parse_args(["--env", "PointGoal", *argv])


@pytest.mark.parametrize("flag", SETTING_FLAGS, ids=lambda flag: flag.flags[0])
def test_each_setting_flag_parses_and_sets_its_task_field(flag) -> None:
    text, value = VALID[flag.flags[0]]
    task = cli.resolve_task(finetune_args(*([flag.flags[0]] if text is None else [flag.flags[0], text])))
    assert field_at(task, flag.setting) == value
    assert all(flag.setting not in settings for settings in task.method_settings.values())


def test_every_command_takes_its_flags_from_the_one_vocabulary() -> None:
    """A flag's help, default and type are the same in every command that takes it, and every flag a command
    declares is in its help."""
    seen: dict[str, tuple] = {}
    commands = [*cli.COMMANDS.values(), cli.INSPECT_BANK, cli.PLOT_RUNS]
    for command in commands:
        parser = command.parser()
        help_text = parser.format_help()
        for action in parser._actions:
            if action.dest == "help":
                continue
            assert action.dest in FLAGS, f"{command.name} declares {action.dest} outside options.FLAGS"
            described = (action.help, action.default, action.type, tuple(action.option_strings))
            assert seen.setdefault(action.dest, described) == described, action.dest
            assert (action.option_strings or [action.dest])[0] in help_text
    assert {"seeds", "workers", "device", "eval_episodes", "log_dir"} <= set(seen)


def test_env_kwargs_are_literals_that_update_the_tasks_own() -> None:
    """rl-zoo3's key:value form; a tuple becomes the list a task file's YAML would give, so a rerun's settings match."""
    task = cli.resolve_task(finetune_args("--env-kwargs", "goal:(0.3, 0.7)", "max_steps:100", "name:'x'"))
    assert task.env_kwargs == {"goal": [0.3, 0.7], "max_steps": 100, "name": "x"}
    kept = cli.resolve_task(finetune_args("--env-kwargs", "max_steps:7")).with_overrides({"env_kwargs.goal": [0, 0]})
    updated = cli.apply_flags(kept, finetune_args("--env-kwargs", "max_steps:9"))
    assert updated.env_kwargs == {"goal": [0, 0], "max_steps": 9}


def test_seeds_are_seed_values_in_every_command() -> None:
    assert finetune_args("--seeds", "3", "5").seeds == [3, 5]
    compare = cli.COMMANDS["compare"].parser().parse_args(["--suite", "smoke", "--seeds", "3", "5"])
    assert compare.seeds == [3, 5]


def test_pretrain_puts_the_budget_and_seed_in_its_own_fields() -> None:
    args = cli.COMMANDS["pretrain"].parser().parse_args(["--env", "PointGoal", "--total-timesteps", "99"])
    task = cli.resolve_task(args, rename={"total_timesteps": "pretrain_timesteps"})
    assert task.pretrain_timesteps == 99 and task.total_timesteps == find_task("PointGoal").total_timesteps


def test_a_command_line_rate_or_rank_overrides_every_methods_own() -> None:
    task = find_task("MiniGrid-DoorKey").with_overrides({"method_settings": {"eva": {"r": 8, "learning_rate": 3e-3}}})
    overridden = cli.apply_flags(task, finetune_args("--rank", "2", "--lr", "1e-4"))
    eva = overridden.with_overrides(method="eva")
    assert (eva.lora.r, eva.ppo["learning_rate"]) == (2, 1e-4)
    assert task.with_overrides(method="eva").lora.r == 8, "without the flags, the method's own rank"


BAD = [
    (["--rank", "0"], "--rank 0: lora.r=0 is invalid: expected an integer >= 1"),
    (["--rank", "-1"], "--rank -1: lora.r=-1 is invalid"),
    (["--alpha", "0"], "--alpha 0.0: lora.alpha=0.0"),
    (["--rho", "0.5"], "--rho 0.5: eva.rho=0.5"),
    (["--tau", "1.5"], "--tau 1.5: eva.tau=1.5"),
    (["--eva-batch-size", "0"], "--eva-batch-size 0: EvaConfig.batch_size=0"),
    (["--total-timesteps", "0"], "--total-timesteps 0: total_timesteps=0"),
    (["--eval-freq", "0"], "--eval-freq 0: eval.freq=0"),
    (["--n-envs", "0"], "--n-envs 0: n_envs=0"),
    (["--methods", "eva,foo"], "--methods eva,foo: methods=['eva', 'foo'] is invalid"),
]


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_bad_value_is_one_error_line_before_anything_runs(
    argv: list[str], message: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_run(*_args, **_kwargs):
        raise AssertionError("the run started although an option was invalid")

    monkeypatch.setattr("eva_rl.experiments.finetune.finetune", must_not_run)
    code = cli.finetune_main(["--env", "PointGoal", "--no-progress", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in one_error_line(err)


@pytest.mark.parametrize("argv", [["--threads", "0"], ["--rank", "two"]])
def test_a_value_of_the_wrong_type_is_rejected_by_the_parser(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        finetune_args(*argv)
    assert exit_info.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_compare_methods_outside_the_suites_own_are_one_error_line(capsys: pytest.CaptureFixture) -> None:
    """smoke's methods are eva and full: lora would run at settings nobody tuned for the suite."""
    code = cli.compare_main(["--suite", "smoke", "--methods", "eva,lora", "--report-only"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and "--methods=['eva', 'lora'] is invalid" in line and "['eva', 'full']" in line


def test_the_docs_cli_reference_is_what_the_code_declares() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    start = readme.index("<!-- cli-reference")
    table = readme[readme.index("\n", start) + 1 : readme.index("<!-- /cli-reference -->")].strip()
    assert table == cli.cli_reference()


@pytest.mark.parametrize(
    ("seeds", "message"),
    [
        (["-1"], "--seeds: -1 is invalid: expected an integer in [0, 2147483647]"),
        (["0", "0"], "a seed is listed twice"),
    ],
)
def test_compare_seed_values_are_checked_before_anything_runs(
    seeds: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    try:  # a value argparse refuses exits as argparse does
        code = cli.compare_main(["--suite", "smoke", "--seeds", *seeds, "--report-only"])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    assert message in one_error_line(capsys.readouterr().err)
