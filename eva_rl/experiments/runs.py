"""One fine-tuning run: a method and a seed on a task, written to its own folder, resumable, skipped when complete.

Layout: ``<log_dir>/<task>/<method>/seed<k>/`` holds the TensorBoard events, ``model.zip``, ``result.json``,
``adapter/`` (adapter runs: the adapter-only checkpoint), ``eva.json`` (runs that used EVA), ``vecnormalize.pkl``
(agents trained with VecNormalize: the run's own statistics, which evaluating ``model.zip`` needs), and while
running ``checkpoint.zip`` (+ ``checkpoint_vecnormalize.pkl``) and ``state.json`` for ``--resume``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.logger import HParam, Logger, TensorBoardOutputFormat, configure
from stable_baselines3.common.vec_env import VecEnv
from torch.utils.tensorboard import SummaryWriter

from eva_rl.adapt import adapt
from eva_rl.checkpoints import save_adapter
from eva_rl.errors import ConfigError, EvaConvergenceError, EvaRLError
from eva_rl.eva_logging import record_eva_report
from eva_rl.eva_report import EvaReport
from eva_rl.experiments.environments import agent_env
from eva_rl.experiments.tasks import TaskConfig, algorithm_arguments
from eva_rl.experiments.training import CHECKPOINT_BUFFER, CHECKPOINT_STATS, STATS, RunCallback, count_parameters
from eva_rl.files import atomic_save_model, atomic_save_stats, atomic_write_json
from eva_rl.loading import ALGORITHMS, PretrainedAgent, algorithm_name, load_agent, load_pretrained
from eva_rl.methods import get_method


class RunDirError(EvaRLError, ValueError):
    """A run folder in a state that needs the user's decision."""


@dataclass
class RunSpec:
    """One run: a method and a seed on a task (the task as that method runs it, see ``TaskConfig.for_method``)."""

    task: TaskConfig
    method: str
    seed: int
    log_dir: Path
    agent_path: Path
    device: str = "auto"

    @property
    def run_dir(self) -> Path:
        return self.log_dir / self.task.name / self.method / f"seed{self.seed}"


@dataclass
class RunResult:
    """What a run wrote to ``result.json`` (:meth:`to_dict` / :meth:`from_dict` keep that file's fields).

    :ivar eval_curve: ``[[env step, mean eval return], ...]``, from the step-0 evaluation (the jumpstart) on.
    :ivar eva_env_steps: Env steps EVA's own rollouts took before PPO (0 without EVA or with EVA on PPO's data).
    :ivar eva_skipped_steps: Env steps of PPO rollouts that fed EVA without an update (EVA on PPO's data).
    :ivar source_return: The fine-tuned model's return back on the task's source env (``compare.py`` adds it).
    :ivar algorithm: The algorithm that fine-tuned (``"ppo"``, ``"a2c"``...; results before it existed were PPO).
    """

    task: str
    method: str
    seed: int
    total_timesteps: int
    jumpstart: float
    final_return: float
    best_return: float
    eval_curve: list[list[float]]
    trainable_params: int
    total_params: int
    wall_seconds: float
    eva_env_steps: int = 0
    eva_skipped_steps: int = 0
    eva_seconds: float = 0.0
    source_return: float | None = field(default=None)
    algorithm: str = "ppo"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        """Read ``result.json`` content; fields added later get their defaults, unknown ones are ignored.

        :raises ConfigError: if a field every result has is missing.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{key: value for key, value in data.items() if key in known})
        except TypeError as error:
            raise ConfigError(f"not a run result ({error})") from error

    @classmethod
    def read(cls, path: Path) -> RunResult:
        return cls.from_dict(json.loads(path.read_text()))

    def sample_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """The eval curve with EVA's own env steps added to the x-axis, so methods compare in samples."""
        curve = np.asarray(self.eval_curve, float)
        return curve[:, 0] + self.eva_env_steps, curve[:, 1]


