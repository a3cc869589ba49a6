"""Suites: transfer tasks, methods, seeds, budget and per-method settings for the comparison harness, one YAML
file per suite in ``configs/suites/``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from eva_rl.tasks import CONFIG_DIR, METHODS, ConfigError, TaskConfig, build_config

SUITE_DIR = CONFIG_DIR / "suites"
_METHOD_SETTINGS = ("learning_rate", "r", "alpha", "rho", "tau")


@dataclass
class SuiteTask:
    """A task of a suite.

    :param task: Task name in ``configs/``.
    :param threshold: Return that counts as solved, for steps-to-threshold.
    :param total_timesteps: Budget per run for this task (defaults to the suite's, then the task's).
    """

    task: str
    threshold: float
    total_timesteps: int | None = None


@dataclass
class Suite:
    """Transfer tasks and the grid to run on them.

    :param name: Suite name; results go to ``<log-dir>/<name>/``.
    :param tasks: The tasks.
    :param methods: Methods out of ``eva, lora, full, scratch``.
    :param seeds: Number of seeds (0..n-1) or an explicit list.
    :param total_timesteps: Budget per run unless a task sets its own.
    :param method_settings: Per-method ``learning_rate``, ``r``, ``alpha``, ``rho``, ``tau`` (chosen by a tuning
        sweep on separate seeds; see the suite file's comments).
    :param eval_episodes: Episodes per evaluation, overriding the tasks'.
    :param tuning_seeds: Seeds of the tuning sweep (kept apart from ``seeds``, which report results).
    :param tuning_grid: ``{setting: [values]}`` tried for every method alike, e.g. ``{learning_rate: [...]}``.
    """

    name: str
    tasks: list[SuiteTask]
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: int | list[int] = 5
    total_timesteps: int | None = None
    method_settings: dict[str, dict[str, float]] = field(default_factory=dict)
    eval_episodes: int | None = None
    tuning_seeds: list[int] = field(default_factory=lambda: [100, 101])
    tuning_grid: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tasks = [
            t if isinstance(t, SuiteTask) else build_config(SuiteTask, t, f"suite {self.name} task") for t in self.tasks
        ]
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ConfigError(f"suite methods={self.methods!r} is invalid: expected a list out of {METHODS}")
        for method, settings in self.method_settings.items():
            unknown = sorted(set(settings) - set(_METHOD_SETTINGS))
            if method not in METHODS or unknown:
                raise ConfigError(
                    f"method_settings[{method!r}]={settings!r} is invalid: expected a method out of {METHODS} "
                    f"with keys out of {_METHOD_SETTINGS}"
                )

        unknown = sorted(set(self.tuning_grid) - set(_METHOD_SETTINGS))
        if unknown:
            raise ConfigError(f"tuning_grid keys {unknown} are invalid: expected keys out of {_METHOD_SETTINGS}")
        if set(self.tuning_seeds) & set(self.seed_list):
            raise ConfigError(f"tuning_seeds {self.tuning_seeds} overlap the result seeds {self.seed_list}")

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)


def load_suite(name_or_path: str) -> Suite:
    """A suite by name (``configs/suites/<name>.yaml``) or path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SUITE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in SUITE_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown suite {name_or_path!r}; known suites: {known}")
    data = yaml.safe_load(path.read_text()) or {}
    data.setdefault("name", path.stem)
    return build_config(Suite, data, str(path))


def method_task(task: TaskConfig, method: str, suite: Suite, suite_task: SuiteTask) -> TaskConfig:
    """``task`` with the suite's budget and the method's own hyperparameters applied."""
    settings = suite.method_settings.get(method, {})
    ppo = dict(task.ppo)
    if "learning_rate" in settings:
        ppo["learning_rate"] = float(settings["learning_rate"])
    lora = dataclasses.replace(task.lora, **{k: settings[k] for k in ("r", "alpha") if k in settings})
    eva = dataclasses.replace(task.eva, **{k: settings[k] for k in ("rho", "tau") if k in settings})
    eval_settings = (
        task.eval if suite.eval_episodes is None else dataclasses.replace(task.eval, episodes=suite.eval_episodes)
    )
    return task.override(
        total_timesteps=suite_task.total_timesteps or suite.total_timesteps,
        ppo=ppo,
        lora=lora,
        eva=eva,
        eval=eval_settings,
    )
