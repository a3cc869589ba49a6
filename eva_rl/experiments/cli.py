"""The ``eva-rl`` command (``pretrain``, ``finetune``, ``compare``, ``continual``, ``inspect``, ``merge``, ``record``,
``bench``) and the scripts: each command is a :class:`Command` (its flags out of
:data:`~eva_rl.experiments.options.FLAGS`, and a handler), parsed and guarded the same way.

Bad input (an unknown env, a missing or corrupt agent, mismatched spaces, a bad config value): every
:class:`~eva_rl.errors.EvaRLError` ends with one ``error: ...`` line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from eva_rl.errors import AgentError, ConfigError, EvaRLError
from eva_rl.experiments.execute import BACKENDS, LocalProcesses, SideBySide, default_workers
from eva_rl.experiments.options import CommandParser, add_flags, task_overrides
from eva_rl.experiments.run_folder import RunFolder
from eva_rl.experiments.tasks import EvalSettings, TaskConfig, find_task, known_tasks, load_task
from eva_rl.experiments.trust import pickle_note
from eva_rl.files import atomic_save_model, check_writable

if TYPE_CHECKING:
    from eva_rl.experiments.suites import Suite

ENV_FLAGS = ("env", "config", "gym_package", "env_kwargs", "n_envs", "wrapper", "device", "threads")
"""Which environment and task, and where the computation runs (every command that builds the target env)."""
ADAPTER_FLAGS = ("pretrained", "rank", "alpha", "rslora", "rho", "tau", "eva_convergence", "eva_batch_size", "algo")
"""The pretrained agent and the adapter settings (``finetune`` and ``inspect``)."""
FINETUNE_FLAGS = (
    *ENV_FLAGS,
    *ADAPTER_FLAGS,
    "methods",
    "seeds",
    "total_timesteps",
    "lr",
    "eva_data",
    "eval_freq",
    "eval_episodes",
    "eval_seed",
    "checkpoint_freq",
    "update_obs_stats",
    "critic_warmup",
    "log_dir",
    "resume",
    "overwrite",
    "workers",
    "video",
    "no_progress",
)


IMAGE_SUFFIXES = (".png", ".svg", ".pdf", ".jpg")

# The handlers import torch, stable-baselines3 and Gymnasium when a command runs, not when this module is imported:
# parsing and --help stay well under a second.


def torch_threads(threads: int) -> int:
    """Set torch's CPU threads for this process; the number it uses."""
    import torch

    torch.set_num_threads(threads)
    return torch.get_num_threads()


def check_image_path(out: Path) -> None:
    """:raises ConfigError: for an ``--out`` that is no image file matplotlib writes, or cannot be written (before
    any work: EVA or a plot would otherwise run first)."""
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise ConfigError(f"--out {out} is invalid: expected an image file ending in {', '.join(IMAGE_SUFFIXES)}")
    check_writable(out.parent, f"--out {out}")


def _agent_path(task: TaskConfig, args: argparse.Namespace) -> Path:
    agent_path = args.pretrained or task.agent_path
    if agent_path is None:
        raise AgentError(f"no bundled agent for {args.env!r}; pass --pretrained path/to/agent.zip")
    pickle_note(agent_path)
    return agent_path


def resolve_task(args: argparse.Namespace, rename: dict[str, str] | None = None) -> TaskConfig:
    """The task named by ``--env`` (or ``--config``), or an ad-hoc task for a plain env id or entry point, with the
    command line's settings applied (each checked like the task file's, an error naming the flag; ``rename``: see
    :func:`apply_flags`)."""
    from eva_rl.devices import get_device
    from eva_rl.experiments.environments import env_factory, import_packages
    from eva_rl.loading import load_pretrained

    try:
        get_device(args.device)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    packages = args.gym_package or []
    import_packages(packages)
    task = load_task(args.config) if args.config is not None else find_task(args.env)
    if task is None:
        env_factory(args.env, getattr(args, "wrapper", None) or [], known_tasks=list(known_tasks()))  # unknown ids
        name = args.env.replace(":", "-").replace("/", "-")
        # rl-zoo3 evaluates greedily except on Atari and MiniGrid, where an argmax policy can get stuck.
        stochastic = any(marker in args.env for marker in ("MiniGrid", "NoFrameskip", "ALE/"))
        task = TaskConfig(
            name=name, target_env=args.env, source_env=args.env, eval=EvalSettings(deterministic=not stochastic)
        )
        if getattr(args, "pretrained", None) is not None and getattr(args, "n_envs", None) is None:
            # Without a task file, the agent's own number of envs: an off-policy agent's train_freq counts env steps
            # of all envs, so 8 envs would make an eighth of its updates.
            agent_envs = load_pretrained(args.pretrained, device="cpu").model.n_envs
            task = task.with_overrides({"n_envs": agent_envs})
            print(f"[eva-rl] n_envs {agent_envs}: the agent's own (--n-envs sets another)")
    if packages:
        task = task.with_overrides({"env_packages": [*task.env_packages, *packages]})
    return apply_flags(task, args, rename)


