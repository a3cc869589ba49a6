"""The main job: fine-tune a pretrained agent on a target env with each method, log comparable runs.

Methods, all with the same PPO hyperparameters, seeds and a fresh optimizer:

- the adapter methods of :func:`eva_rl.adapt` (``eva``, ``lora``, ``pissa``, ``olora``, ``dora``, ``eva+dora``,
  ``lora-redist``, ``head``);
- ``full``: every weight of the pretrained policy trains;
- ``scratch``: the same architecture from a random init.

Layout: ``<log_dir>/<task>/<method>/seed<k>/`` holds the TensorBoard events, ``model.zip``, ``result.json``,
``adapter/`` (adapter runs: the adapter-only checkpoint), ``eva.json`` (runs that used EVA), and while running
``checkpoint.zip`` + ``state.json`` for ``--resume``.
"""

from __future__ import annotations

import dataclasses
import json
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stable_baselines3 import PPO
from stable_baselines3.common.logger import HParam, configure

from eva_rl.adapt import EVA_METHODS, adapt, ppo_hyperparameters, wrap_target_env
from eva_rl.checkpoints import save_adapter
from eva_rl.environments import env_factory, import_packages, make_vec
from eva_rl.eva import EvaConvergenceError
from eva_rl.tasks import BASELINES, TaskConfig
from eva_rl.training import (
    RunCallback,
    atomic_save_model,
    atomic_write_json,
    count_parameters,
    evaluate,
    record_eva_report,
)


class AgentError(ValueError):
    """A pretrained agent file that is missing or cannot be loaded."""


def load_agent(path: Path, device: str = "auto", **kwargs: Any) -> PPO:
    """``PPO.load`` with clear errors for a missing or corrupt file.

    :raises AgentError: naming the path and what is wrong with it.
    """
    if not path.is_file():
        raise AgentError(f"pretrained agent {str(path)!r} does not exist; pass --pretrained path/to/agent.zip")
    try:
        return PPO.load(path, device=device, **kwargs)
    except (zipfile.BadZipFile, KeyError, EOFError, RuntimeError, ValueError, TypeError) as error:
        raise AgentError(
            f"pretrained agent {str(path)!r} cannot be loaded as an SB3 PPO zip ({type(error).__name__}: {error})"
        ) from error


class RunDirError(ValueError):
    """A run folder in a state that needs the user's decision."""


@dataclass
class RunSpec:
    """One run: a method and a seed on a task."""

    task: TaskConfig
    method: str
    seed: int
    log_dir: Path
    agent_path: Path
    device: str = "auto"

    @property
    def run_dir(self) -> Path:
        return self.log_dir / self.task.name / self.method / f"seed{self.seed}"


def _build_model(spec: RunSpec, agent: PPO, train_env: Any, progress: bool) -> tuple[PPO, dict | None]:
    """The model a method starts from, and EVA's report for adapted runs."""
    hyperparameters = ppo_hyperparameters(agent)
    hyperparameters.update(spec.task.ppo, seed=spec.seed, device=spec.device, verbose=0, tensorboard_log=None)
    if spec.method not in BASELINES:
        eva = dataclasses.replace(spec.task.eva, seed=spec.seed)
        model = adapt(agent, train_env, spec.method, spec.task.lora, eva, progress=progress, **hyperparameters)
        return model, model.policy.eva_report
    model = PPO(type(agent.policy), train_env, policy_kwargs=agent.policy_kwargs, **hyperparameters)
    if spec.method == "full":
        model.policy.load_state_dict(agent.policy.state_dict())
    return model, None


def _log_start(model: PPO, spec: RunSpec, report: dict | None) -> None:
    logger = model.logger
    task = spec.task
    hparams = {
        "method": spec.method,
        "seed": spec.seed,
        "r": task.lora.r if spec.method not in BASELINES else 0,
        "rho": task.eva.rho if spec.method in EVA_METHODS else 0.0,
        "tau": task.eva.tau if spec.method in EVA_METHODS else 0.0,
        "lr": float(model.lr_schedule(1.0)),
        "total_timesteps": task.total_timesteps,
    }
    logger.record(
        "hparams",
        HParam(hparams, {"eval/mean_return": 0.0, "rollout/ep_rew_mean": 0.0}),
        exclude=("stdout", "log", "json", "csv"),
    )
    if report is not None:
        record_eva_report(logger, report)
    logger.dump(model.num_timesteps)


