"""The ``eva-rl`` command (``pretrain``, ``finetune``, ``compare``, ``inspect``, ``merge``, ``bench``) and the scripts.

Bad input (an unknown env, a missing or corrupt agent, mismatched spaces, a bad config value): every
:class:`~eva_rl.errors.EvaRLError` ends with one ``error: ...`` line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import yaml

from eva_rl.devices import get_device
from eva_rl.errors import AgentError, ConfigError, EvaRLError
from eva_rl.experiments.environments import env_factory, import_packages
from eva_rl.experiments.options import (
    ADAPTER_OPTIONS,
    ENV_OPTIONS,
    FINETUNE_OPTIONS,
    PRETRAIN_OPTIONS,
    CommandParser,
    add_options,
    apply_options,
    comma_list,
)
from eva_rl.experiments.tasks import ROOT, EvalSettings, TaskConfig, find_task, known_tasks, load_task
from eva_rl.experiments.training import STATS, one_line_warnings
from eva_rl.files import atomic_save_model, check_writable
from eva_rl.loading import load_agent
from eva_rl.methods import method_names


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is invalid: expected an integer >= 1") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{number} is invalid: expected an integer >= 1")
    return number


def add_env_arguments(parser: argparse.ArgumentParser) -> None:
    """Which environment and task, and where the computation runs."""
    group = parser.add_argument_group("environment")
    group.add_argument(
        "--env",
        required=True,
        help="a task name from configs/ (e.g. MiniGrid-DoorKey), a registered Gymnasium id, or module:Class",
    )
    group.add_argument(
        "--config",
        type=Path,
        help="a task YAML file to use instead of looking up --env in configs/; its module:Class entries (env, "
        "wrappers, *_class) are imported and called: use only files you trust",
    )
    group.add_argument(
        "--gym-package",
        action="append",
        default=[],
        metavar="PKG",
        help="import PKG first, for packages that register env ids (repeatable)",
    )
    for option in ENV_OPTIONS:
        option.add_to(group)
    group.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    group.add_argument(
        "--threads", type=_positive_int, default=1, help="torch CPU threads (1 is fastest for small nets)"
    )


def add_agent_arguments(parser: argparse.ArgumentParser) -> None:
    """The pretrained agent and the adapter settings."""
    group = parser.add_argument_group("agent and adapters")
    group.add_argument(
        "--pretrained",
        type=Path,
        help="your own agent: an SB3 zip (PPO, A2C), an rl-zoo3 run folder (logs/<algo>/<env>_<n>) or a Hub folder, "
        "with its VecNormalize statistics; zips and .pkl files are pickles, load only agents you trust "
        "(default: the task's bundled agent)",
    )
    for option in ADAPTER_OPTIONS:
        option.add_to(group)


def _agent_path(task: TaskConfig, args: argparse.Namespace) -> Path:
    agent_path = args.pretrained or task.agent_path
    if agent_path is None:
        raise AgentError(f"no bundled agent for {args.env!r}; pass --pretrained path/to/agent.zip")
    if not _trusted_location(agent_path):
        print(f"[eva-rl] note: {agent_path} is unpickled to load it, which can run code: use only agents you trust")
    return agent_path


def _trusted_location(path: Path) -> bool:
    """Inside the project's ``agents/`` (made by our ``pretrain.py``) or a run folder eva-rl wrote."""
    resolved = Path(path).resolve()
    folder = resolved if resolved.is_dir() else resolved.parent
    return resolved.is_relative_to(ROOT / "agents") or any(
        (folder / marker).is_file() for marker in ("result.json", "settings.json")
    )


def resolve_task(args: argparse.Namespace) -> TaskConfig:
    """The task named by ``--env`` (or ``--config``), or an ad-hoc task for a plain env id or entry point, with the
    environment options applied."""
    try:
        get_device(args.device)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    import_packages(args.gym_package)
    task = load_task(args.config) if args.config is not None else find_task(args.env)
    if task is None:
        env_factory(args.env, args.wrapper or [], known_tasks=list(known_tasks()))  # unknown ids fail here
        name = args.env.replace(":", "-").replace("/", "-")
        # rl-zoo3 evaluates greedily except on Atari and MiniGrid, where an argmax policy can get stuck.
        stochastic = any(marker in args.env for marker in ("MiniGrid", "NoFrameskip", "ALE/"))
        task = TaskConfig(
            name=name, target_env=args.env, source_env=args.env, eval=EvalSettings(deterministic=not stochastic)
        )
    if args.gym_package:
        task = task.override(env_packages=[*task.env_packages, *args.gym_package])
    return apply_options(task, args, ENV_OPTIONS)