def apply_flags(task: TaskConfig, args: argparse.Namespace, rename: dict[str, str] | None = None) -> TaskConfig:
    """``task`` with each given flag of ``args`` that sets a task setting applied (``rename``: settings this command
    puts elsewhere, e.g. ``pretrain``'s budget in ``pretrain_timesteps``).

    :raises ConfigError: naming the flag and its value.
    """
    for setting, (shown, value) in task_overrides(args).items():
        task = task.with_overrides({(rename or {}).get(setting, setting): value}, where=shown)
    return task


def finetune_command(args: argparse.Namespace) -> int:
    """``finetune``: every method x seed of the task, side by side; a table, the files written, TensorBoard."""
    from eva_rl.experiments.finetune import finetune, summary_table, written_files

    threads = torch_threads(args.threads)
    task = resolve_task(args)
    agent_path = _agent_path(task, args)
    print(f"[eva-rl] task {task.name}: {task.target_env}, agent {agent_path}")
    workers = args.workers or default_workers(len(task.methods) * len(task.seeds))
    executor = SideBySide(workers, threads, progress=not args.no_progress)
    results = finetune(task, agent_path, args.log_dir, executor, args.device, args.resume, args.overwrite)
    board = args.log_dir / task.name
    print()
    print(summary_table(results))
    run_dirs = [board / result.method / f"seed{result.seed}" for result in results]
    if args.video:
        from eva_rl.experiments.videos import record_runs

        print("[eva-rl] recording the agents (--video)")
        record_runs(run_dirs)
    print(f"\nResults: {board}/<method>/seed<k>/: {written_files(run_dirs, [r.method for r in results])}")
    print(tensorboard_hint(board))
    return 0


TENSORBOARD_VIEW = "http://localhost:6006/?smoothing=0&tagFilter=eval"
"""TensorBoard opened on the evaluations, unsmoothed: its default smoothing (0.6) over a run's few evaluation points
draws a last point far from the real one."""


def tensorboard_hint(board: Path) -> str:
    """The line that tells how to look at ``board``'s runs."""
    return f"TensorBoard: tensorboard --logdir {board}, then open {TENSORBOARD_VIEW}"


# Failures of the file system a run writes to (a full disk, a read-only or foreign folder, a file where a folder
# should be): the user's to fix, so an error line; other OSErrors are bugs and keep their traceback.
_FILE_SYSTEM_ERRORS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
}