def run(spec: RunSpec, progress: bool = True, resume: bool = False) -> RunResult:
    """Run (or resume, or skip if complete) one method/seed and return its result.

    :param resume: Continue from the run folder's checkpoint; without it an unfinished run is an error.
    :raises RunDirError: for an unfinished run without ``resume``, or a checkpoint that cannot be resumed.
    """
    result_path = spec.run_dir / "result.json"
    if result_path.exists():
        return RunResult.read(result_path)
    with run_lock(spec.run_dir):
        if result_path.exists():  # finished by another process between the check above and the lock
            return RunResult.read(result_path)
        if (spec.run_dir / "checkpoint.zip").exists() and not resume:
            raise RunDirError(
                f"{spec.run_dir} holds an unfinished run; pass --resume to continue it, or use another --log-dir"
            )
        return _run_locked(spec, progress)


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the duration of a run, so two processes never write one run folder.

    The lock is the operating system's (``flock``), so a killed process releases it.

    :raises RunDirError: if another process holds it.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            raise RunDirError(
                f"{run_dir} is in use by another run; wait for it to finish or use another --log-dir"
            ) from error
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_locked(spec: RunSpec, progress: bool) -> RunResult:
    """The run itself, under its folder's lock: envs, the model (new or resumed), training, outputs."""
    start = time.perf_counter()
    agent = load_pretrained(spec.agent_path, device=spec.device)
    # The model is saved before state.json: a checkpoint without one was cut off, and the run starts over.
    resuming = (spec.run_dir / "checkpoint.zip").exists() and (spec.run_dir / "state.json").exists()
    stats = spec.run_dir / CHECKPOINT_STATS if resuming and (spec.run_dir / CHECKPOINT_STATS).exists() else None
    task = spec.task
    with ExitStack() as envs:
        train_env = envs.enter_context(
            closing(agent_env(task, agent, task.n_envs, spec.seed, training=task.update_obs_stats, stats=stats))
        )
        eval_env = envs.enter_context(
            closing(agent_env(task, agent, task.eval.env_count, task.eval.seed, evaluation=True, stats=stats))
        )
        if resuming:
            model, state = _resume_model(spec, agent, train_env)
        else:
            model, state = _start_model(spec, agent, train_env, progress), None
        callback = _run_callback(spec, eval_env, state, progress)
        callback.wall_before += time.perf_counter() - start
        _train(spec, model, callback)
        return _write_outputs(spec, model, callback)


def run_algorithm(task: TaskConfig, agent: PretrainedAgent) -> str:
    """The algorithm a run of ``task`` fine-tunes ``agent`` with: the task's ``algo``, or the agent's own."""
    return task.algo or agent.algorithm


def _start_model(spec: RunSpec, agent: PretrainedAgent, train_env: VecEnv, progress: bool) -> BaseAlgorithm:
    """The model the method starts from, built from the pretrained agent, with its logger and start records."""
    task = spec.task
    algorithm = run_algorithm(task, agent)
    not_taken = sorted(set(task.ppo) - algorithm_arguments(algorithm))
    if not_taken:
        raise ConfigError(
            f"task {task.name}: ppo setting(s) {not_taken} are not arguments of {ALGORITHMS[algorithm].__name__}, "
            f"which fine-tunes this agent; remove them or set algo"
        )
    hyperparameters = {**task.ppo, "seed": spec.seed, "device": spec.device, "verbose": 0, "tensorboard_log": None}
    eva = dataclasses.replace(task.eva, seed=spec.seed)
    model = adapt(agent.model, train_env, spec.method, task.lora, eva, progress, algorithm, **hyperparameters)
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    for stale in spec.run_dir.glob("events.out.tfevents.*"):
        stale.unlink()  # a run killed before its first checkpoint starts over: one curve per run in TensorBoard
    report = _eva_report(model)
    if report is not None:
        atomic_write_json(spec.run_dir / "eva.json", report.to_dict())
    model.set_logger(configure(str(spec.run_dir), ["tensorboard"]))
    _log_start(spec, model, report)
    return model


def _resume_model(spec: RunSpec, agent: PretrainedAgent, train_env: VecEnv) -> tuple[BaseAlgorithm, dict[str, Any]]:
    """The checkpointed model and the callback state (eval curve, wall time) saved with it."""
    checkpoint, state_path = spec.run_dir / "checkpoint.zip", spec.run_dir / "state.json"
    model = load_agent(checkpoint, spec.device, run_algorithm(spec.task, agent), env=train_env)
    if (spec.run_dir / CHECKPOINT_BUFFER).is_file():
        model.load_replay_buffer(spec.run_dir / CHECKPOINT_BUFFER)
    if get_method(spec.method).runs_eva and _eva_report(model) is None:
        raise RunDirError(
            f"{checkpoint} was saved before EVA on PPO's rollouts finished; delete {spec.run_dir} to start it over"
        )
    model.set_logger(resumed_logger(spec.run_dir, model.num_timesteps))
    return model, json.loads(state_path.read_text())


