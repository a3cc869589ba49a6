"""Suites: transfer tasks, methods, seeds, budget and per-method settings for the comparison harness, one YAML
file per suite in ``configs/suites/``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from eva_rl.config import _is_number
from eva_rl.errors import ConfigError
from eva_rl.experiments.ranks import RankStudy
from eva_rl.experiments.tasks import (
    CONFIG_DIR,
    METHOD_SETTINGS,
    TaskConfig,
    build_config,
    check_method_settings,
    check_seeds,
    load_named_config,
)
from eva_rl.methods import method_names

SUITE_DIR = CONFIG_DIR / "suites"


@dataclass
class SuiteTask:
    """A task of a suite.

    :param task: Task name in ``configs/``.
    :param threshold: Return that counts as solved, for steps-to-threshold.
    :param total_timesteps: Budget per run for this task (defaults to the suite's, then the task's).
    :param eval_freq: Env steps between evaluations for this task (defaults to the task's).
    :param methods: The suite's methods that run on this task (default: all of them), so a costly method zoo can
        run on one task while the core methods run on every task.
    """

    task: str
    threshold: float
    total_timesteps: int | None = None
    eval_freq: int | None = None
    methods: list[str] | None = None

    def __post_init__(self) -> None:
        where = f"suite task {self.task!r}"
        if not isinstance(self.task, str) or not self.task:
            raise ConfigError(f"suite task name {self.task!r} is invalid: expected a task name in configs/")
        if not _is_number(self.threshold):
            raise ConfigError(f"{where}: threshold={self.threshold!r} is invalid: expected a finite number (a return)")
        for name in ("total_timesteps", "eval_freq"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{where}: {name}={value!r} is invalid: expected an integer >= 1")


@dataclass
class Suite:
    """Transfer tasks and the grid to run on them.

    :param name: Suite name; results go to ``<log-dir>/<name>/``.
    :param tasks: The tasks.
    :param methods: Methods out of the registered ones (:mod:`eva_rl.methods`).
    :param seeds: Number of seeds (0..n-1) or an explicit list.
    :param total_timesteps: Budget per run unless a task sets its own.
    :param method_settings: Per-method ``learning_rate``, ``r``, ``alpha``, ``rho``, ``tau`` (chosen by a tuning
        sweep on separate seeds; see the suite file's comments).
    :param eval_episodes: Episodes per evaluation, overriding the tasks'.
    :param tuning_seeds: Seeds of the tuning sweep (kept apart from ``seeds``, which report results).
    :param tuning_grid: ``{setting: [values]}`` tried for every method alike, e.g. ``{learning_rate: [...]}``.
    :param tuning_tasks: Tasks the tuning sweep runs on (default: all); the chosen settings apply to every task.
    :param rank_study: Methods at several ranks on one of the tasks (:class:`~eva_rl.experiments.ranks.RankStudy`),
        run by ``compare.py --rank-study``.
    """

    name: str
    tasks: list[SuiteTask]
    methods: list[str] = field(default_factory=lambda: list(method_names()))
    seeds: int | list[int] = 5
    total_timesteps: int | None = None
    method_settings: dict[str, dict[str, float]] = field(default_factory=dict)
    eval_episodes: int | None = None
    tuning_seeds: list[int] = field(default_factory=lambda: [100, 101])
    tuning_grid: dict[str, list[float]] = field(default_factory=dict)
    tuning_tasks: list[str] | None = None
    rank_study: RankStudy | None = None

    def __post_init__(self) -> None:
        self.tasks = [
            t if isinstance(t, SuiteTask) else build_config(SuiteTask, t, f"suite {self.name} task") for t in self.tasks
        ]
        _check_subset("suite methods", self.methods, method_names(), f"{method_names()}")
        for suite_task in self.tasks:
            if suite_task.methods is not None:
                _check_subset(
                    f"suite {self.name} task {suite_task.task}: methods",
                    suite_task.methods,
                    self.methods,
                    f"the suite's methods {self.methods}",
                )
        check_method_settings(self.method_settings, "method_settings")
        check_seeds(self.seeds, "seeds")
        for name in ("total_timesteps", "eval_episodes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name}={value!r} is invalid: expected an integer >= 1")
        if not isinstance(self.tuning_grid, dict) or not all(
            isinstance(values, list) and values for values in self.tuning_grid.values()
        ):
            raise ConfigError(f"tuning_grid={self.tuning_grid!r} is invalid: expected {{setting: [values]}}")
        for key, values in self.tuning_grid.items():
            for value in values if key in METHOD_SETTINGS else ():
                check_method_settings({self.methods[0]: {key: value}}, f"tuning_grid[{key!r}]")

        unknown = sorted(set(self.tuning_grid) - set(METHOD_SETTINGS))
        if unknown:
            raise ConfigError(f"tuning_grid keys {unknown} are invalid: expected keys out of {METHOD_SETTINGS}")
        names = [t.task for t in self.tasks]
        if self.tuning_tasks is not None:
            _check_subset("tuning_tasks", self.tuning_tasks, names, f"{names}")
        if set(self.tuning_seeds) & set(self.seed_list):
            raise ConfigError(f"tuning_seeds {self.tuning_seeds} overlap the result seeds {self.seed_list}")
        if self.rank_study is not None and not isinstance(self.rank_study, RankStudy):
            if not isinstance(self.rank_study, dict):
                raise ConfigError(
                    f"rank_study={self.rank_study!r} is invalid: expected a mapping with task, ranks, methods, seeds"
                )
            self.rank_study = build_config(RankStudy, self.rank_study, "rank_study")
        if self.rank_study is not None:
            if self.rank_study.task not in names:
                raise ConfigError(f"rank_study.task={self.rank_study.task!r} is invalid: expected one of {names}")
            if set(self.tuning_seeds) & set(self.rank_study.seed_list):
                raise ConfigError(
                    f"tuning_seeds {self.tuning_seeds} overlap the rank study's seeds {self.rank_study.seed_list}"
                )

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    def check_methods(self, methods: Sequence[str]) -> None:
        """:raises ConfigError: if ``methods`` (a command line's choice) is empty or names an unknown method."""
        _check_subset("--methods", list(methods), method_names(), f"{method_names()}")

    def task_methods(self, suite_task: SuiteTask, methods: list[str] | None = None) -> list[str]:
        """The methods run on ``suite_task``: ``methods`` (default: the suite's), less those the task leaves out."""
        return [m for m in methods or self.methods if suite_task.methods is None or m in suite_task.methods]


def _check_subset(what: str, values: list[str], allowed: Sequence[str], accepted: str) -> None:
    """:raises ConfigError: if ``values`` is empty or holds a value outside ``allowed``."""
    if not values or set(values) - set(allowed):
        raise ConfigError(f"{what}={values!r} is invalid: expected a non-empty list out of {accepted}")


def load_suite(name_or_path: str) -> Suite:
    """A suite by name (``configs/suites/<name>.yaml``) or path."""
    return load_named_config(Suite, SUITE_DIR, name_or_path, "suite")


def method_task(task: TaskConfig, method: str, suite: Suite, suite_task: SuiteTask) -> TaskConfig:
    """``task`` with the suite's budget and the method's own hyperparameters applied."""
    task = task.for_method(method, suite.method_settings.get(method))
    eval_changes = {"episodes": suite.eval_episodes, "freq": suite_task.eval_freq}
    eval_settings = dataclasses.replace(task.eval, **{k: v for k, v in eval_changes.items() if v is not None})
    return task.override(total_timesteps=suite_task.total_timesteps or suite.total_timesteps, eval=eval_settings)