def guarded(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command's handler: every eva-rl error becomes one ``error:`` line and exit code 2."""
    from eva_rl.experiments.training import one_line_warnings

    one_line_warnings()
    try:
        return handler(args)
    except EvaRLError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        print(f"error: {' '.join(lines)}", file=sys.stderr)  # one line, whatever the message
        return 2
    except OSError as error:
        if error.errno not in _FILE_SYSTEM_ERRORS:
            raise
        where = f"{error.filename}: " if error.filename else ""
        hint = ""
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            hint = "; no half-written file was kept: free some space and rerun with --resume"
        print(f"error: {where}{error.strerror or error}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command with --resume to continue", file=sys.stderr)
        return 130


def pretrain_command(args: argparse.Namespace) -> int:
    """``pretrain``: the task's source agent, reproducibly, with a model card."""
    from eva_rl.experiments.pretrain import pretrain

    torch_threads(args.threads)
    if args.out is not None:
        check_writable(args.out, f"--out {args.out}")
    task = resolve_task(args, rename={"total_timesteps": "pretrain_timesteps"})
    if args.seed is not None:
        task = task.with_overrides({"pretrain_seed": args.seed}, where=f"--seed {args.seed}")
    command = " ".join(["python", "scripts/pretrain.py", *args.argv])
    card = pretrain(
        task,
        out=args.out,
        replace=args.overwrite,
        eval_episodes=args.card_episodes,
        device=args.device,
        command=command,
        progress=not args.no_progress,
    )
    print(f"[eva-rl] agent: {card['path']}")
    print(f"[eva-rl] return on {card['source_env']}: {card['eval_return']:.3f} over {card['eval_episodes']} episodes")
    if card.get("target_return") is not None:
        print(f"[eva-rl] zero-shot return on {card['target_env']}: {card['target_return']:.3f}")
    return 0


def compare_command(args: argparse.Namespace) -> int:
    """``compare``: a suite's grid (or its tuning sweep, or its rank study), then its page."""
    from eva_rl.experiments.studies.base import conduct
    from eva_rl.experiments.studies.ranks import RankStudyRuns
    from eva_rl.experiments.studies.suite import SuiteStudy
    from eva_rl.experiments.studies.tuning import RankTuningSweep, TuningSweep, at_the_edge, edge_notes
    from eva_rl.experiments.suites import load_suite

    suite = load_suite(args.suite)
    if args.methods is not None:
        suite.check_methods(args.methods)
    if args.rank_study and (args.methods or args.seeds or args.backend != "local"):
        raise ConfigError("--rank-study runs the suite's rank_study as written: drop --methods, --seeds and --backend")
    if args.tune and (args.seeds or args.backend != "local"):
        raise ConfigError("--tune runs the suite's tuning seeds locally: drop --seeds and --backend")
    if args.anatomy and args.first_update:
        raise ConfigError("--anatomy and --first-update are two studies: pass one")
    if args.anatomy:
        return anatomy_command(suite, args)
    if args.first_update:
        return first_update_command(suite, args)
    # One study per flag, one executor class per --backend.
    if args.rank_study and args.tune:
        study = RankTuningSweep(suite, args.log_dir)
    elif args.rank_study:
        study = RankStudyRuns(suite, args.log_dir)
    elif args.tune:
        study = TuningSweep(suite, args.log_dir, args.methods)
    else:
        study = SuiteStudy(suite, args.log_dir, args.methods, args.seeds, args.report_only)
    executor = BACKENDS[args.backend].from_flags(args, len(study.plan()))
    report = conduct(study, executor, report_only=args.report_only, overwrite=args.overwrite)
    out = study.out_dir
    if args.rank_study and args.tune:
        print(f"\nTuning at every rank: {out}/rank_tuning.json. For the suite file's rank_study:")
        # a copy per rank: shared dicts would print as YAML anchors and aliases
        chosen = {m: {r: dict(point) for r, point in points.items()} for m, points in report["chosen"].items()}
        print(yaml.safe_dump({"method_settings": chosen}, sort_keys=False))
        by_rank = {f"{m} at r = {r}": point for m, points in chosen.items() for r, point in points.items()}
        print("\n".join(at_the_edge(study.grid, by_rank, study.grid_key)))
    elif args.rank_study:
        print(f"\nRank study: {out}/rank_study.md, rank_study.json, rank_study.png")
    elif args.tune and (partial := report.get("partial")):
        print(
            f"\nTuning: {out}/tuning.json, sensitivity.png. The sweep is under way: {partial['completed']} of its "
            f"{partial['planned']} runs are in, so no choice is final yet."
        )
    elif args.tune:
        print(f"\nTuning: {out}/tuning.json. For the suite file:")
        print(yaml.safe_dump({"method_settings": report["chosen"]}, sort_keys=False))
        print("\n".join(edge_notes(suite, report["chosen"])))
    else:
        print(f"\nResults: {out}/results.md, results.json, sample_efficiency*.png, final_return.png, eva_ranks.png")
        if next(out.rglob(RunFolder.EVENTS), None) is not None:  # committed pages keep no event files
            print(tensorboard_hint(out))
    return 0


def first_update_command(suite: Suite, args: argparse.Namespace) -> int:
    """``compare --first-update``: each adapter method's first PPO update from one shared rollout."""
    from eva_rl.experiments.studies.first_update import suite_first_update

    if args.tune or args.rank_study or args.backend != "local":
        raise ConfigError(
            "--first-update measures the suite's own seeds locally: drop --tune, --rank-study and --backend"
        )
    torch_threads(args.threads)
    suite_first_update(suite, args.log_dir, args.methods, args.seeds, args.report_only)
    out = args.log_dir / suite.name
    print(f"\nFirst updates: {out}/first_update.md, .json, .png; each seed's under {out}/first-update/")
    return 0


def anatomy_command(suite: Suite, args: argparse.Namespace) -> int:
    """``compare --anatomy``: where the suite's adapter runs moved each layer (runs nothing new)."""
    from eva_rl.experiments.studies.anatomy import suite_anatomy

    if args.tune or args.rank_study or args.seeds or args.backend != "local":
        raise ConfigError("--anatomy reads a suite's completed runs: drop --tune, --rank-study, --seeds and --backend")
    torch_threads(args.threads)
    suite_anatomy(suite, args.log_dir, args.methods, args.report_only)
    print(f"\nAnatomy: {args.log_dir / suite.name}/anatomy.md, anatomy.json; each run's in its anatomy.json")
    return 0


def continual_command(args: argparse.Namespace) -> int:
    """``continual``: a sequence of tasks into adapter banks (and full copies, and one network in turn)."""
    from eva_rl.experiments.sequences import load_sequence
    from eva_rl.experiments.studies.base import conduct
    from eva_rl.experiments.studies.continual import ContinualStudy

    sequence = load_sequence(args.sequence)
    if args.seeds:  # a subset first: a seed's banks and sequential network complete before the next seed starts
        sequence = dataclasses.replace(sequence, seeds=list(dict.fromkeys(args.seeds)))
    study = ContinualStudy(sequence, args.log_dir)
    executor = LocalProcesses.from_flags(args, len(study.plan()))
    conduct(study, executor, overwrite=args.overwrite)
    out = study.out_dir
    print(f"\nContinual: {out}/continual.md, continual.json, continual.png; banks in {out}/banks/")
    return 0


def inspect_command(args: argparse.Namespace) -> int:
    """``inspect``: EVA only, its ranks and captured variance per layer."""
    from eva_rl.experiments.inspection import allocation_table, inspect_eva, save_allocation_png

    torch_threads(args.threads)
    out = args.out or Path("eva_allocation.png")
    check_image_path(out)
    task = resolve_task(args)
    agent_path = _agent_path(task, args)
    device = "cpu" if args.device == "auto" else args.device
    result = inspect_eva(task, agent_path, device, progress=not args.no_progress)
    print(allocation_table(result))
    print(f"allocation: {save_allocation_png(result, out)}")
    return 0


def bank_command(args: argparse.Namespace) -> int:
    """``inspect BANK``: a bank's tasks, ranks and sizes (and their returns)."""
    from eva_rl.bank import AdapterBank
    from eva_rl.experiments.banks import evaluate_bank
    from eva_rl.experiments.inspection import bank_table

    torch_threads(args.threads)
    if args.base is not None and not args.base.is_file():
        raise ConfigError(f"--base {args.base} is invalid: expected the bank's base agent zip file")
    base = args.base or AdapterBank.base_file(args.bank)
    if base is not None:
        pickle_note(base, "base agent")
    bank = AdapterBank.load(args.bank, device="cpu", base_file=args.base)
    returns = evaluate_bank(bank, args.eval_episodes, args.trust_code) if args.evaluate else None
    print(bank_table(bank, returns))
    return 0


def merge_command(args: argparse.Namespace) -> int:
    """``merge``: a run's adapters folded into a plain SB3 zip."""
    from eva_rl.adapt import merge
    from eva_rl.loading import load_agent

    source = RunFolder(args.run_dir).model_file if args.run_dir.is_dir() else args.run_dir
    if source.is_file():
        pickle_note(source, "file")
    out = args.out or source.with_name("merged.zip")
    if args.out is not None:
        check_writable(out.parent, f"--out {out}")
    merged = merge(load_agent(source, device="cpu"))
    atomic_save_model(merged, out)
    print(f"merged: {out} (policy {type(merged.policy).__name__}; loads with plain {type(merged).__name__}.load)")
    stats = source.with_name(RunFolder.STATS)
    if stats.is_file():  # the merged policy sees observations normalized with the run's statistics
        if out.parent.resolve() != stats.parent.resolve():
            shutil.copyfile(stats, out.with_name(RunFolder.STATS))
        print(
            f"VecNormalize statistics: {out.with_name(RunFolder.STATS)} (load them with VecNormalize.load to evaluate)"
        )
    return 0


def plot_runs_command(args: argparse.Namespace) -> int:
    """``scripts/plot_runs.py``: a task's runs from their TensorBoard event files, as one PNG."""
    from eva_rl.experiments.plots import plot_runs

    out = args.out or Path("runs.png")
    check_image_path(out)
    print(plot_runs(args.board, out))
    return 0


def record_command(args: argparse.Namespace) -> int:
    """``record``: GIFs of completed runs' agents, before and after fine-tuning."""
    from eva_rl.experiments.videos import record_runs

    for path in record_runs(args.run_dirs, args.max_steps, args.eval_seed, args.trust_code):
        print(f"video: {path}")
    return 0


def bench_command(args: argparse.Namespace) -> int:
    from eva_rl.experiments.bench import bench

    return bench(args)


@dataclass(frozen=True)
class Command:
    """A command of ``eva-rl``: its flags (out of :data:`~eva_rl.experiments.options.FLAGS`) and its handler.

    :param required: Flags this command cannot do without.
    """

    name: str
    summary: str
    handler: Callable[[argparse.Namespace], int]
    flags: tuple[str, ...]
    required: tuple[str, ...] = ()
    description: str | None = None

    def parser(self, prog: str | None = None) -> CommandParser:
        description = self.description or f"{self.summary[0].upper()}{self.summary[1:]}."
        parser = CommandParser(prog=prog or f"eva-rl {self.name}", description=description)
        add_flags(parser, self.flags, self.required)
        return parser

    def main(self, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
        """Parse ``argv`` (default: the process's) and run the handler, guarded."""
        argv = list(sys.argv[1:] if argv is None else argv)
        args = self.parser(prog).parse_args(argv)
        args.argv = argv
        return guarded(self.handler, args)


COMMANDS: dict[str, Command] = {
    command.name: command
    for command in (
        Command(
            "pretrain",
            "train a task's source agent, reproducibly, with a model card",
            pretrain_command,
            (
                *ENV_FLAGS,
                "total_timesteps",
                "seed",
                "algo",
                "policy",
                "card_episodes",
                "out",
                "overwrite",
                "no_progress",
            ),
            required=("env",),
            description="Train the source agent of a task, reproducibly, with a model card (--out default: the "
            "folder of the task's agent, else agents/<source env id>/).",
        ),
        Command(
            "finetune",
            "fine-tune a pretrained agent on a target env with EVA-LoRA and the baselines",
            finetune_command,
            FINETUNE_FLAGS,
            required=("env",),
            description="Fine-tune a pretrained agent with EVA-initialized LoRA (and the baselines) on a target env.",
        ),
        Command(
            "compare",
            "run a suite of tasks x methods x seeds, then IQM, confidence intervals and plots",
            compare_command,
            (
                "suite",
                "methods",
                "seeds",
                "tune",
                "rank_study",
                "anatomy",
                "first_update",
                "report_only",
                "log_dir",
                "overwrite",
                "workers",
                "threads",
                "backend",
                "ray_address",
            ),
        ),
        Command(
            "continual",
            "fine-tune a sequence of tasks into adapter banks; report forgetting and memory",
            continual_command,
            ("sequence", "seeds", "log_dir", "overwrite", "workers", "threads"),
        ),
        Command(
            "inspect",
            "run EVA only and show its ranks and captured variance; or show an adapter bank",
            inspect_command,
            (*ENV_FLAGS, *ADAPTER_FLAGS, "out", "no_progress"),
            required=("env",),
            description="Run EVA only and show its allocation (--out default: eva_allocation.png). With a bank "
            "folder instead of --env, 'eva-rl inspect BANK [--base ZIP] [--evaluate]' shows an adapter bank's tasks, "
            "ranks and sizes (eva-rl inspect BANK --help).",
        ),
        Command(
            "merge",
            "fold a run's adapters into a plain SB3 zip for deployment",
            merge_command,
            ("run_dir", "out"),
            description="Fold a run's adapters into a plain SB3 zip for deployment (--out default: "
            "<run-dir>/merged.zip).",
        ),
        Command(
            "record",
            "record completed runs' agents, before and after fine-tuning, as GIFs",
            record_command,
            ("run_dirs", "eval_seed", "max_steps", "trust_code"),
            description=f"Record the agent of completed runs: {RunFolder.AGENT_GIF} and {RunFolder.BEFORE_AFTER_GIF} "
            "(the pretrained agent beside it) in each run folder, and both in the run's TensorBoard (images tab).",
        ),
        Command(
            "bench",
            "measure EVA's cost and LoRA's training throughput",
            bench_command,
            (
                "env",
                "seed",
                "device",
                "threads",
                "throughput_steps",
                "quick",
                "offpolicy_task",
                "bank_only",
                "view_only",
                "evaluation_only",
                "meta_world_only",
                "weight_cache_only",
                "lora_path_only",
                "peft_only",
                "device_crossover",
            ),
            description="Measure EVA's cost on a task's bundled agent (--env default: MiniGrid-DoorKey); prints one "
            "JSON object as the last line.",
        ),
    )
}
"""Every ``eva-rl`` command."""

INSPECT_BANK = Command(
    "inspect BANK",
    "show an adapter bank's tasks, ranks and sizes (and their returns)",
    bank_command,
    ("bank", "base", "evaluate", "eval_episodes", "trust_code", "threads"),
)
PLOT_RUNS = Command(
    "plot_runs.py",
    "render a task's runs (eval return and training return per method) from its TensorBoard event files",
    plot_runs_command,
    ("board", "out"),
    description="Render a task's runs (eval return and training return per method) from its TensorBoard event "
    "files (--out default: runs.png).",
)


def finetune_main(argv: Sequence[str] | None = None) -> int:
    return COMMANDS["finetune"].main(argv, prog="finetune.py")


def pretrain_main(argv: Sequence[str] | None = None) -> int:
    return COMMANDS["pretrain"].main(argv, prog="pretrain.py")


def compare_main(argv: Sequence[str] | None = None) -> int:
    return COMMANDS["compare"].main(argv, prog="compare.py")


def bench_main(argv: Sequence[str] | None = None) -> int:
    return COMMANDS["bench"].main(argv, prog="bench.py")


def plot_runs_main(argv: Sequence[str] | None = None) -> int:
    return PLOT_RUNS.main(argv, prog="plot_runs.py")


def inspect_main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):  # eva-rl inspect <bank folder>
        return INSPECT_BANK.main(argv)
    return COMMANDS["inspect"].main(argv)


def usage() -> str:
    """``eva-rl --help``: every command with one line."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    return "\n".join(
        [
            "usage: eva-rl <command> [options]",
            "",
            "commands:",
            *lines,
            "",
            "eva-rl <command> --help shows a command's options.",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``eva-rl <command> ...``: one entry point for every tool."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return 0
    if not argv or argv[0] not in COMMANDS:
        given = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"error: {given}; expected one of {', '.join(COMMANDS)} (eva-rl --help lists them)", file=sys.stderr)
        return 2
    if argv[0] == "inspect":
        return inspect_main(argv[1:])
    return COMMANDS[argv[0]].main(argv[1:])


def cli_reference() -> str:
    """The CLI reference table of ``docs/cli.md``: every flag once, with the commands that take it."""
    from eva_rl.experiments.options import flag_table

    commands = {name: command.flags for name, command in COMMANDS.items()}
    commands["inspect"] = (*commands["inspect"], *INSPECT_BANK.flags)
    commands["plot_runs.py"] = PLOT_RUNS.flags
    return flag_table(commands)