def resumed_logger(run_dir: Path, step: int) -> Logger:
    """A TensorBoard logger for a run resumed at ``step``: what the interrupted process logged after its checkpoint
    is purged from view (TensorBoard's ``purge_step``), so no step shows two values."""
    output = TensorBoardOutputFormat(str(run_dir))
    output.writer.close()
    output.writer = SummaryWriter(log_dir=str(run_dir), purge_step=step + 1)
    return Logger(str(run_dir), [output])


def _eva_report(model: BaseAlgorithm) -> EvaReport | None:
    return getattr(model.policy, "eva_report", None)


def _log_start(spec: RunSpec, model: BaseAlgorithm, report: EvaReport | None) -> None:
    """Hyperparameters (TensorBoard's HPARAMS) and EVA's report at step 0."""
    method = get_method(spec.method)
    task = spec.task
    hparams = {
        "method": spec.method,
        "algorithm": algorithm_name(model),
        "seed": spec.seed,
        "r": task.lora.r if method.uses_rank else 0,
        "rho": task.eva.rho if method.runs_eva else 0.0,
        "tau": task.eva.tau if method.runs_eva else 0.0,
        "lr": float(model.lr_schedule(1.0)),
        "total_timesteps": task.total_timesteps,
    }
    model.logger.record(
        "hparams",
        HParam(hparams, {"eval/mean_return": 0.0, "rollout/ep_rew_mean": 0.0}),
        exclude=("stdout", "log", "json", "csv"),
    )
    if report is not None:
        record_eva_report(model.logger, report)
    model.logger.dump(model.num_timesteps)


def _run_callback(spec: RunSpec, eval_env: VecEnv, state: dict[str, Any] | None, progress: bool) -> RunCallback:
    task = spec.task
    return RunCallback(
        eval_env,
        task.eval.freq,
        task.eval.episodes,
        task.eval.seed,
        task.eval.deterministic,
        spec.run_dir,
        task.checkpoint_freq,
        task.total_timesteps,
        state=state,
        progress=progress,
        description=f"{spec.method} seed{spec.seed}",
    )


def _train(spec: RunSpec, model: BaseAlgorithm, callback: RunCallback) -> None:
    """PPO up to the task's budget; with EVA on PPO's rollouts, EVA must have finished within it."""
    remaining = spec.task.total_timesteps - model.num_timesteps
    if remaining > 0:
        model.learn(remaining, callback=callback, reset_num_timesteps=False)
    if getattr(model, "eva_pending", False):
        raise EvaConvergenceError(
            f"EVA on PPO's rollouts had not converged after the whole budget of {model.num_timesteps} steps "
            f"({model.eva_session.batches_used} batches), so PPO never updated; raise total_timesteps, lower tau, "
            "or let EVA collect its own rollouts (--eva-data rollouts)"
        )


def _write_outputs(spec: RunSpec, model: BaseAlgorithm, callback: RunCallback) -> RunResult:
    """``model.zip``, ``vecnormalize.pkl``, ``adapter/``, ``eva.json`` and last ``result.json`` (its presence marks
    the run complete)."""
    run_dir = spec.run_dir
    report = _eva_report(model)
    if report is not None:
        atomic_write_json(run_dir / "eva.json", report.to_dict())  # EVA on PPO's data finishes during training
    atomic_save_model(model, run_dir / "model.zip")
    atomic_save_stats(model, run_dir / STATS)
    if get_method(spec.method).adapters:
        save_adapter(model, run_dir / "adapter", method=spec.method)
    trainable, total = count_parameters(model)
    returns = [value for _, value in callback.curve]
    result = RunResult(
        task=spec.task.name,
        method=spec.method,
        algorithm=algorithm_name(model),
        seed=spec.seed,
        total_timesteps=int(model.num_timesteps),
        jumpstart=returns[0],
        final_return=returns[-1],
        best_return=max(returns),
        eval_curve=callback.curve,
        trainable_params=trainable,
        total_params=total,
        wall_seconds=round(callback.wall_seconds, 2),
        eva_env_steps=(report.env_steps or 0) if report else 0,
        eva_skipped_steps=report.skipped_steps if report else 0,
        eva_seconds=report.seconds if report else 0.0,
    )
    atomic_write_json(run_dir / "result.json", result.to_dict())
    for leftover in ("checkpoint.zip", CHECKPOINT_STATS, CHECKPOINT_BUFFER, "state.json"):
        (run_dir / leftover).unlink(missing_ok=True)
    return result
