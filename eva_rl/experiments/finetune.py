"""The main job: fine-tune a pretrained agent on a target env with each method, and log them as comparable runs.

Every method (:mod:`eva_rl.methods`) runs with the same algorithm, hyperparameters and seeds and a fresh optimizer;
each run is a :class:`~eva_rl.experiments.runs.RunSpec` written to its own folder (see :mod:`eva_rl.experiments.runs`),
carried out by an :class:`~eva_rl.experiments.execute.Executor` (side by side, one progress bar each, for the main job).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path

from eva_rl.adapt import adapter_plan, fine_tuning_algorithm
from eva_rl.experiments.environments import agent_env, import_packages
from eva_rl.experiments.execute import Executor
from eva_rl.experiments.runs import (
    RunResult,
    RunSpec,
    check_algorithm_settings,
    check_run_dir,
    rollout_steps,
    run_settings,
    updates_in_budget,
)
from eva_rl.experiments.tasks import TaskConfig
from eva_rl.experiments.training import evaluate, whole_rollouts
from eva_rl.files import check_writable
from eva_rl.loading import PretrainedAgent, load_pretrained
from eva_rl.methods import get_method
from eva_rl.models import wrap_target_env


def pretrained_return(task: TaskConfig, agent_path: Path, device: str = "auto") -> float:
    """The pretrained agent's return on the target env, with the same eval seeds and observation pipeline as the runs
    (the jumpstart)."""
    agent = load_pretrained(agent_path, device=device)
    with closing(agent_env(task, agent, task.eval.env_count, task.eval.seed, evaluation=True)) as env:
        return evaluate(agent.model, env, task.eval.episodes, task.eval.seed, task.eval.deterministic).mean


def check_agent_fits(task: TaskConfig, agent_path: Path, methods: Sequence[str] = ()) -> PretrainedAgent:
    """Stop before any run when the agent cannot be fine-tuned on the target env: its spaces differ from the env's
    (the error shows both), the task's algorithm cannot fine-tune it, or a method's LoRA settings do not fit its
    policy (a ``target_modules`` entry that names no layer).

    :return: The loaded agent.
    """
    agent = load_pretrained(agent_path, device="cpu")
    fine_tuning_algorithm(agent.model, task.algo)
    for name in methods:
        method, settings = get_method(name), task.with_overrides(method=name)
        if method.adapters:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the run itself warns about capped ranks
                adapter_plan(agent.model, method, method.lora_config(settings.lora), settings.eva)
    with closing(agent_env(task, agent, 1, task.eval.seed, evaluation=True)) as env:
        wrap_target_env(agent.model, env)
    check_algorithm_settings(task, agent)
    return agent


def summary_table(results: Sequence[RunResult]) -> str:
    """A plain-text table: one row per run."""
    columns = [
        ("method", "<8", "method", "s"),
        ("seed", ">4", "seed", "d"),
        ("jumpstart", ">9", "jumpstart", ".3f"),
        ("final", ">7", "final_return", ".3f"),
        ("best", ">7", "best_return", ".3f"),
        ("trainable", ">10", "trainable_params", ","),
        ("total", ">9", "total_params", ","),
        ("wall s", ">8", "wall_seconds", ".1f"),
    ]
    header = " ".join(f"{title:{align}}" for title, align, _, _ in columns)
    rows = [" ".join(f"{getattr(r, key):{align}{fmt}}" for _, align, key, fmt in columns) for r in results]
    if results and all(r.success_curve for r in results):  # an env that reports success (Meta-World)
        header += f" {'success@0':>9} {'success':>7}"
        rows = [f"{row} {r.success_curve[0][1]:>9.2f} {r.success_curve[-1][1]:>7.2f}" for row, r in zip(rows, results)]
    return "\n".join([header, "-" * len(header), *rows])


def written_files(run_dirs: Sequence[Path], methods: Sequence[str]) -> str:
    """What the runs wrote, one entry per file name, with the methods whose runs have it when not every run does:
    ``"model.zip, result.json, TensorBoard events, eva.json (eva), adapter/ (eva, lora)"``."""
    holders: dict[str, list[str]] = {}
    for run_dir, method in zip(run_dirs, methods):
        for path in sorted(run_dir.iterdir()):
            if path.name.startswith("."):
                continue
            name = "TensorBoard events" if path.name.startswith("events.out.tfevents") else path.name
            name += "/" if path.is_dir() else ""
            if method not in holders.setdefault(name, []):
                holders[name].append(method)
    every = list(dict.fromkeys(methods))
    return ", ".join(name if owners == every else f"{name} ({', '.join(owners)})" for name, owners in holders.items())


def finetune(
    task: TaskConfig,
    agent_path: Path,
    log_dir: Path,
    executor: Executor,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    echo: Callable[[str], None] = print,
) -> list[RunResult]:
    """Every method x seed of ``task`` (its ``methods`` and ``seeds``); completed runs are skipped, so a rerun
    resumes a sweep.

    :param executor: Carries out the runs (:class:`~eva_rl.experiments.execute.SideBySide` for the main job).
    :param resume: Continue interrupted runs from their checkpoints (without it, one is an error before anything
        runs).
    :param overwrite: Start over the runs whose folders hold runs made with other settings (see :func:`run`).
    """
    import_packages(task.env_packages)
    agent = check_agent_fits(task, agent_path, task.methods)
    stats = f", VecNormalize statistics {agent.vec_normalize}" if agent.vec_normalize else ""
    algorithm = (task.algo or agent.algorithm).upper()
    echo(f"[eva-rl] agent: {agent.algorithm.upper()} ({agent.layout}{stats}); fine-tuned with {algorithm}")
    updates, how = updates_in_budget(task, agent)
    count = "an unknown number of" if updates is None else f"{updates:,}"
    echo(f"[eva-rl] each run makes {count} updates in {task.total_timesteps:,} steps ({how})")
    rollout = rollout_steps(task, agent)
    if rollout is not None and task.total_timesteps % rollout:
        trained = whole_rollouts(task.total_timesteps, rollout)
        echo(
            f"[eva-rl] {task.total_timesteps} steps is not a whole number of rollouts ({rollout} steps each): "
            f"each run trains {trained}"
        )
    specs = [
        RunSpec(task.with_overrides(method=method), method, seed, log_dir, agent_path, device)
        for seed in task.seeds
        for method in task.methods
    ]
    check_writable(Path(log_dir))
    for spec in specs:  # a folder that cannot be used stops the job before anything runs
        check_run_dir(spec, run_settings(spec), resume, overwrite)
    for spec in specs:
        echo(f"[eva-rl] {task.name}: {spec.method} seed {spec.seed} -> {spec.run_dir}")
    if executor.workers > 1 and len(specs) > 1:
        echo(f"[eva-rl] {len(specs)} runs, {min(executor.workers, len(specs))} side by side (--workers)")
    return executor.run(specs, resume=resume, overwrite=overwrite)
