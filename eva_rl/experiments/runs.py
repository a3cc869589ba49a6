"""One fine-tuning run: a method and a seed on a task, written to its own folder, resumable, skipped when complete.

Layout: ``<log_dir>/<task>/<method>/seed<k>/`` holds the TensorBoard events, ``model.zip``, ``result.json``,
``adapter/`` (adapter runs: the adapter-only checkpoint), ``eva.json`` (runs that used EVA), ``vecnormalize.pkl``
(agents trained with VecNormalize: the run's own statistics, which evaluating ``model.zip`` needs), and while
running ``settings.json`` and ``checkpoint.zip`` (+ ``checkpoint_vecnormalize.pkl``) and ``state.json`` for
``--resume``.

A run's settings (:func:`run_settings`: the agent, env, algorithm hyperparameters, budget, LoRA and EVA settings)
are recorded in ``result.json`` and compared before a completed or interrupted run is reused: a folder holding a run
made with other settings is an error that names the differences, or, with ``overwrite``, is started over.
"""

from __future__ import annotations

import dataclasses
import fcntl
import inspect
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.logger import HParam, Logger, TensorBoardOutputFormat, configure
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.vec_env import VecEnv
from torch.utils.tensorboard import SummaryWriter

from eva_rl.adapt import adapt
from eva_rl.callbacks import CachedAdapterWeights
from eva_rl.checkpoints import save_adapter
from eva_rl.errors import ConfigError, EvaConvergenceError, EvaRLError
from eva_rl.eva_logging import record_eva_report
from eva_rl.eva_report import EvaReport
from eva_rl.experiments.environments import agent_env
from eva_rl.experiments.resume import restore_runtime_state
from eva_rl.experiments.tasks import TaskConfig, algorithm_arguments
from eva_rl.experiments.training import (
    CHECKPOINT_BUFFER,
    CHECKPOINT_RUNTIME,
    CHECKPOINT_STATS,
    STATS,
    ProgressSink,
    RunCallback,
    count_parameters,
)
from eva_rl.files import atomic_save_model, atomic_save_stats, atomic_write_json, file_sha256
from eva_rl.loading import ALGORITHMS, PretrainedAgent, agent_zip, algorithm_name, load_agent, load_pretrained
from eva_rl.methods import get_method
from eva_rl.models import algorithm_hyperparameters


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
    :ivar settings: What the run was made with (:func:`run_settings`); ``None`` in results written before it existed.
    :ivar agent: The pretrained agent's path, as the run was given it (``eva-rl record`` loads it again).
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
    settings: dict[str, Any] | None = None
    agent: str | None = None

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


def run(
    spec: RunSpec, progress: bool | ProgressSink = True, resume: bool = False, overwrite: bool = False
) -> RunResult:
    """Run (or resume, or skip if complete) one method/seed and return its result.

    :param progress: Progress bars (EVA's and PPO's), or a sink that receives PPO's progress (see
        :class:`~eva_rl.experiments.training.RunCallback`).
    :param resume: Continue from the run folder's checkpoint; without it an unfinished run is an error.
    :param overwrite: Start over a run whose folder holds a run (complete or not) made with other settings; without
        it such a folder is an error naming what differs.
    :raises RunDirError: for an unfinished run without ``resume``, or a folder holding a run made with other settings.
    """
    settings = run_settings(spec)
    result_path = spec.run_dir / "result.json"
    if result_path.exists() and not overwrite:
        return _completed(spec, settings)
    with run_lock(spec.run_dir):
        if check_run_dir(spec, settings, resume, overwrite):
            _clear_run_dir(spec.run_dir)
        if result_path.exists():  # also: finished by another process between the check above and the lock
            return _completed(spec, settings)
        return _run_locked(spec, settings, progress)


def check_run_dir(spec: RunSpec, settings: dict[str, Any], resume: bool = False, overwrite: bool = False) -> bool:
    """Whether the run folder can be used as asked: a completed run is reused, an unfinished one resumed (with
    ``resume``), and one made with other settings started over (with ``overwrite``).

    :return: Whether the folder holds a run made with other settings, to be cleared (``overwrite``).
    :raises RunDirError: for an unfinished run without ``resume``, or a run made with other settings without
        ``overwrite``, naming the settings that differ.
    """
    run_dir = spec.run_dir
    recorded = _recorded_settings(run_dir)
    stale = recorded is not None and bool(settings_differences(recorded, settings))
    kept = "a completed" if (run_dir / "result.json").exists() else None
    if kept is None and (run_dir / "checkpoint.zip").exists():
        kept = "an unfinished"
    if stale and kept and not overwrite:
        raise RunDirError(_stale_message(run_dir, kept, recorded, settings))
    if kept == "an unfinished" and not stale and not resume:
        raise RunDirError(f"{run_dir} holds an unfinished run; pass --resume to continue it, or use another --log-dir")
    return stale


