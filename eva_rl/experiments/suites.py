"""Suites: transfer tasks, methods, seeds, budget and per-method settings for the comparison harness, one YAML
file per suite in ``configs/suites/``, and the runs a suite's task and method make (:meth:`Suite.run_spec`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from eva_rl.config import _is_number
from eva_rl.errors import ConfigError
from eva_rl.experiments.published import PublishedScores
from eva_rl.experiments.runs import RunSpec, task_settings
from eva_rl.experiments.stats import RESAMPLES
from eva_rl.experiments.tasks import (
    CONFIG_DIR,
    METHOD_SETTINGS,
    SCORES,
    Seeded,
    TaskConfig,
    build_config,
    check_count,
    check_distinct,
    check_folder_name,
    check_method_settings,
    check_seeds,
    check_setting,
    check_settings,
    find_task,
    is_count,
    load_named_config,
)
from eva_rl.methods import get_method, method_names

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
    :param score: What the page compares: ``"return"`` (the mean eval return) or ``"success"`` (the share of eval
        episodes in which the env set ``info["success"]``, Meta-World's measure); ``threshold`` is on that scale.
    """

    task: str
    threshold: float
    total_timesteps: int | None = None
    eval_freq: int | None = None
    methods: list[str] | None = None
    score: str = "return"

    def __post_init__(self) -> None:
        where = f"suite task {self.task!r}"
        if not isinstance(self.task, str) or not self.task:
            raise ConfigError(f"suite task name {self.task!r} is invalid: expected a task name in configs/")
        if not _is_number(self.threshold):
            raise ConfigError(f"{where}: threshold={self.threshold!r} is invalid: expected a finite number (a return)")
        for name in ("total_timesteps", "eval_freq"):
            if getattr(self, name) is not None:
                check_count(getattr(self, name), f"{where}: {name}")
        if self.score not in SCORES:
            raise ConfigError(f"{where}: score={self.score!r} is invalid: expected one of {list(SCORES)}")


def check_tuning_grid(grid: Any, where: str) -> None:
    """:raises ConfigError: unless ``grid`` is ``{setting: [values]}`` with settings a method takes and values valid
    for them."""
    if not isinstance(grid, dict) or not all(isinstance(values, list) and values for values in grid.values()):
        raise ConfigError(f"{where}={grid!r} is invalid: expected {{setting: [values]}}")
    unknown = sorted(set(grid) - set(METHOD_SETTINGS))
    if unknown:
        raise ConfigError(f"{where} keys {unknown} are invalid: expected keys out of {METHOD_SETTINGS}")
    for key, values in grid.items():
        for value in values:
            check_setting(key, value, f"{where}[{key!r}]")


@dataclass
class RankStudy(Seeded):
    """A suite's rank study: adapter methods at several LoRA ranks on one of its tasks.

    :param task: The suite task it runs on.
    :param ranks: The ranks ``r`` (every adapted layer's; EVA methods redistribute that budget).
    :param methods: Methods whose rank means something (``lora``, ``eva``, ``lora-redist`` ...).
    :param seeds: Number of seeds (0..n-1) or an explicit list.
    :param method_settings: ``{method: {r: {setting: value}}}``: a method's settings at one rank (its learning rate
        tuned there, ``compare.py --rank-study --tune``), over the suite's ``method_settings``.
    :param controls: ``{control: method}``: a study method that takes another one's settings at every rank instead
        of a tuned rate of its own, so that the two differ in one thing (``{eva-span: eva}``: EVA's convergence test
        alone); the rank tuning leaves it out.
    :param tuning_grid: ``{setting: [values]}`` the rank tuning tries at every rank (default: the suite's
        ``tuning_grid``): a narrower grid where the suite's tuning ruled part of it out.
    """

    task: str
    ranks: list[int]
    methods: list[str] = field(default_factory=lambda: ["lora", "eva", "lora-redist"])
    seeds: int | list[int] = 5
    method_settings: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    controls: dict[str, str] = field(default_factory=dict)
    tuning_grid: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.task, str) or not self.task:
            raise ConfigError(f"rank_study.task={self.task!r} is invalid: expected a task of the suite")
        ranks = self.ranks
        if not isinstance(ranks, list) or not ranks or not all(map(is_count, ranks)) or len(set(ranks)) != len(ranks):
            raise ConfigError(f"rank_study.ranks={ranks!r} is invalid: expected a list of distinct integers >= 1")
        ranked = [m for m in method_names() if get_method(m).uses_rank]
        if not isinstance(self.methods, list) or not self.methods or set(self.methods) - set(ranked):
            raise ConfigError(
                f"rank_study.methods={self.methods!r} is invalid: expected a non-empty list out of the methods "
                f"with a rank {ranked}"
            )
        check_seeds(self.seeds, "rank_study.seeds")
        where = "rank_study.method_settings"
        if not isinstance(self.method_settings, dict) or set(self.method_settings) - set(self.methods):
            raise ConfigError(
                f"{where}={self.method_settings!r} is invalid: expected {{method: {{r: settings}}}} with methods out "
                f"of the rank study's {self.methods}"
            )
        for method, by_rank in self.method_settings.items():
            if not isinstance(by_rank, dict) or set(by_rank) - set(self.ranks):
                raise ConfigError(
                    f"{where}[{method!r}]={by_rank!r} is invalid: expected {{r: settings}} with r out of {self.ranks}"
                )
            for r, settings in by_rank.items():
                check_method_settings({method: settings}, f"{where}[{method!r}][{r}]")
        # a control takes a tuned method's settings: it names study methods and has none of its own
        controls = self.controls
        tuned = [m for m in self.methods if m not in (controls if isinstance(controls, dict) else {})]
        if (
            not isinstance(controls, dict)
            or set(controls) - set(self.methods)
            or set(controls.values()) - set(tuned)
            or set(controls) & set(self.method_settings)
        ):
            raise ConfigError(
                f"rank_study.controls={controls!r} is invalid: expected {{control: method}}, both out of the rank "
                f"study's {self.methods}, the method not a control itself and the control without method_settings "
                "of its own"
            )
        check_tuning_grid(self.tuning_grid, "rank_study.tuning_grid")

    @property
    def tuned_methods(self) -> list[str]:
        """The methods the rank tuning tunes: all but the controls."""
        return [method for method in self.methods if method not in self.controls]

    def settings_at(self, method: str, r: int) -> dict[str, float]:
        """``method``'s own settings at rank ``r`` (a control's: its method's; empty where the study gives none)."""
        return dict(self.method_settings.get(self.controls.get(method, method), {}).get(r, {}))

    @staticmethod
    def rank_overrides(r: int) -> dict[str, int]:
        """The settings of a run at rank ``r``: ``alpha = r``, so the scaling stays 1 at every rank."""
        return {"r": r, "alpha": r}


