"""Command-line settings: each declared once, parsed and applied to the task through the same table, and a bad value
is one ``error:`` line with exit code 2 before any env is built or agent loaded."""

from __future__ import annotations

import pytest

from eva_rl.experiments import cli
from eva_rl.experiments.options import ADAPTER_OPTIONS, ENV_OPTIONS, FINETUNE_OPTIONS, PRETRAIN_OPTIONS, Option
from eva_rl.experiments.tasks import find_task
from tests.test_bad_input import one_error_line

VALID = {
    "--n-envs": ("3", 3),
    "--wrapper": ("eva_rl.wrappers:OneHotImage", ["eva_rl.wrappers:OneHotImage"]),
    "--rank": ("3", 3),
    "--alpha": ("8", 8.0),
    "--rho": ("1.5", 1.5),
    "--tau": ("0.95", 0.95),
    "--eva-batch-size": ("64", 64),
    "--methods": ("eva,lora", ["eva", "lora"]),
    "--seeds": ("4", [4]),
    "--total-timesteps": ("2048", 2048),
    "--lr": ("0.0007", 0.0007),
    "--eva-data": ("ppo", "ppo"),
    "--eval-freq": ("512", 512),
    "--eval-episodes": ("4", 4),
    "--checkpoint-freq": ("1024", 1024),
    "--algo": ("a2c", "a2c"),
    "--update-obs-stats": (None, True),
}


def field_at(task, path: str):
    section, _, key = path.rpartition(".")
    holder = getattr(task, section) if section else task
    return holder[key] if isinstance(holder, dict) else getattr(holder, key)


@pytest.mark.parametrize("option", [*ENV_OPTIONS, *ADAPTER_OPTIONS, *FINETUNE_OPTIONS], ids=lambda o: o.flags[0])
def test_each_option_parses_and_sets_its_task_field(option: Option) -> None:
    text, value = VALID[option.flags[0]]
    given = [option.flags[0]] if text is None else [option.flags[0], text]
    args = cli.finetune_parser().parse_args(["--env", "PointGoal", *given])
    task = cli.finetune_task(args)
    assert field_at(task, option.path) == value
    if option.method_setting is not None:
        assert all(option.method_setting not in settings for settings in task.method_settings.values())


def test_every_flag_is_declared_once_and_the_parsers_take_them() -> None:
    finetune_flags = [flag for option in (*ENV_OPTIONS, *ADAPTER_OPTIONS, *FINETUNE_OPTIONS) for flag in option.flags]
    assert len(finetune_flags) == len(set(finetune_flags))
    help_text = cli.finetune_parser().format_help()
    assert all(flag in help_text for flag in finetune_flags)
    pretrain = cli.pretrain_parser().parse_args(["--env", "PointGoal", "--total-timesteps", "99", "--seed", "5"])
    task = cli.apply_options(cli.resolve_task(pretrain), pretrain, PRETRAIN_OPTIONS)
    assert (task.pretrain_timesteps, task.pretrain_seed) == (99, 5)


def test_a_command_line_rate_or_rank_overrides_every_methods_own() -> None:
    task = find_task("MiniGrid-DoorKey")
    args = cli.finetune_parser().parse_args(["--env", "MiniGrid-DoorKey", "--rank", "2", "--lr", "1e-4"])
    overridden = cli.apply_options(
        task.override(method_settings={"eva": {"r": 8, "learning_rate": 3e-3}}),
        args,
        ADAPTER_OPTIONS + FINETUNE_OPTIONS,
    )
    eva = overridden.for_method("eva")
    assert (eva.lora.r, eva.ppo["learning_rate"]) == (2, 1e-4)


BAD = [
    (["--rank", "0"], "--rank 0 is invalid: LoraConfig.r=0 is invalid: expected an integer >= 1"),
    (["--rank", "-1"], "--rank -1 is invalid"),
    (["--alpha", "0"], "--alpha 0.0 is invalid: LoraConfig.alpha=0.0"),
    (["--rho", "0.5"], "--rho 0.5 is invalid: EvaConfig.rho=0.5"),
    (["--tau", "1.5"], "--tau 1.5 is invalid: EvaConfig.tau=1.5"),
    (["--eva-batch-size", "0"], "--eva-batch-size 0 is invalid: EvaConfig.batch_size=0"),
    (["--total-timesteps", "0"], "--total-timesteps 0 is invalid: total_timesteps=0"),
    (["--eval-freq", "0"], "--eval-freq 0 is invalid: eval.freq=0"),
    (["--n-envs", "0"], "--n-envs 0 is invalid: n_envs=0"),
    (["--methods", "eva,foo"], "--methods eva,foo is invalid: methods=['eva', 'foo'] is invalid"),
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
        cli.finetune_parser().parse_args(["--env", "PointGoal", *argv])
    assert exit_info.value.code == 2
    assert argv[0] in capsys.readouterr().err