def run_settings(spec: RunSpec) -> dict[str, Any]:
    """What decides a run's outcome besides its folder (task, method, seed), in the form ``result.json`` keeps.

    The agent enters by the SHA-256 of its model zip, so a moved project still matches and a re-trained agent does
    not; LoRA settings count only for methods with an adapter policy, EVA's only for methods that run EVA.
    """
    task, method = spec.task, get_method(spec.method)
    settings: dict[str, Any] = {
        "agent_sha256": file_sha256(agent_zip(spec.agent_path)),
        "target_env": task.target_env,
        "env_kwargs": task.env_kwargs,
        "wrappers": task.wrappers,
        "algo": task.algo,
        "hyperparameters": task.ppo,
        "n_envs": task.n_envs,
        "update_obs_stats": task.update_obs_stats,
        "total_timesteps": task.total_timesteps,
        "eval": dataclasses.asdict(task.eval),
    }
    if not method.pretrained:
        settings.update(policy=task.policy, policy_kwargs=task.policy_kwargs)
    if method.adapters:
        settings["lora"] = dataclasses.asdict(method.lora_config(task.lora))
    if method.runs_eva:
        settings["eva"] = {k: v for k, v in dataclasses.asdict(task.eva).items() if k != "seed"}  # the run's seed
    return json.loads(json.dumps(settings))


def settings_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``["key: recorded -> current", ...]`` for every (dotted, nested) setting that differs."""
    old, new = _flatten(recorded), _flatten(current)
    missing = "unset"
    return [
        f"{key}: {old.get(key, missing)!r} -> {new.get(key, missing)!r}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key, missing) != new.get(key, missing)
    ]


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _stale_message(run_dir: Path, kind: str, recorded: dict[str, Any], settings: dict[str, Any]) -> str:
    differences = "; ".join(settings_differences(recorded, settings))
    return (
        f"{run_dir} holds {kind} run made with other settings ({differences}); pass --overwrite to start it over "
        "with these settings, or use another --log-dir"
    )


def _recorded_settings(run_dir: Path) -> dict[str, Any] | None:
    """The settings of the run the folder holds: its ``result.json``'s, or an unfinished run's ``settings.json``
    (``None``: nothing there, or a run written before settings were recorded)."""
    for name in ("result.json", "settings.json"):
        path = run_dir / name
        if path.is_file():
            data = json.loads(path.read_text())
            return data.get("settings") if name == "result.json" else data
    return None


def _completed(spec: RunSpec, settings: dict[str, Any]) -> RunResult:
    """The result of the completed run in ``spec.run_dir``, if it was made with ``settings``.

    :raises RunDirError: naming the settings that differ.
    """
    result = RunResult.read(spec.run_dir / "result.json")
    if result.settings is not None and settings_differences(result.settings, settings):
        raise RunDirError(_stale_message(spec.run_dir, "a completed", result.settings, settings))
    return result


def completed_result(spec: RunSpec) -> RunResult:
    """The completed run of ``spec`` (for reports), checked against its settings like :func:`run` checks them.

    :raises RunDirError: if the folder holds a run made with other settings.
    """
    return _completed(spec, run_settings(spec))


def _clear_run_dir(run_dir: Path) -> None:
    """Remove everything a run wrote to ``run_dir`` (its lock stays: the caller holds it)."""
    for path in run_dir.iterdir():
        if path.name == ".lock":
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


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


def _run_locked(spec: RunSpec, settings: dict[str, Any], progress: bool | ProgressSink) -> RunResult:
    """The run itself, under its folder's lock: envs, the model (new or resumed), training, outputs."""
    start = time.perf_counter()
    if callable(progress):  # what the run does before PPO's first step (its bar shows nothing yet)
        progress(0, spec.task.total_timesteps, "EVA" if get_method(spec.method).runs_eva else "starting")
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
            model, state = _start_model(spec, agent, train_env, progress is True), None
            atomic_write_json(spec.run_dir / "settings.json", settings)
        callback = _run_callback(spec, eval_env, state, progress)
        callback.wall_before += time.perf_counter() - start
        _train(spec, model, callback)
        return _write_outputs(spec, model, callback, settings)


def run_algorithm(task: TaskConfig, agent: PretrainedAgent) -> str:
    """The algorithm a run of ``task`` fine-tunes ``agent`` with: the task's ``algo``, or the agent's own."""
    return task.algo or agent.algorithm


