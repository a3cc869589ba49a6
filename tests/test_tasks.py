"""``TaskConfig.with_overrides``: the one way a run's task is derived from a task file."""

from __future__ import annotations

import pytest

from eva_rl.errors import ConfigError
from eva_rl.experiments.tasks import SETTINGS, EvalSettings, find_task


@pytest.fixture
def task():
    settings = {"eva": {"learning_rate": 3e-3, "r": 2}, "full": {"learning_rate": 5e-4}}
    return find_task("PointGoal").with_overrides({"method_settings": settings})


@pytest.mark.parametrize(
    ("name", "value"),
    [("learning_rate", 7e-4), ("r", 3), ("alpha", 8.0), ("rho", 1.5), ("tau", 0.9), ("n_envs", 2),
     ("total_timesteps", 2048), ("checkpoint_freq", 512), ("eval_freq", 256), ("eval_episodes", 3)],
)  # fmt: skip
def test_each_short_name_sets_the_field_its_path_names(task, name: str, value) -> None:
    section, _, key = SETTINGS[name].path.partition(".")
    derived = task.with_overrides({name: value})
    holder = getattr(derived, section)
    got = (holder[key] if isinstance(holder, dict) else getattr(holder, key)) if key else holder
    assert got == value and type(got) is type(value)
    assert all(name not in settings for settings in derived.method_settings.values()), "the override is final"
    assert task.with_overrides({SETTINGS[name].path: value}) == derived, "the dotted path is the same setting"


def test_a_methods_settings_apply_first_and_the_overrides_win(task) -> None:
    eva = task.with_overrides(method="eva")
    assert (eva.ppo["learning_rate"], eva.lora.r) == (3e-3, 2)
    assert task.with_overrides({"r": 5}, method="eva").lora.r == 5
    lora = task.with_overrides(method="lora")
    assert lora.ppo == task.ppo and lora.lora == task.lora, "a method without settings runs the task as written"
    full = task.with_overrides({"learning_rate": 1e-4}).with_overrides(method="full")
    assert full.ppo["learning_rate"] == 1e-4, "a command-line rate applies to every method"
    assert task.ppo["learning_rate"] != 1e-4 and task.method_settings["full"], "the task itself is unchanged"


def test_dotted_paths_reach_mappings_and_whole_fields(task) -> None:
    derived = task.with_overrides(
        {"ppo.gamma": 0.9, "env_kwargs.size": 5, "name": "other", "eval": EvalSettings(episodes=2), "eval.seed": 7}
    )
    assert derived.ppo["gamma"] == 0.9 and derived.ppo["n_steps"] == task.ppo["n_steps"]
    assert derived.env_kwargs["size"] == 5 and derived.name == "other"
    assert (derived.eval.episodes, derived.eval.seed) == (2, 7), "a dotted path applies over a whole section given"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"r": 0}, "--rank 0: lora.r=0 is invalid: expected an integer >= 1"),
        ({"learning_rate": "fast"}, "ppo.learning_rate='fast' is invalid"),
        ({"lr": 1e-3}, "unknown setting 'lr': expected one of ['learning_rate', 'r'"),
        ({"lora.rank": 2}, "--rank 0 is invalid: "),
        ({"n_envs.x": 2}, "unknown setting 'n_envs.x'"),
        ({"eval_episodes": True}, "eval.episodes=True is invalid"),
    ],
)
def test_a_bad_override_is_one_error_naming_where_it_came_from(task, overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        task.with_overrides(overrides, where="--rank 0")
    assert message in str(error.value) and "\n" not in str(error.value)


def _write(folder, name: str, text: str):
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def test_a_variant_states_what_differs_from_its_base(tmp_path) -> None:
    from eva_rl.experiments.tasks import load_task

    _write(
        tmp_path,
        "small",
        "target_env: CartPole-v1\npolicy_kwargs: {net_arch: [8], activation_fn: 'torch.nn:ReLU'}\n"
        "ppo: {n_steps: 64, batch_size: 32}\nlora: {r: 4}\n",
    )
    big = load_task(_write(tmp_path, "big", "base: small\npolicy_kwargs: {net_arch: [512]}\nppo: {n_steps: 128}\n"))
    assert big.name == "big" and big.target_env == "CartPole-v1" and big.lora.r == 4
    # mappings merge key by key; a list replaces the base's
    assert big.policy_kwargs == {"net_arch": [512], "activation_fn": "torch.nn:ReLU"}
    assert big.ppo == {"n_steps": 128, "batch_size": 32}


@pytest.mark.parametrize(
    ("base", "message"),
    [
        ("zz", r"base='zz' is invalid: expected the name of a task file beside it; one of \['loop', 'other'"),
        ("othr", "base='othr' is invalid: expected the name of a task file beside it; did you mean 'other'?"),
        ("loop", "returns to"),
    ],
)
def test_a_bad_base_is_one_error_naming_it(tmp_path, base: str, message: str) -> None:
    from eva_rl.experiments.tasks import load_task

    _write(tmp_path, "other", "base: loop\ntarget_env: CartPole-v1\n")
    _write(tmp_path, "loop", "base: other\ntarget_env: CartPole-v1\n")
    with pytest.raises(ConfigError, match=message):
        load_task(_write(tmp_path, "task", f"base: {base}\n"))


def test_a_target_env_finds_the_task_before_its_variants() -> None:
    assert find_task("MiniGrid-DoorKey-8x8-v0").name == "MiniGrid-DoorKey"
    assert find_task("HalfCheetah-FrontThighOff-v0").name == "HalfCheetah-FrontThighOff"


def test_a_target_env_finds_the_task_it_names_before_a_base_on_the_same_target(tmp_path) -> None:
    # the base sorts first (upper case before lower) and fine-tunes on the same target as its first task
    _write(tmp_path, "Grid-Base", "target_env: Grid-hammer-v3\n")
    _write(tmp_path, "Grid-hammer", "base: Grid-Base\ntarget_env: Grid-hammer-v3\n")
    assert find_task("Grid-hammer-v3", tmp_path).name == "Grid-hammer"
    assert find_task("Grid-Base", tmp_path).name == "Grid-Base"
    assert find_task("Grid-other-v3", tmp_path) is None


def test_a_rate_written_without_a_dot_reads_as_a_number(tmp_path) -> None:
    from eva_rl.experiments.suites import load_suite
    from eva_rl.experiments.tasks import load_task

    # PyYAML (YAML 1.1) reads `1e-3` as a string; every config a learning rate is written in reads it as a number
    task = load_task(_write(tmp_path, "task", "target_env: CartPole-v1\nppo: {learning_rate: 3e-4, ent_coef: 1E-2}\n"))
    assert task.ppo["learning_rate"] == 3e-4 and task.ppo["ent_coef"] == 0.01
    suite_text = (
        "methods: [eva, lora]\ntasks: [{task: PointGoal, threshold: 5e1}]\ntuning_grid: {learning_rate: [1e-3]}\n"
    )
    suite = load_suite(str(_write(tmp_path, "suite", suite_text)))
    assert suite.tuning_grid == {"learning_rate": [1e-3]} and suite.tasks[0].threshold == 50.0
    # and a value that only looks like one stays the string it is
    named = load_task(_write(tmp_path, "named", "target_env: CartPole-v1\nenv_kwargs: {layout: 1e3x}\n"))
    assert named.env_kwargs == {"layout": "1e3x"}
