"""The command-line vocabulary: every flag of every ``eva-rl`` command declared once, in :data:`FLAGS`, so the same
name means the same thing, with the same default, in each command that takes it.

A flag that overrides a task setting names it (``setting``: a short name of
:data:`~eva_rl.experiments.tasks.SETTINGS` or a dotted path); :func:`task_overrides` collects the given ones for
:meth:`~eva_rl.experiments.tasks.TaskConfig.with_overrides`, which validates them like the task file's values, so a
bad one (``--rank 0``, ``--tau 1.5``) is a :class:`~eva_rl.errors.ConfigError` naming the flag, never silently
replaced.
"""

from __future__ import annotations

import argparse
import ast
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from eva_rl.algorithms import ALGORITHM_NAMES
from eva_rl.config import CONVERGENCE_TESTS, DATA_SOURCES
from eva_rl.experiments.execute import BACKENDS
from eva_rl.experiments.markdown import table, table_row
from eva_rl.experiments.run_folder import RunFolder
from eva_rl.experiments.tasks import SEED, is_seed
from eva_rl.methods import method_names


class CommandParser(argparse.ArgumentParser):
    """``argparse`` whose errors (an unknown flag, a missing ``--env``, a value of the wrong type) end like every other
    bad input: one ``error:`` line and exit code 2, instead of the usage block and a second line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def comma_list(value: str) -> list[str]:
    """``"eva, full"`` -> ``["eva", "full"]``."""
    return [item.strip() for item in value.split(",") if item.strip()]


def count(value: str) -> int:
    """An integer >= 1 from the command line."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is invalid: expected an integer >= 1") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{number} is invalid: expected an integer >= 1")
    return number


def env_kwarg(value: str) -> tuple[str, Any]:
    """``"goal:(0.3, 0.7)"`` -> ``("goal", [0.3, 0.7])``: rl-zoo3's ``--env-kwargs`` form, the value a Python literal
    (tuples become lists, as a task file's YAML gives them)."""
    key, colon, text = value.partition(":")
    if not colon or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"{value!r} is invalid: expected key:value, e.g. goal:(0.3,0.7)")
    try:
        parsed = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise argparse.ArgumentTypeError(
            f"{value!r} is invalid: the value {text!r} is no Python literal (a number, True, None, a list, a tuple, "
            "a dict, or a quoted string such as 'rgb_array')"
        ) from None
    return key, _as_yaml(parsed)


def _as_yaml(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_as_yaml(item) for item in value]
    if isinstance(value, dict):
        return {key: _as_yaml(item) for key, item in value.items()}
    return value


