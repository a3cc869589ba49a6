"""Continual sequences: a base task and the tasks learned one after the other from its agent, one YAML file per
sequence in ``configs/sequences/`` (run by ``eva-rl continual``, :mod:`eva_rl.experiments.studies.continual`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from eva_rl.errors import ConfigError
from eva_rl.experiments.published import PublishedApproaches
from eva_rl.experiments.stats import RESAMPLES
from eva_rl.experiments.tasks import (
    CONFIG_DIR,
    SCORES,
    Seeded,
    build_config,
    check_count,
    check_distinct,
    check_folder_name,
    check_method_settings,
    check_seeds,
    check_settings,
    is_count,
    load_named_config,
)
from eva_rl.methods import get_method, method_names

SEQUENCE_DIR = CONFIG_DIR / "sequences"


@dataclass
class Stage:
    """One task of a sequence.

    :param env: The stage's env (a registered id); the base task's wrappers and algorithm settings apply.
    :param total_timesteps: Fine-tuning budget of the stage.
    :param name: Short name (default: the id without ``MiniGrid-`` and the version).
    :param env_kwargs: The env's keyword arguments.
    """

    env: str
    total_timesteps: int
    name: str | None = None
    env_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.env, str) or not self.env:
            raise ConfigError(f"stage env={self.env!r} is invalid: expected an env id")
        check_count(self.total_timesteps, f"stage {self.env}: total_timesteps")
        if self.name is None:
            self.name = re.sub(r"^MiniGrid-|-v\d+$", "", self.env)
        check_folder_name(self.name, "stage name")
        if not isinstance(self.env_kwargs, dict):
            raise ConfigError(f"stage {self.env}: env_kwargs={self.env_kwargs!r} is invalid: expected a mapping")


@dataclass
class ContinualSequence(Seeded):
    """A continual benchmark.

    :param name: Results go to ``<log-dir>/<name>/``.
    :param base_task: Task in ``configs/`` whose agent is the base and whose settings every stage uses.
    :param stages: The tasks, in order.
    :param methods: Adapter methods, each building a bank.
    :param seeds: Number of seeds (0..n-1) or a list.
    :param sequential: Also fine-tune one network stage after stage (``full-seq``).
    :param eval_episodes: Episodes per evaluation (default: the base task's).
    :param eval_freq: Env steps between evaluations in every stage (default: the base task's), at most a stage's
        budget.
    :param settings: Settings (:data:`~eva_rl.experiments.tasks.SETTINGS`) of every run, before each method's own.
    :param method_settings: Per-method settings (``learning_rate``, ``r`` ...) as in suites (``full`` included).
    :param signature_steps: Env steps of the base policy in each stage's env that make the stage's signature
        (:meth:`~eva_rl.bank.AdapterBank.set_signature`).
    :param selection_steps: Unlabelled env steps :meth:`~eva_rl.bank.AdapterBank.identify` is measured with.
    :param selection_trials: Rollouts (other seeds than the signature's) per stage and step count.
    :param score: What the page compares: ``"return"``, or ``"success"`` (the share of episodes in which the env set
        ``info["success"]``, Meta-World's).
    :param continual_world: Also train every stage from scratch (the single-task reference) and report Continual
        World's forgetting and forward transfer (Wołczyk et al. 2021) beside the page's own; needs ``score:
        success``, since its forward transfer normalizes by ``1 - AUC`` of a score in [0, 1].
    :param suite: A suite (name or path) whose runs this sequence shares: a stage's run from the base is the suite's
        run of the same method and seed on the same env wherever the two agree in every setting that decides a run
        (the agent, the env, the budget, the evaluation, the method's settings), so a benchmark that is both a suite
        and a sequence (CW10) trains those runs once; elsewhere the sequence makes its own. The suite's ``settings``
        and ``method_settings`` (its tuned learning rates) apply to every run of the sequence under the sequence's
        own.
    :param published: Published approaches' figures (:class:`~eva_rl.experiments.published.PublishedApproaches`:
        Continual World's average success, forgetting, forward transfer) the page sets beside its own.
    :param resamples: Bootstrap resamples behind every CI of the page (default: rliable's 50,000).
    """

    name: str
    base_task: str
    stages: list[Stage]
    methods: list[str] = field(default_factory=lambda: ["eva", "lora"])
    seeds: int | list[int] = 5
    sequential: bool = True
    eval_episodes: int | None = None
    eval_freq: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    method_settings: dict[str, dict[str, float]] = field(default_factory=dict)
    signature_steps: int = 1024
    selection_steps: list[int] = field(default_factory=lambda: [16, 64, 256])
    selection_trials: int = 4
    score: str = "return"
    continual_world: bool = False
    suite: str | None = None
    published: PublishedApproaches | None = None
    resamples: int = RESAMPLES

    def __post_init__(self) -> None:
        # each field's type and range, then what the fields must agree on (the score and Continual World's metrics)
        check_folder_name(self.name, "sequence name")
        for name in ("signature_steps", "selection_trials", "resamples"):
            check_count(getattr(self, name), name)
        steps = self.selection_steps
        if not isinstance(steps, list) or not steps or not all(map(is_count, steps)):
            raise ConfigError(f"selection_steps={steps!r} is invalid: expected a list of integers >= 1")
        if not isinstance(self.stages, list) or len(self.stages) < 2:
            raise ConfigError(f"stages={self.stages!r} is invalid: expected a list of at least two stages")
        self.stages = [
            s if isinstance(s, Stage) else build_config(Stage, s, f"sequence {self.name} stage") for s in self.stages
        ]
        check_distinct([s.name for s in self.stages], "stage names")
        adapters = [m for m in method_names() if get_method(m).adapters]
        if not isinstance(self.methods, list) or not self.methods or set(self.methods) - set(adapters):
            raise ConfigError(f"methods={self.methods!r} is invalid: expected a non-empty list out of {adapters}")
        check_distinct(self.methods, "methods")
        check_seeds(self.seeds, "seeds")
        if not isinstance(self.sequential, bool):
            raise ConfigError(f"sequential={self.sequential!r} is invalid: expected true or false")
        for name in ("eval_episodes", "eval_freq"):
            if getattr(self, name) is not None:
                check_count(getattr(self, name), name)
        check_settings(self.settings, "settings")
        check_method_settings(self.method_settings, "method_settings")
        if self.score not in SCORES:
            raise ConfigError(f"score={self.score!r} is invalid: expected one of {list(SCORES)}")
        if not isinstance(self.continual_world, bool):
            raise ConfigError(f"continual_world={self.continual_world!r} is invalid: expected true or false")
        if self.continual_world and self.score != "success":
            raise ConfigError(
                "continual_world=true is invalid with score='return': Continual World's forward transfer is defined "
                "on success rates in [0, 1]; set score: success"
            )
        if self.suite is not None and (not isinstance(self.suite, str) or not self.suite):
            raise ConfigError(f"suite={self.suite!r} is invalid: expected a suite's name in configs/suites/ or a path")
        if self.published is not None and not isinstance(self.published, PublishedApproaches):
            self.published = build_config(PublishedApproaches, self.published, "published")


def load_sequence(name_or_path: str) -> ContinualSequence:
    """A sequence by name (``configs/sequences/<name>.yaml``) or path."""
    return load_named_config(ContinualSequence, SEQUENCE_DIR, name_or_path, "sequence")