@dataclass
class Suite(Seeded):
    """Transfer tasks and the grid to run on them.

    :param name: Suite name; results go to ``<log-dir>/<name>/``.
    :param tasks: The tasks.
    :param methods: Methods out of the registered ones (:mod:`eva_rl.methods`).
    :param seeds: Number of seeds (0..n-1) or an explicit list.
    :param total_timesteps: Budget per run unless a task sets its own.
    :param method_settings: Per-method settings (:data:`~eva_rl.experiments.tasks.SETTINGS`: ``learning_rate``,
        ``r`` ...), chosen by a tuning sweep on separate seeds; see the suite file's comments.
    :param eval_episodes: Episodes per evaluation, overriding the tasks'.
    :param settings: Settings (:data:`~eva_rl.experiments.tasks.SETTINGS`) of every run of the suite, its tuning sweep
        and rank study included, before each method's own (e.g. ``eva_data: rollouts``, the data source its runs
        were made with).
    :param tuning_seeds: Seeds of the tuning sweep (kept apart from ``seeds``, which report results).
    :param tuning_grid: ``{setting: [values]}`` tried for every method alike, e.g. ``{learning_rate: [...]}``.
    :param method_tuning_grid: ``{method: {setting: [values]}}``: values one method's tuning tries besides the
        ``tuning_grid``'s, e.g. below it where that method's best was the grid's smallest (the other methods, whose
        best lay inside it, make no runs there).
    :param tuning_tasks: Tasks the tuning sweep runs on (default: all); the chosen settings apply to every task.
    :param rank_study: Methods at several ranks on one of the tasks (:class:`RankStudy`), run by
        ``compare.py --rank-study``.
    :param resamples: Bootstrap resamples behind every CI of the suite's pages, its rank study's included (default:
        rliable's 50,000).
    :param published: A paper's figures for the suite's methods (:class:`PublishedScores`), set beside the page's
        mean final score over the tasks.
    :param shares: Another suite's name: each run of this suite that is one of that suite's (the same task, agent,
        method, seed and settings) is that suite's run, read from and made in its folder, once for both pages (a
        suite that reruns one method at another learning rate shares the other methods' runs).
    """

    name: str
    tasks: list[SuiteTask]
    methods: list[str] = field(default_factory=lambda: list(method_names()))
    seeds: int | list[int] = 5
    total_timesteps: int | None = None
    method_settings: dict[str, dict[str, float]] = field(default_factory=dict)
    eval_episodes: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    tuning_seeds: list[int] = field(default_factory=lambda: [100, 101])
    tuning_grid: dict[str, list[float]] = field(default_factory=dict)
    method_tuning_grid: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    tuning_tasks: list[str] | None = None
    rank_study: RankStudy | None = None
    resamples: int = RESAMPLES
    published: PublishedScores | None = None
    shares: str | None = None

    def __post_init__(self) -> None:
        check_folder_name(self.name, "suite name")
        if self.shares is not None:
            check_folder_name(self.shares, "shares")
            if self.shares == self.name:
                raise ConfigError(f"shares={self.shares!r} is invalid: expected another suite's name than its own")
            self.shared_suite  # noqa: B018 - loaded now: a bad name is an error before any run is planned
        if not isinstance(self.tasks, list) or not self.tasks:
            raise ConfigError(f"suite {self.name} tasks={self.tasks!r} is invalid: expected a non-empty list")
        self.tasks = [
            t if isinstance(t, SuiteTask) else build_config(SuiteTask, t, f"suite {self.name} task") for t in self.tasks
        ]
        # Each field's type and range first, then what the fields must agree on (tasks, seeds, the rank study).
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
        check_settings(self.settings, "settings")
        check_seeds(self.seeds, "seeds")
        for name in ("total_timesteps", "eval_episodes", "resamples"):
            if getattr(self, name) is not None:
                check_count(getattr(self, name), name)
        check_tuning_grid(self.tuning_grid, "tuning_grid")
        self._check_method_tuning_grid()
        names = [t.task for t in self.tasks]
        check_distinct(names, f"suite {self.name} tasks")
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
        if self.published is not None and not isinstance(self.published, PublishedScores):
            self.published = build_config(PublishedScores, self.published, "published")
        if self.published is not None:
            _check_subset("published: scores", list(self.published.scores), self.methods, f"{self.methods}")

    def _check_method_tuning_grid(self) -> None:
        extra = self.method_tuning_grid
        if not isinstance(extra, dict) or set(extra) - set(self.methods):
            raise ConfigError(
                f"method_tuning_grid={extra!r} is invalid: expected {{method: {{setting: [values]}}}} with methods out "
                f"of the suite's {self.methods}"
            )
        for method, grid in extra.items():
            where = f"method_tuning_grid[{method!r}]"
            check_tuning_grid(grid, where)
            # one tuned setting per sweep, the one the sensitivity plot draws: a method tries more of its values
            if set(grid) - set(self.tuning_grid):
                raise ConfigError(
                    f"{where} keys {sorted(set(grid) - set(self.tuning_grid))} are invalid: expected keys out of "
                    f"tuning_grid's {sorted(self.tuning_grid)}"
                )

    def tuning_grid_of(self, method: str) -> dict[str, list[float]]:
        """The grid ``method``'s tuning tries: ``tuning_grid`` with ``method_tuning_grid``'s values for it, sorted."""
        extra = self.method_tuning_grid.get(method, {})
        return {key: sorted(set(values) | set(extra.get(key, []))) for key, values in self.tuning_grid.items()}

    def tuning_grid_over(self, methods: Sequence[str] | None = None) -> dict[str, list[float]]:
        """Every value the tuning of some of ``methods`` (default: the suite's) tries, sorted: the tuning page's
        x-axis."""
        grids = [self.tuning_grid_of(method) for method in methods or self.methods]
        return {key: sorted({value for grid in grids for value in grid[key]}) for key in self.tuning_grid}

    def tuning_folder(self, log_dir: Path) -> Path:
        """Where ``compare.py --tune`` writes the suite's tuning page (``tuning.json``, ``sensitivity.png``)."""
        return Path(log_dir) / f"{self.name}-tuning"

    def untuned(self, methods: Sequence[str] | None = None) -> dict[str, list[str]]:
        """Of ``methods`` (default: the suite's), each one ``method_settings`` gives no value of a ``tuning_grid``
        setting, with those settings: its runs take the task's value (or ``settings``'), which no tuning chose."""
        missing = {
            m: sorted(set(self.tuning_grid) - set(self.method_settings.get(m, {}))) for m in methods or self.methods
        }
        return {m: keys for m, keys in missing.items() if keys}

    def score_of(self, task: str) -> str:
        """What the page compares on ``task``: ``"return"`` or ``"success"`` (its :class:`SuiteTask`'s score)."""
        return next(t.score for t in self.tasks if t.task == task)

    def check_methods(self, methods: Sequence[str]) -> None:
        """:raises ConfigError: if ``methods`` (a command line's choice) is empty or names a method outside the suite's
        own (their settings were chosen for this suite; another method would run untuned)."""
        _check_subset("--methods", list(methods), self.methods, f"the suite's methods {self.methods}")

    def task_methods(self, suite_task: SuiteTask, methods: Sequence[str] | None = None) -> list[str]:
        """The methods run on ``suite_task``: ``methods`` (default: the suite's), less those the task leaves out."""
        return [m for m in methods or self.methods if suite_task.methods is None or m in suite_task.methods]

    def low_rank_methods(self, suite_task: SuiteTask, methods: Sequence[str] | None = None) -> list[str]:
        """The methods of ``suite_task`` whose update is ``scaling * B A`` (``Method.low_rank_update``): those
        ``--anatomy`` and ``--first-update`` measure."""
        return [m for m in self.task_methods(suite_task, methods) if get_method(m).low_rank_update]

    def task(self, suite_task: SuiteTask) -> TaskConfig:
        """The task file of ``suite_task``.

        :raises ConfigError: if ``configs/`` has no such task.
        """
        task = find_task(suite_task.task)
        if task is None:
            raise ConfigError(f"suite {self.name}: task {suite_task.task!r} is not in configs/")
        return task

    def run_spec(
        self,
        suite_task: SuiteTask,
        method: str,
        seed: int,
        log_dir: Path,
        settings: Mapping[str, Any] | None = None,
        device: str = "cpu",
    ) -> RunSpec:
        """The run of ``method`` and ``seed`` on ``suite_task``: the task with the method's settings (the task's,
        then ``settings``, by default the suite's) and the suite's budget and evaluation, under ``log_dir``."""
        task = self.task(suite_task)
        given = {
            "total_timesteps": suite_task.total_timesteps or self.total_timesteps,
            "eval_episodes": self.eval_episodes,
            "eval_freq": suite_task.eval_freq,
        }
        overrides = {
            **self.settings,
            **(self.method_settings.get(method, {}) if settings is None else settings),
            **{name: value for name, value in given.items() if value is not None},
        }
        run_task = task.with_overrides(overrides, method=method, where=f"suite {self.name}, {method}")
        return RunSpec(run_task, method, seed, log_dir, task.agent_path, device)

    def run_specs(
        self, log_dir: Path, methods: Sequence[str] | None = None, seeds: Sequence[int] | None = None
    ) -> list[tuple[SuiteTask, RunSpec]]:
        """Every (task, method, seed) run of the suite, writing under ``<log_dir>/<suite>/``, or under the folder of
        the suite it :attr:`shares` where the run is that suite's."""
        specs = []
        for suite_task in self.tasks:
            for seed in seeds or self.seed_list:
                for method in self.task_methods(suite_task, methods):
                    own = self.run_spec(suite_task, method, seed, log_dir / self.name)
                    shared = None if self.shares is None else self.shared_suite.same_run(own, log_dir)
                    specs.append((suite_task, shared or own))
        return specs

    @cached_property
    def shared_suite(self) -> Suite:
        """The suite this one :attr:`shares` runs with.

        :raises ConfigError: if there is none, or it shares another's runs itself (share that one's directly).
        """
        if self.shares is None:
            raise ConfigError(f"suite {self.name} shares no other suite's runs")
        try:
            other = load_suite(self.shares)
        except ConfigError as error:
            raise ConfigError(f"suite {self.name}: shares={self.shares!r} is invalid: {error}") from None
        if other.shares is not None:
            raise ConfigError(
                f"suite {self.name}: shares={self.shares!r} is invalid: that suite shares suite {other.shares!r}'s "
                f"runs itself; expected the suite that makes them (shares: {other.shares})"
            )
        return other

    def same_run(self, own: RunSpec, log_dir: Path) -> RunSpec | None:
        """This suite's run under ``<log_dir>/<suite>/`` that is ``own`` (the same agent file, task, method, seed and
        :func:`~eva_rl.experiments.runs.task_settings`), or ``None``: how another suite or a sequence shares it."""
        if own.seed not in self.seed_list:
            return None
        wanted = task_settings(own)
        for suite_task in self.tasks:
            if own.method not in self.task_methods(suite_task):
                continue
            if self.task(suite_task).target_env != own.task.target_env:
                continue  # the cheap test first: a suite of ten tasks, a sequence of ten stages
            spec = self.run_spec(suite_task, own.method, own.seed, Path(log_dir) / self.name, None, own.device)
            if spec.agent_path.resolve() == own.agent_path.resolve() and task_settings(spec) == wanted:
                return spec
        return None


def _check_subset(what: str, values: list[str], allowed: Sequence[str], accepted: str) -> None:
    """:raises ConfigError: if ``values`` is empty, holds a value outside ``allowed`` or one twice (a run would be
    counted twice)."""
    if not isinstance(values, list) or not values or set(values) - set(allowed):
        raise ConfigError(f"{what}={values!r} is invalid: expected a non-empty list out of {accepted}")
    check_distinct(values, what)


def load_suite(name_or_path: str) -> Suite:
    """A suite by name (``configs/suites/<name>.yaml``) or path."""
    return load_named_config(Suite, SUITE_DIR, name_or_path, "suite")