def finetune_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="finetune.py",
        description="Fine-tune a pretrained PPO agent with EVA-initialized LoRA (and the baselines) on a target env.",
    )
    add_env_arguments(parser)
    add_agent_arguments(parser)
    add_options(parser, FINETUNE_OPTIONS, "fine-tuning")
    parser.add_argument("--log-dir", type=Path, default=Path("runs"), help="TensorBoard and results root (runs)")
    parser.add_argument("--resume", action="store_true", help="continue interrupted runs from their checkpoints")
    add_overwrite_argument(parser)
    parser.add_argument(
        "--workers",
        type=_positive_int,
        help="runs side by side, a process each (default: one per CPU core, at most one per run; 1: one after "
        "the other)",
    )
    parser.add_argument(
        "--video",
        action="store_true",
        help="record the pretrained and each fine-tuned agent: GIFs beside each run and in its TensorBoard",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start over the runs whose folders under --log-dir hold runs made with other settings (without it, such "
        "a folder is an error that names what differs)",
    )


def finetune_task(args: argparse.Namespace) -> TaskConfig:
    """The task of a ``finetune`` command line: the task file with every given option applied."""
    return apply_options(resolve_task(args), args, (*ADAPTER_OPTIONS, *FINETUNE_OPTIONS))


def finetune_main(argv: Sequence[str] | None = None) -> int:
    from eva_rl.experiments.finetune import finetune, summary_table, written_files

    args = finetune_parser().parse_args(argv)

    def body() -> int:
        torch.set_num_threads(args.threads)
        task = finetune_task(args)
        agent_path = _agent_path(task, args)
        progress = not args.no_progress
        print(f"[eva-rl] task {task.name}: {task.target_env}, agent {agent_path}")
        runs = len(task.methods) * len(task.seeds)
        workers = args.workers or max(1, min(runs, os.cpu_count() or 1))
        results = finetune(
            task,
            agent_path,
            args.log_dir,
            task.methods,
            task.seeds,
            args.device,
            args.resume,
            progress,
            args.overwrite,
            workers=workers,
        )
        board = args.log_dir / task.name
        print()
        print(summary_table(results))
        run_dirs = [board / result.method / f"seed{result.seed}" for result in results]
        if args.video:
            from eva_rl.experiments.videos import record_runs

            print("[eva-rl] recording the agents (--video)")
            record_runs(run_dirs)
        print(f"\nResults: {board}/<method>/seed<k>/: {written_files(run_dirs, [r.method for r in results])}")
        print(f"TensorBoard: tensorboard --logdir {board}")
        return 0

    return _guarded(body)


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


def _guarded(body: Callable[[], int]) -> int:
    """Run a command's body: every eva-rl error becomes one ``error:`` line and exit code 2."""
    one_line_warnings()
    try:
        return body()
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


def pretrain_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="pretrain.py", description="Train the source PPO agent of a task, reproducibly, with a model card."
    )
    add_env_arguments(parser)
    add_options(parser, PRETRAIN_OPTIONS, "pretraining")
    parser.add_argument(
        "--eval-episodes", type=_positive_int, default=100, help="episodes of the final evaluation (>= 100)"
    )
    parser.add_argument("--out", type=Path, help="output folder (default: agents/<source env id>/)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def pretrain_main(argv: Sequence[str] | None = None) -> int:
    from eva_rl.experiments.pretrain import pretrain

    args = pretrain_parser().parse_args(argv)

    def body() -> int:
        torch.set_num_threads(args.threads)
        if args.out is not None:
            check_writable(args.out, f"--out {args.out}")
        task = apply_options(resolve_task(args), args, PRETRAIN_OPTIONS)
        command = " ".join(["python", "scripts/pretrain.py", *(argv if argv is not None else sys.argv[1:])])
        card = pretrain(
            task,
            out=args.out,
            eval_episodes=args.eval_episodes,
            device=args.device,
            command=command,
            progress=not args.no_progress,
        )
        print(f"[eva-rl] agent: {card['path']}")
        print(
            f"[eva-rl] return on {card['source_env']}: {card['eval_return']:.3f} over {card['eval_episodes']} episodes"
        )
        if card.get("target_return") is not None:
            print(f"[eva-rl] zero-shot return on {card['target_env']}: {card['target_return']:.3f}")
        return 0

    return _guarded(body)


def compare_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="compare.py", description="Run a suite of transfer tasks: methods x seeds, then IQM, CIs and plots."
    )
    parser.add_argument("--suite", required=True, help="a suite name in configs/suites/ or a YAML path")
    parser.add_argument("--methods", type=comma_list, help=f"comma list out of {','.join(method_names())}")
    parser.add_argument("--seeds", type=_positive_int, help="run seeds 0..N-1 (default: the suite's)")
    parser.add_argument(
        "--workers", type=_positive_int, default=1, help="parallel runs (processes), one CPU thread each"
    )
    parser.add_argument("--log-dir", type=Path, default=Path("runs"), help="results root (runs)")
    parser.add_argument(
        "--tune", action="store_true", help="run the suite's tuning sweep on its tuning seeds and print the choices"
    )
    parser.add_argument(
        "--rank-study",
        action="store_true",
        help="run the suite's rank study (its methods at each of its ranks on one task) and plot against the rank",
    )
    parser.add_argument("--backend", choices=("local", "ray"), default="local", help="where runs execute (local)")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: redraw the page from the completed runs (--methods, --seeds restrict it)",
    )
    parser.add_argument("--ray-address", help="Ray cluster address, or 'auto'; default: start a local Ray instance")
    add_overwrite_argument(parser)
    return parser


