"""Command-line settings, each declared once: its flag, type and help build the parser, and its path says which
field of the task (:class:`~eva_rl.experiments.tasks.TaskConfig`) it overrides.

A value given on the command line is validated by the same dataclass that validates the task file, so a bad one
(``--rank 0``, ``--tau 1.5``) is a :class:`~eva_rl.errors.ConfigError` naming the flag, never silently replaced.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from eva_rl.errors import ConfigError
from eva_rl.experiments.tasks import TaskConfig
from eva_rl.loading import ALGORITHMS
from eva_rl.methods import method_names


class CommandParser(argparse.ArgumentParser):
    """``argparse`` whose errors (an unknown flag, a missing ``--env``, a value of the wrong type) end like every other
    bad input: one ``error:`` line and exit code 2, instead of the usage block and a second line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def comma_list(value: str) -> list[str]:
    """``"eva, full"`` -> ``["eva", "full"]``."""
    return [item.strip() for item in value.split(",") if item.strip()]


@dataclass(frozen=True)
class Option:
    """One command-line setting that overrides a task field.

    :param flags: The flag and its aliases (``("--seeds", "--seed")``).
    :param path: The task field it sets: ``"total_timesteps"``, or ``"<section>.<field>"`` for a field of the
        ``lora``, ``eva`` or ``eval`` settings or a key of the ``ppo`` arguments.
    :param type: Parses the command-line string (``None`` for a flag, ``action="store_true"``).
    :param help: The ``--help`` text.
    :param method_setting: The ``method_settings`` key it overrides for every method (a learning rate given on the
        command line applies to all methods, not only those without their own).
    :param nargs: ``argparse``'s ``nargs``.
    :param action: ``argparse``'s ``action`` (``"append"``, ``"extend"``).
    :param choices: Accepted values.
    :param metavar: Placeholder in the help text.
    """

    flags: tuple[str, ...]
    path: str
    type: Callable[[str], Any] | None
    help: str
    method_setting: str | None = None
    nargs: str | None = None
    action: str | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.flags[0].lstrip("-").replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        extra = {
            k: v
            for k, v in {
                "nargs": self.nargs,
                "action": self.action,
                "choices": self.choices,
                "metavar": self.metavar,
            }.items()
            if v is not None
        }
        if self.type is not None:
            extra["type"] = self.type
        parser.add_argument(*self.flags, dest=self.dest, help=self.help, default=None, **extra)

    def apply(self, task: TaskConfig, value: Any) -> TaskConfig:
        """``task`` with this option's field set to ``value`` (and validated again).

        :raises ConfigError: naming the flag and the value when the task's validation rejects it.
        """
        section, _, key = self.path.rpartition(".")
        try:
            if not section:
                task = task.override(**{key: value})
            else:
                current = getattr(task, section)
                if isinstance(current, dict):
                    updated = {**current, key: value}
                else:
                    updated = dataclasses.replace(current, **{key: value})
                task = task.override(**{section: updated})
        except ConfigError as error:
            raise ConfigError(f"{self.flags[0]} {_shown(value)} is invalid: {error}") from error
        if self.method_setting is not None:
            task = task.without_method_settings([self.method_setting])
        return task


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


ENV_OPTIONS = (
    Option(("--n-envs",), "n_envs", int, "parallel envs for PPO"),
    Option(
        ("--wrapper",), "wrappers", str, "observation wrapper (repeatable)", action="append", metavar="MODULE:CLASS"
    ),
)
"""How the target env is vectorized and encoded (every command that builds it)."""

ADAPTER_OPTIONS = (
    Option(("--rank",), "lora.r", int, "LoRA rank r per layer (EVA's budget is r x layers)", method_setting="r"),
    Option(("--alpha",), "lora.alpha", float, "LoRA alpha (scaling alpha/r)", method_setting="alpha"),
    Option(("--rho",), "eva.rho", float, "EVA rank redistribution factor (>= 1)", method_setting="rho"),
    Option(("--tau",), "eva.tau", float, "EVA convergence threshold, cosine in [0, 1]", method_setting="tau"),
    Option(("--eva-batch-size",), "eva.batch_size", int, "env steps per EVA batch"),
    Option(
        ("--algo",),
        "algo",
        str,
        "algorithm to fine-tune with (default: the one that saved the agent; PPO and A2C agents take either)",
        choices=tuple(ALGORITHMS),
    ),
)
"""The adapters and EVA (``finetune`` and ``inspect``)."""

FINETUNE_OPTIONS = (
    Option(("--methods",), "methods", comma_list, f"comma list out of {','.join(method_names())} (default eva,full)"),
    Option(("--seeds", "--seed"), "seeds", int, "one or more seeds", nargs="+", action="extend"),
    Option(("--total-timesteps",), "total_timesteps", int, "fine-tuning budget per run"),
    Option(
        ("--lr",),
        "ppo.learning_rate",
        float,
        "learning rate for every method (default: the task's per-method learning rates)",
        method_setting="learning_rate",
    ),
    Option(
        ("--eva-data",),
        "eva.data_source",
        str,
        "EVA's data: its own rollouts before PPO (default), or PPO's first rollouts (no extra env steps)",
        choices=("rollouts", "ppo"),
    ),
    Option(("--eval-freq",), "eval.freq", int, "env steps between evaluations"),
    Option(("--eval-episodes",), "eval.episodes", int, "episodes per evaluation"),
    Option(("--checkpoint-freq",), "checkpoint_freq", int, "env steps between checkpoints"),
    Option(
        ("--update-obs-stats",),
        "update_obs_stats",
        None,
        "let an agent's VecNormalize statistics keep updating while fine-tuning (rl-zoo3's continued training); "
        "by default they stay as pretrained",
        action="store_true",
    ),
)
"""The fine-tuning runs (``finetune``)."""

PRETRAIN_OPTIONS = (
    Option(("--total-timesteps",), "pretrain_timesteps", int, "training budget (default: the task's)"),
    Option(("--seed",), "pretrain_seed", int, "seed (default: the task's)"),
    Option(
        ("--policy",),
        "policy",
        str,
        "SB3 policy (default: the task's, else MlpPolicy; MultiInputPolicy for Dict observations, CnnPolicy for "
        "images)",
    ),
    Option(
        ("--algo",), "algo", str, "algorithm to train with (default: the task's, else ppo)", choices=tuple(ALGORITHMS)
    ),
)
"""The source agent's training (``pretrain``)."""


def add_options(parser: argparse.ArgumentParser, options: Sequence[Option], title: str | None = None) -> None:
    """Declare ``options`` on ``parser`` (in an argument group called ``title``, if given)."""
    target = parser.add_argument_group(title) if title else parser
    for option in options:
        option.add_to(target)


def apply_options(task: TaskConfig, args: argparse.Namespace, options: Sequence[Option]) -> TaskConfig:
    """``task`` with every option of ``options`` that ``args`` gives applied, in order."""
    for option in options:
        value = getattr(args, option.dest, None)
        if value is not None:
            task = option.apply(task, value)
    return task