def seed(value: str) -> int:
    """A seed from the command line (see :data:`~eva_rl.experiments.tasks.MAX_SEED`)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is invalid: expected {SEED}") from None
    if not is_seed(number):
        raise argparse.ArgumentTypeError(f"{number} is invalid: expected {SEED}")
    return number


@dataclass(frozen=True)
class Flag:
    """One command-line flag.

    :param flags: The flag (and its aliases).
    :param help: The ``--help`` text.
    :param group: The help section it is listed under.
    :param type: Parses the command-line string (``None`` for a switch, ``action="store_true"``).
    :param setting: The task setting it overrides (a short name or a dotted path), if any.
    :param default: Its value when not given (``None``: the task's, or the command's own).
    :param required: The command needs it.
    :param nargs: ``argparse``'s ``nargs``.
    :param action: ``argparse``'s ``action``.
    :param choices: Accepted values.
    :param metavar: Placeholder in the help text.
    :param positional: An argument without a dash (``flags`` holds its name).
    """

    flags: tuple[str, ...]
    help: str
    group: str = "options"
    type: Callable[[str], Any] | None = str
    setting: str | None = None
    default: Any = None
    required: bool = False
    nargs: str | None = None
    action: str | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    positional: bool = False

    @property
    def dest(self) -> str:
        return self.flags[0].lstrip("-").replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        extra = {
            key: value
            for key, value in {
                "nargs": self.nargs,
                "action": self.action,
                "choices": self.choices,
                "metavar": self.metavar,
                "type": self.type if self.action != "store_true" else None,
            }.items()
            if value is not None
        }
        if self.positional:
            parser.add_argument(self.flags[0], help=self.help, **extra)
            return
        if self.required:
            extra["required"] = True
        parser.add_argument(*self.flags, dest=self.dest, help=self.help, default=self.default, **extra)


ENVIRONMENT, AGENT, TRAINING, RUNS, STUDY, BENCH = (
    "environment",
    "agent and adapters",
    "training",
    "runs",
    "study",
    "benchmark",
)

FLAGS: dict[str, Flag] = {
    flag.dest: flag
    for flag in (
        # what to train on
        Flag(
            ("--env",),
            "a task name from configs/ (e.g. MiniGrid-DoorKey), a registered Gymnasium id, or module:Class",
            ENVIRONMENT,
        ),
        Flag(
            ("--config",),
            "a task YAML file to use instead of looking up --env in configs/; its module:Class entries (env, "
            "wrappers, *_class) are imported and called: use only files you trust",
            ENVIRONMENT,
            type=Path,
        ),
        Flag(
            ("--gym-package",),
            "import PKG first, for packages that register env ids (repeatable)",
            ENVIRONMENT,
            action="append",
            metavar="PKG",
        ),
        Flag(
            ("--env-kwargs",),
            "keyword arguments for the target env, as key:value with a Python literal value (rl-zoo3's form), e.g. "
            "--env-kwargs goal:(0.3,0.7) max_steps:100; they update the task's env_kwargs",
            ENVIRONMENT,
            env_kwarg,
            setting="env_kwargs",
            nargs="+",
            metavar="KEY:VALUE",
        ),
        Flag(("--n-envs",), "parallel envs for training", ENVIRONMENT, type=int, setting="n_envs"),
        Flag(
            ("--wrapper",),
            "observation wrapper (repeatable)",
            ENVIRONMENT,
            setting="wrappers",
            action="append",
            metavar="MODULE:CLASS",
        ),
        Flag(
            ("--device",),
            "auto (CUDA when present and the policy has 1M+ parameters, else the CPU), cpu, cuda, cuda:N",
            ENVIRONMENT,
            default="auto",
        ),
        Flag(("--threads",), "torch CPU threads per run (1 is fastest for small nets)", ENVIRONMENT, count, default=1),
        # the agent and its adapters
        Flag(
            ("--pretrained",),
            "your own agent: an SB3 zip, an rl-zoo3 run folder (logs/<algo>/<env>_<n>) or a Hub folder, with its "
            "VecNormalize statistics; zips and .pkl files are pickles, load only agents you trust (default: the "
            "task's bundled agent)",
            AGENT,
            type=Path,
        ),
        Flag(("--rank",), "LoRA rank r per layer (EVA's budget is r x layers)", AGENT, int, setting="r"),
        Flag(("--alpha",), "LoRA alpha (scaling alpha/r)", AGENT, float, setting="alpha"),
        Flag(
            ("--rslora",),
            "rsLoRA's scaling alpha/sqrt(r) instead of alpha/r (peft's use_rslora)",
            AGENT,
            None,
            setting="rslora",
            action="store_true",
        ),
        Flag(("--rho",), "EVA rank redistribution factor (>= 1)", AGENT, float, setting="rho"),
        Flag(("--tau",), "EVA convergence threshold, cosine in [0, 1]", AGENT, float, setting="tau"),
        Flag(
            ("--eva-convergence",),
            "what must stop moving before EVA is done: components (peft's: each of a layer's first r directions) or "
            "subspace (their span)",
            AGENT,
            setting="eva.convergence",
            choices=CONVERGENCE_TESTS,
        ),
        Flag(("--eva-batch-size",), "env steps per EVA batch", AGENT, int, setting="eva.batch_size"),
        Flag(
            ("--eva-data",),
            "EVA's data: auto (the default), ppo for PPO and A2C where a rollout holds an EVA batch, else rollouts; "
            "ppo, the on-policy algorithm's first rollouts, trained on too (no extra env steps); rollouts, its own "
            "rollouts before training",
            AGENT,
            setting="eva.data_source",
            choices=DATA_SOURCES,
        ),
        Flag(
            ("--algo",),
            "algorithm to train with (default: the task's, else the one that saved the agent; PPO and A2C agents "
            "take either)",
            AGENT,
            setting="algo",
            choices=ALGORITHM_NAMES,
        ),
        Flag(
            ("--policy",),
            "SB3 policy of a new agent (default: the task's, else MlpPolicy; MultiInputPolicy for Dict observations, "
            "CnnPolicy for images)",
            AGENT,
            setting="policy",
        ),
        # training
        Flag(
            ("--methods",),
            f"comma list out of {','.join(method_names())} (default: the task's, or the suite's)",
            TRAINING,
            comma_list,
            setting="methods",
            metavar="METHOD,...",
        ),
        Flag(
            ("--seeds",),
            "the seeds to run, one or more values (default: the task's, the suite's or the sequence's)",
            TRAINING,
            seed,
            setting="seeds",
            nargs="+",
            action="extend",
            metavar="SEED",
        ),
        Flag(
            ("--seed",),
            "the seed of the command's one run or measurement (default: the task's, else 0)",
            TRAINING,
            seed,
        ),
        Flag(
            ("--total-timesteps",),
            "training budget per run (default: the task's)",
            TRAINING,
            int,
            setting="total_timesteps",
        ),
        Flag(
            ("--lr",),
            "learning rate for every method (default: the task's per-method learning rates)",
            TRAINING,
            float,
            setting="learning_rate",
        ),
        Flag(("--eval-freq",), "env steps between evaluations", TRAINING, int, setting="eval_freq"),
        Flag(
            ("--eval-episodes",),
            "episodes per evaluation (default: the task's)",
            TRAINING,
            int,
            setting="eval_episodes",
        ),
        Flag(
            ("--eval-seed",),
            "seed of the evaluation episodes and action sampling (default: the task's)",
            TRAINING,
            seed,
            setting="eval.seed",
        ),
        Flag(("--checkpoint-freq",), "env steps between checkpoints", TRAINING, int, setting="checkpoint_freq"),
        Flag(
            ("--update-obs-stats",),
            "let an agent's VecNormalize statistics keep updating while fine-tuning (rl-zoo3's continued training); "
            "by default they stay as pretrained",
            TRAINING,
            None,
            setting="update_obs_stats",
            action="store_true",
        ),
        Flag(
            ("--critic-warmup",),
            "the first N updates train only the critic (PPO, A2C): for an agent whose value head does not know the "
            "target task (default: the task's, else 0)",
            TRAINING,
            int,
            setting="critic_warmup",
        ),
        # where runs go and how they are carried out
        Flag(("--log-dir",), "results root (default: runs)", RUNS, type=Path, default=Path("runs")),
        Flag(("--resume",), "continue interrupted runs from their checkpoints", RUNS, None, action="store_true"),
        Flag(
            ("--overwrite",),
            "start over the runs whose folders under --log-dir hold runs made with other settings, keeping each until "
            "its replacement completes (without it, such a folder is an error that names what differs); pretrain: "
            "replace the agent --out already holds",
            RUNS,
            None,
            action="store_true",
        ),
        Flag(
            ("--workers",),
            "runs at a time, a process each (default: one per CPU core, at most one per run; 1: one after the other "
            "in this process)",
            RUNS,
            count,
        ),
        Flag(("--no-progress",), "no progress bars", RUNS, None, action="store_true"),
        Flag(
            ("--video",),
            "record the pretrained and each fine-tuned agent: GIFs beside each run and in its TensorBoard",
            RUNS,
            None,
            action="store_true",
        ),
        Flag(("--out",), "where the command's output goes (default: named in its --help)", RUNS, type=Path),
        # studies
        Flag(("--suite",), "a suite name in configs/suites/ or a YAML path", STUDY, required=True),
        Flag(("--sequence",), "a sequence name in configs/sequences/ or a YAML path", STUDY, required=True),
        Flag(
            ("--tune",),
            "run the suite's tuning sweep on its tuning seeds and print the choices (with --rank-study: at every rank "
            "of its rank study)",
            STUDY,
            None,
            action="store_true",
        ),
        Flag(
            ("--rank-study",),
            "run the suite's rank study (its methods at each of its ranks on one task) and plot against the rank",
            STUDY,
            None,
            action="store_true",
        ),
        Flag(
            ("--anatomy",),
            "measure where each adapter method's completed runs moved the pretrained agent's layers, on its "
            "activations in the target env (anatomy.md beside the suite's page; with --report-only: redraw it)",
            STUDY,
            None,
            action="store_true",
        ),
        Flag(
            ("--first-update",),
            "make each adapter method's first PPO update from one and the same rollout of the pretrained agent, at its "
            "rate and at fractions of it, and measure how far it moves the policy (first_update.md beside the suite's "
            "page; with --report-only: redraw it)",
            STUDY,
            None,
            action="store_true",
        ),
        Flag(
            ("--report-only",),
            "run nothing: redraw the page from the completed runs (--methods, --seeds restrict it; with --tune: the "
            "tuning page of a sweep under way)",
            STUDY,
            None,
            action="store_true",
        ),
        Flag(("--backend",), "where runs execute (default: local)", STUDY, choices=tuple(BACKENDS), default="local"),
        Flag(("--ray-address",), "Ray cluster address, or 'auto'; default: start a local Ray instance", STUDY),
        # what a command reads besides a task, and its own switches
        Flag(("run_dir",), f"a run folder holding {RunFolder.MODEL}, or a model zip", RUNS, Path, positional=True),
        Flag(("run_dirs",), "run folders (<log-dir>/<task>/<method>/seed<k>)", RUNS, Path, nargs="+", positional=True),
        Flag(("board",), "<log-dir>/<task>, holding <method>/seed<k>/ runs", RUNS, Path, positional=True),
        Flag(
            ("bank",),
            "a bank folder (bank.json and adapters/), e.g. from eva-rl continual",
            RUNS,
            Path,
            positional=True,
        ),
        Flag(("--evaluate",), "evaluate each task through the bank", RUNS, None, action="store_true"),
        Flag(
            ("--base",),
            "the bank's base agent zip, where the path bank.json records does not reach it (a bank copied elsewhere); "
            "its SHA-256 must match",
            RUNS,
            Path,
        ),
        Flag(
            ("--trust-code",),
            "import the module:Class names a folder records (a bank task's env, a received run's wrappers) from "
            "outside eva-rl and the libraries it uses; only for folders you trust",
            RUNS,
            None,
            action="store_true",
        ),
        Flag(("--max-steps",), "frames per episode at most (default: 300)", RUNS, count, default=300),
        Flag(
            ("--card-episodes",),
            "episodes of the model card's evaluation on the source and target envs (default: 100)",
            TRAINING,
            count,
            default=100,
        ),
        Flag(("--throughput-steps",), "PPO steps per timing round; 0 skips (default: 2048)", BENCH, int, default=2048),
        Flag(
            ("--quick",),
            "512 PPO steps per timing round, 2 scaling points (a smoke run)",
            BENCH,
            None,
            action="store_true",
        ),
        Flag(
            ("--offpolicy-task",),
            "a task with a bundled off-policy agent, for the LoRA-SAC throughput ('' skips; default: Pendulum-Gravity)",
            BENCH,
            default="Pendulum-Gravity",
        ),
        Flag(
            ("--bank-only",),
            "only the adapter bank's figures (switch time, bytes per task)",
            BENCH,
            None,
            action="store_true",
        ),
        Flag(
            ("--view-only",),
            "only the MiniGrid view's figures (env steps/s: ours, MiniGrid's)",
            BENCH,
            None,
            action="store_true",
        ),
        Flag(
            ("--evaluation-only",),
            "only eval episodes/s and the time of a predict call of a LoRA copy of --env's agent, the policy switched "
            "to eval mode once or at every predict",
            BENCH,
            None,
            action="store_true",
        ),
        Flag(
            ("--meta-world-only",),
            "only Meta-World's env steps/s (push, scripted expert: its own, with our contact check, with our "
            "quaternion too) and seconds to build 18 envs",
            BENCH,
            None,
            action="store_true",
        ),
        Flag(
            ("--device-crossover",),
            "only PPO steps/s on the CPU and on CUDA against the policy's size (where --device auto should take CUDA)",
            BENCH,
            None,
            action="store_true",
        ),
        Flag(
            ("--peft-only",),
            "only compute_eva's time against peft's EVA (get_eva_state_dict) on the same MLPs and batches",
            BENCH,
            None,
            action="store_true",
        ),
        Flag(
            ("--lora-path-only",),
            "only a LoRA Linear's training step on its one-call W + s B A path and its low-rank path, by width and "
            "batch; with --env, the LoRA PPO throughput ratio on its agent with the path chosen per call and merged",
            BENCH,
            None,
            action="store_true",
        ),
        Flag(
            ("--weight-cache-only",),
            "only the LoRA PPO throughput ratio on --env with the no-grad weight cache and without",
            BENCH,
            None,
            action="store_true",
        ),
    )
}
"""Every flag of every command, by its ``dest``."""


def add_flags(parser: argparse.ArgumentParser, names: Sequence[str], required: Sequence[str] = ()) -> None:
    """Declare the flags ``names`` on ``parser``, in their help sections (``required``: made required here)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name in names:
        flag = FLAGS[name]
        if name in required and not flag.required:
            flag = Flag(**{**flag.__dict__, "required": True})
        if flag.group not in groups:
            groups[flag.group] = parser.add_argument_group(flag.group)
        flag.add_to(groups[flag.group])