def compare_main(argv: Sequence[str] | None = None) -> int:
    from eva_rl.experiments.compare import compare, rank_study, tune
    from eva_rl.experiments.suites import load_suite

    args = compare_parser().parse_args(argv)

    def body() -> int:
        suite = load_suite(args.suite)
        if args.methods is not None:
            suite.check_methods(args.methods)
        if args.rank_study:
            if args.tune or args.methods or args.seeds or args.backend != "local":
                raise ConfigError(
                    "--rank-study runs the suite's rank_study as written: drop --tune, --methods, --seeds and --backend"
                )
            rank_study(suite, args.log_dir, args.workers, report_only=args.report_only, overwrite=args.overwrite)
            out = args.log_dir / suite.name
            print(f"\nRank study: {out}/rank_study.md, rank_study.json, rank_study.png")
            return 0
        if args.tune:
            chosen = tune(suite, args.log_dir, args.methods, args.workers, overwrite=args.overwrite)
            print(f"\nTuning: {args.log_dir / (suite.name + '-tuning')}/tuning.json. For the suite file:")
            print(yaml.safe_dump({"method_settings": chosen}, sort_keys=False))
            return 0
        seeds = list(range(args.seeds)) if args.seeds else None
        compare(
            suite,
            args.log_dir,
            args.methods,
            seeds,
            args.workers,
            backend=args.backend,
            ray_address=args.ray_address,
            report_only=args.report_only,
            overwrite=args.overwrite,
        )
        out = args.log_dir / suite.name
        print(f"\nResults: {out}/results.md, results.json, sample_efficiency.png, final_return.png, eva_ranks.png")
        print(f"TensorBoard: tensorboard --logdir {out}")
        return 0

    return _guarded(body)


def inspect_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="eva-rl inspect", description="Run EVA only and show its allocation.")
    add_env_arguments(parser)
    add_agent_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("eva_allocation.png"), help="PNG of the allocation")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def inspect_main(argv: Sequence[str] | None = None) -> int:
    from eva_rl.experiments.inspection import allocation_table, inspect_eva, save_allocation_png

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):  # eva-rl inspect <bank folder>
        return bank_main(argv)
    args = inspect_parser().parse_args(argv)

    def body() -> int:
        torch.set_num_threads(args.threads)
        check_writable(args.out.parent, f"--out {args.out}")
        task = apply_options(resolve_task(args), args, ADAPTER_OPTIONS)
        agent_path = _agent_path(task, args)
        device = "cpu" if args.device == "auto" else args.device
        result = inspect_eva(task, agent_path, device, progress=not args.no_progress)
        print(allocation_table(result))
        print(f"allocation: {save_allocation_png(result, args.out)}")
        return 0

    return _guarded(body)


def bank_main(argv: Sequence[str] | None = None) -> int:
    parser = CommandParser(
        prog="eva-rl inspect BANK", description="Show an adapter bank's tasks, ranks and sizes (and their returns)."
    )
    parser.add_argument("bank", type=Path, help="a bank folder (bank.json and adapters/), e.g. from eva-rl continual")
    parser.add_argument("--evaluate", action="store_true", help="evaluate each task through the bank")
    parser.add_argument("--episodes", type=_positive_int, help="episodes per task (default: the task's)")
    args = parser.parse_args(argv)

    def body() -> int:
        from eva_rl.bank import AdapterBank
        from eva_rl.experiments.continual import evaluate_bank
        from eva_rl.experiments.inspection import bank_table

        torch.set_num_threads(1)
        bank = AdapterBank.load(args.bank, device="cpu")
        returns = evaluate_bank(bank, args.episodes) if args.evaluate else None
        print(bank_table(bank, returns))
        return 0

    return _guarded(body)