def check_algorithm_settings(task: TaskConfig, agent: PretrainedAgent) -> None:
    """The task's algorithm settings fit the algorithm that fine-tunes ``agent``: every ``ppo`` key is one of its
    arguments, and the budget holds at least one rollout of an on-policy algorithm.

    :raises ConfigError: naming the setting and what would be accepted.
    """
    algorithm = run_algorithm(task, agent)
    not_taken = sorted(set(task.ppo) - algorithm_arguments(algorithm))
    if not_taken:
        raise ConfigError(
            f"task {task.name}: ppo setting(s) {not_taken} are not arguments of {ALGORITHMS[algorithm].__name__}, "
            f"which fine-tunes this agent; remove them or set algo"
        )
    rollout = rollout_steps(task, agent)
    if rollout is not None and task.total_timesteps < rollout:
        raise ConfigError(
            f"total_timesteps={task.total_timesteps} is below one rollout of {ALGORITHMS[algorithm].__name__} "
            f"({rollout} steps: n_steps {rollout // task.n_envs} x n_envs {task.n_envs}), so a run would train "
            f"{rollout} steps; expected at least {rollout}, or a smaller n_steps or n_envs"
        )


def rollout_steps(task: TaskConfig, agent: PretrainedAgent) -> int | None:
    """Env steps per rollout of an on-policy algorithm (``n_steps x n_envs``; a run trains a whole number of them);
    ``None`` for off-policy algorithms."""
    algorithm = ALGORITHMS[run_algorithm(task, agent)]
    if not issubclass(algorithm, OnPolicyAlgorithm):
        return None
    n_steps = task.ppo.get("n_steps")
    if n_steps is None:
        n_steps = algorithm_hyperparameters(agent.model, algorithm).get("n_steps")
    if n_steps is None:
        n_steps = inspect.signature(algorithm.__init__).parameters["n_steps"].default
    return int(n_steps) * task.n_envs


def _start_model(spec: RunSpec, agent: PretrainedAgent, train_env: VecEnv, progress: bool) -> BaseAlgorithm:
    """The model the method starts from, built from the pretrained agent, with its logger and start records."""
    task = spec.task
    check_algorithm_settings(task, agent)
    algorithm = run_algorithm(task, agent)
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
    if (spec.run_dir / CHECKPOINT_RUNTIME).is_file():  # after load, which reseeds every generator
        restore_runtime_state(model, spec.run_dir / CHECKPOINT_RUNTIME)
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
    hparams: dict[str, Any] = {
        "method": spec.method,
        "algorithm": algorithm_name(model),
        "seed": spec.seed,
        "lr": float(model.lr_schedule(1.0)),
        "total_timesteps": task.total_timesteps,
    }
    if method.uses_rank:  # only the settings a method has, so HPARAMS shows no made-up zeros for full fine-tuning
        hparams["r"] = task.lora.r
    if method.runs_eva:
        hparams.update(rho=task.eva.rho, tau=task.eva.tau)
    model.logger.record(
        "hparams",
        HParam(hparams, {"eval/mean_return": 0.0, "rollout/ep_rew_mean": 0.0}),
        exclude=("stdout", "log", "json", "csv"),
    )
    if report is not None:
        record_eva_report(model.logger, report)
    model.logger.dump(model.num_timesteps)


def _run_callback(
    spec: RunSpec, eval_env: VecEnv, state: dict[str, Any] | None, progress: bool | ProgressSink
) -> RunCallback:
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
        model.learn(remaining, callback=[callback, CachedAdapterWeights()], reset_num_timesteps=False)
    if getattr(model, "eva_pending", False):
        raise EvaConvergenceError(
            f"EVA on PPO's rollouts had not converged after the whole budget of {model.num_timesteps} steps "
            f"({model.eva_session.batches_used} batches), so PPO never updated; raise total_timesteps, lower tau, "
            "or let EVA collect its own rollouts (--eva-data rollouts)"
        )


def _write_outputs(spec: RunSpec, model: BaseAlgorithm, callback: RunCallback, settings: dict[str, Any]) -> RunResult:
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
        settings=settings,
        agent=str(spec.agent_path),
    )
    atomic_write_json(run_dir / "result.json", result.to_dict())
    for leftover in (
        "checkpoint.zip",
        CHECKPOINT_STATS,
        CHECKPOINT_BUFFER,
        CHECKPOINT_RUNTIME,
        "state.json",
        "settings.json",
    ):
        (run_dir / leftover).unlink(missing_ok=True)
    return result