def task_overrides(args: argparse.Namespace) -> dict[str, tuple[str, Any]]:
    """``{setting: (flag as given, value)}`` for every given flag of ``args`` that overrides a task setting."""
    given = {}
    for name, value in vars(args).items():
        flag = FLAGS.get(name)
        if flag is not None and flag.setting == "env_kwargs" and value is not None:
            for key, item in value:  # each key its own dotted setting, so the task's other env kwargs stay
                given[f"env_kwargs.{key}"] = (f"{flag.flags[0]} {key}:{item!r}", item)
        elif flag is not None and flag.setting is not None and value is not None and value is not False:
            shown = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            given[flag.setting] = (f"{flag.flags[0]} {shown}" if flag.action != "store_true" else flag.flags[0], value)
    return given


def flag_table(commands: dict[str, Sequence[str]]) -> str:
    """The Markdown table of every flag (the CLI reference in ``docs/cli.md``): its meaning and default, and the
    commands that take it (``commands``: ``{command: its flags}``)."""
    lines = table(["flag", "meaning", "commands"])
    for name, flag in FLAGS.items():
        takers = [command for command, names in commands.items() if name in names]
        if not takers:
            continue
        shown = f"`{flag.flags[0].upper()}`" if flag.positional else f"`{flag.flags[0]}`"
        text = flag.help.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
        if flag.default is not None and "default" not in text:
            text += f" (default: {flag.default})"
        lines.append(table_row([shown, text, ", ".join(takers)]))
    return "\n".join(lines)