def continual_main(argv: Sequence[str] | None = None) -> int:
    parser = CommandParser(
        prog="eva-rl continual",
        description="Fine-tune a sequence of tasks into adapter banks (and full copies, and one network in turn), "
        "then report average return, forgetting, forward transfer and memory.",
    )
    parser.add_argument("--sequence", required=True, help="a sequence name in configs/sequences/ or a YAML path")
    parser.add_argument("--workers", type=_positive_int, default=1, help="parallel runs (processes)")
    parser.add_argument("--log-dir", type=Path, default=Path("runs"), help="results root (runs)")
    args = parser.parse_args(argv)

    def body() -> int:
        from eva_rl.experiments.continual import load_sequence, run_sequence

        sequence = load_sequence(args.sequence)
        run_sequence(sequence, args.log_dir, args.workers)
        out = args.log_dir / sequence.name
        print(f"\nContinual: {out}/continual.md, continual.json, continual.png; banks in {out}/banks/")
        return 0

    return _guarded(body)


def merge_main(argv: Sequence[str] | None = None) -> int:
    from eva_rl.adapt import merge

    parser = CommandParser(
        prog="eva-rl merge", description="Fold a run's adapters into a plain SB3 zip (merged.zip) for deployment."
    )
    parser.add_argument("run_dir", type=Path, help="a run folder holding model.zip, or a model zip")
    parser.add_argument("--out", type=Path, help="output zip (default: <run-dir>/merged.zip)")
    args = parser.parse_args(argv)

    def body() -> int:
        source = args.run_dir / "model.zip" if args.run_dir.is_dir() else args.run_dir
        if source.is_file() and not _trusted_location(source):
            print(f"[eva-rl] note: {source} is unpickled to load it, which can run code: use only files you trust")
        out = args.out or source.with_name("merged.zip")
        if args.out is not None:
            check_writable(out.parent, f"--out {out}")
        merged = merge(load_agent(source, device="cpu"))
        atomic_save_model(merged, out)
        print(f"merged: {out} (policy {type(merged.policy).__name__}; loads with plain {type(merged).__name__}.load)")
        stats = source.with_name(STATS)
        if stats.is_file():  # the merged policy sees observations normalized with the run's statistics
            if out.parent.resolve() != stats.parent.resolve():
                shutil.copyfile(stats, out.with_name(STATS))
            print(f"VecNormalize statistics: {out.with_name(STATS)} (load them with VecNormalize.load to evaluate)")
        return 0

    return _guarded(body)


def plot_runs_main(argv: Sequence[str] | None = None) -> int:
    """``scripts/plot_runs.py``: a task's runs from their TensorBoard event files, as one PNG."""
    from eva_rl.experiments.plots import plot_runs

    parser = CommandParser(
        prog="plot_runs.py",
        description="Render a task's runs (eval return and training return per method) from its TensorBoard event "
        "files.",
    )
    parser.add_argument("board", type=Path, help="<log-dir>/<task>, holding <method>/seed<k>/ runs")
    parser.add_argument("--out", type=Path, default=Path("runs.png"), help="PNG path (runs.png)")
    args = parser.parse_args(argv)

    def body() -> int:
        check_writable(args.out.parent, f"--out {args.out}")
        print(plot_runs(args.board, args.out))
        return 0

    return _guarded(body)


def record_main(argv: Sequence[str] | None = None) -> int:
    parser = CommandParser(
        prog="eva-rl record",
        description="Record the agent of completed runs: agent.gif and before_after.gif (the pretrained agent beside "
        "it) in each run folder, and both in the run's TensorBoard (images tab).",
    )
    parser.add_argument("run_dirs", type=Path, nargs="+", help="run folders (<log-dir>/<task>/<method>/seed<k>)")
    parser.add_argument("--seed", type=int, help="episode and sampling seed (default: the task's eval seed)")
    parser.add_argument("--max-steps", type=_positive_int, default=300, help="frames per episode at most (300)")
    args = parser.parse_args(argv)

    def body() -> int:
        from eva_rl.experiments.videos import record_runs

        for path in record_runs(args.run_dirs, args.max_steps, args.seed):
            print(f"video: {path}")
        return 0

    return _guarded(body)


def bench_main(argv: Sequence[str] | None = None) -> int:
    from eva_rl.experiments.bench import bench_main as main

    return _guarded(lambda: main(argv))


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "pretrain": (pretrain_main, "train a task's source agent, reproducibly, with a model card"),
    "finetune": (finetune_main, "fine-tune a pretrained agent on a target env with EVA-LoRA and the baselines"),
    "compare": (compare_main, "run a suite of tasks x methods x seeds, then IQM, confidence intervals and plots"),
    "continual": (continual_main, "fine-tune a sequence of tasks into adapter banks; report forgetting and memory"),
    "inspect": (inspect_main, "run EVA only and show its ranks and captured variance; or show an adapter bank"),
    "merge": (merge_main, "fold a run's adapters into a plain SB3 zip for deployment"),
    "record": (record_main, "record completed runs' agents, before and after fine-tuning, as GIFs"),
    "bench": (bench_main, "measure EVA's cost and LoRA's training throughput"),
}


def usage() -> str:
    """``eva-rl --help``: every command with one line."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
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
    return COMMANDS[argv[0]][0](argv[1:])