def run(spec: RunSpec, progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """Run (or resume, or skip if complete) one method/seed and return its ``result.json`` content."""
    run_dir = spec.run_dir
    result_path = run_dir / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    checkpoint = run_dir / "checkpoint.zip"
    state_path = run_dir / "state.json"
    if checkpoint.exists() and not resume:
        raise RunDirError(f"{run_dir} holds an unfinished run; pass --resume to continue it, or use another --log-dir")

    task = spec.task
    factory = env_factory(task.target_env, task.wrappers, task.env_kwargs)
    train_env = make_vec(factory, task.n_envs, seed=spec.seed)
    eval_env = make_vec(factory, task.eval.env_count, seed=task.eval.seed)
    state: dict[str, Any] | None = None
    start = time.perf_counter()
    if checkpoint.exists() and state_path.exists():
        state = json.loads(state_path.read_text())
        model = load_agent(checkpoint, device=spec.device, env=train_env)
        if spec.method in EVA_METHODS and getattr(model.policy, "eva_report", None) is None:
            raise RunDirError(
                f"{checkpoint} was saved before EVA on PPO's rollouts finished; delete {run_dir} to start it over"
            )
        report = json.loads((run_dir / "eva.json").read_text()) if (run_dir / "eva.json").exists() else None
        model.set_logger(configure(str(run_dir), ["tensorboard"]))
    else:
        agent = load_agent(spec.agent_path, device=spec.device)
        model, report = _build_model(spec, agent, train_env, progress)
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in run_dir.glob("events.out.tfevents.*"):
            stale.unlink()  # a run killed before its first checkpoint starts over: one curve per run in TensorBoard
        if report is not None:
            atomic_write_json(run_dir / "eva.json", report)
        model.set_logger(configure(str(run_dir), ["tensorboard"]))
        _log_start(model, spec, report)
    setup_seconds = time.perf_counter() - start

    callback = RunCallback(
        eval_env,
        task.eval.freq,
        task.eval.episodes,
        task.eval.seed,
        task.eval.deterministic,
        run_dir,
        task.checkpoint_freq,
        task.total_timesteps,
        state=state,
        progress=progress,
        description=f"{spec.method} seed{spec.seed}",
    )
    callback.wall_before += setup_seconds
    remaining = task.total_timesteps - model.num_timesteps
    if remaining > 0:
        model.learn(remaining, callback=callback, reset_num_timesteps=False)
    if getattr(model, "eva_pending", False):
        raise EvaConvergenceError(
            f"EVA on PPO's rollouts had not converged after the whole budget of {model.num_timesteps} steps "
            f"({model.eva_session.batches_used} batches), so PPO never updated; raise total_timesteps, lower tau, "
            "or let EVA collect its own rollouts (--eva-data rollouts)"
        )
    if report is None and getattr(model.policy, "eva_report", None) is not None:
        report = model.policy.eva_report  # EVA ran on PPO's first rollouts (EvaPPO logged it then)
        atomic_write_json(run_dir / "eva.json", report)
    atomic_save_model(model, run_dir / "model.zip")
    if spec.method not in BASELINES:
        save_adapter(model, run_dir / "adapter", method=spec.method)
    trainable, total = count_parameters(model)
    returns = [value for _, value in callback.curve]
    result = {
        "task": task.name,
        "method": spec.method,
        "seed": spec.seed,
        "total_timesteps": int(model.num_timesteps),
        "jumpstart": returns[0],
        "final_return": returns[-1],
        "best_return": max(returns),
        "eval_curve": callback.curve,
        "trainable_params": trainable,
        "total_params": total,
        "wall_seconds": round(callback.wall_seconds, 2),
        "eva_env_steps": report["env_steps"] if report else 0,
        "eva_skipped_steps": report.get("skipped_steps", 0) if report else 0,
        "eva_seconds": report["seconds"] if report else 0.0,
    }
    atomic_write_json(result_path, result)
    checkpoint.unlink(missing_ok=True)
    state_path.unlink(missing_ok=True)
    train_env.close()
    eval_env.close()
    return result


def pretrained_return(task: TaskConfig, agent_path: Path, device: str = "auto") -> float:
    """The pretrained agent's return on the target env, with the same eval seeds as the runs (the jumpstart)."""
    factory = env_factory(task.target_env, task.wrappers, task.env_kwargs)
    env = make_vec(factory, task.eval.env_count, seed=task.eval.seed)
    agent = load_agent(agent_path, device=device)
    mean, _ = evaluate(agent, env, task.eval.episodes, task.eval.seed, task.eval.deterministic)
    env.close()
    return mean


def check_agent_fits(task: TaskConfig, agent_path: Path) -> None:
    """Stop before any run when the agent's spaces differ from the target env's (the error shows both)."""
    agent = load_agent(agent_path, device="cpu")
    env = env_factory(task.target_env, task.wrappers, task.env_kwargs)()
    try:
        wrap_target_env(agent, env)
    finally:
        env.close()


def summary_table(results: Sequence[dict[str, Any]]) -> str:
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
    rows = [" ".join(f"{r[key]:{align}{fmt}}" for _, align, key, fmt in columns) for r in results]
    return "\n".join([header, "-" * len(header), *rows])


def finetune(
    task: TaskConfig,
    agent_path: Path,
    log_dir: Path,
    methods: Sequence[str],
    seeds: Sequence[int],
    device: str = "auto",
    resume: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Every method x seed, one after the other; completed runs are skipped, so a rerun resumes a sweep."""
    import_packages(task.env_packages)
    check_agent_fits(task, agent_path)
    jumpstart = pretrained_return(task, agent_path, device)
    echo(f"[eva-rl] pretrained agent's return on {task.target_env} (eval seed {task.eval.seed}): {jumpstart:.3f}")
    results = []
    for seed in seeds:
        for method in methods:
            spec = RunSpec(task.for_method(method), method, seed, log_dir, agent_path, device)
            echo(f"[eva-rl] {task.name}: {method} seed {seed} -> {spec.run_dir}")
            results.append(run(spec, progress=progress, resume=resume))
    return results
