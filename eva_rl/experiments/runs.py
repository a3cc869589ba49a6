"""One fine-tuning run: a method and a seed on a task, written to its own folder
(:class:`~eva_rl.experiments.run_folder.RunFolder`), resumable, skipped when complete.

A run's settings (:func:`run_settings`: the agent, env, algorithm hyperparameters, budget, LoRA and EVA settings)
are recorded in ``result.json`` and compared before a completed or interrupted run is reused: a folder holding a run
made with other settings is an error that names the differences, or, with ``overwrite``, is started over.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import time
import warnings
from collections.abc import Collection
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.logger import HParam, Logger, TensorBoardOutputFormat, configure
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.vec_env import VecEnv
from torch.utils.tensorboard import SummaryWriter

from eva_rl.adapt import adapt
from eva_rl.callbacks import CachedAdapterWeights, CriticWarmup
from eva_rl.checkpoints import save_adapter
from eva_rl.devices import run_device
from eva_rl.errors import ConfigError
from eva_rl.eva_logging import record_eva_report
from eva_rl.eva_report import EvaReport
from eva_rl.experiments.environments import agent_env
from eva_rl.experiments.machine import describe_platform
from eva_rl.experiments.resume import restore_runtime_state
from eva_rl.experiments.run_folder import Checkpoint, RunDirError, RunFolder, RunResult
from eva_rl.experiments.tasks import TaskConfig, algorithm_arguments
from eva_rl.experiments.training import ProgressSink, RunCallback, count_parameters, evaluate
from eva_rl.files import atomic_save_model, atomic_save_stats, file_sha256
from eva_rl.loading import (
    ALGORITHMS,
    PretrainedAgent,
    agent_inputs,
    agent_zip,
    algorithm_name,
    load_agent,
    load_pretrained,
)
from eva_rl.methods import get_method
from eva_rl.models import algorithm_hyperparameters


@dataclass
class RunSpec:
    """One run: a method and a seed on a task (the task as that method runs it, see ``TaskConfig.with_overrides``)."""

    task: TaskConfig
    method: str
    seed: int
    log_dir: Path
    agent_path: Path
    device: str = "auto"

    @property
    def folder(self) -> RunFolder:
        return RunFolder.of(self.log_dir, self.task.name, self.method, self.seed)

    @property
    def run_dir(self) -> Path:
        return self.folder.path


def run(
    spec: RunSpec, progress: bool | ProgressSink = True, resume: bool = False, overwrite: bool = False
) -> RunResult:
    """Run (or resume, or skip if complete) one method/seed and return its result.

    :param progress: Progress bars (EVA's and PPO's), or a sink that receives PPO's progress (see
        :class:`~eva_rl.experiments.training.RunCallback`).
    :param resume: Continue from the run folder's checkpoint; without it an unfinished run is an error.
    :param overwrite: Start over a run whose folder holds a run (complete or not) made with other settings; without
        it such a folder is an error naming what differs. The run it replaces is kept aside until the new one
        completes, and comes back if it does not.
    :raises RunDirError: for an unfinished run without ``resume``, or a folder holding a run made with other settings.
    """
    settings = run_settings(spec)
    folder = spec.folder
    if folder.is_complete and not overwrite:
        return _completed(spec, settings)
    with folder.lock():
        folder.settle_set_aside()  # a replacement that never completed: the run it was to replace comes back
        if check_run_dir(spec, settings, resume, overwrite):
            folder.set_aside()  # until the replacing run completes, so a Ctrl-C or a crash loses nothing
        if folder.is_complete:  # also: finished by another process between the check above and the lock
            return _completed(spec, settings)
        try:
            return _run_locked(spec, settings, progress)
        finally:
            folder.settle_set_aside()


def check_run_dir(spec: RunSpec, settings: dict[str, Any], resume: bool = False, overwrite: bool = False) -> bool:
    """Whether the run folder can be used as asked: a completed run is reused, an unfinished one resumed (with
    ``resume``), and one made with other settings started over (with ``overwrite``).

    :return: Whether the folder holds a run made with other settings, to be cleared (``overwrite``).
    :raises RunDirError: for an unfinished run without ``resume``, or a run made with other settings without
        ``overwrite``, naming the settings that differ.
    """
    folder = spec.folder
    run_dir = folder.path
    try:
        recorded = folder.recorded_settings()
    except RunDirError:
        if overwrite:  # a damaged record: started over like a stale one
            return True
        raise
    differences = [] if recorded is None else run_differences(folder, recorded, settings)
    stale = bool(differences)
    kept = "a completed" if folder.is_complete else None
    if kept is None and folder.has_checkpoint:
        kept = "an unfinished"
    if stale and kept and not overwrite:
        raise RunDirError(_stale_message(run_dir, kept, differences))
    if kept == "an unfinished" and not stale and not resume:
        raise RunDirError(f"{run_dir} holds an unfinished run; pass --resume to continue it, or use another --log-dir")
    return stale


def run_settings(spec: RunSpec) -> dict[str, Any]:
    """What decides a run's outcome besides its folder (task, method, seed), in the form ``result.json`` keeps.

    The agent enters by the SHA-256 of its model zip and of each file beside it that shapes how it acts (statistics,
    rl-zoo3's YAML: :func:`~eva_rl.loading.agent_inputs`), so a moved project still matches and a re-trained agent or
    changed statistics do not; LoRA settings count only for methods with an adapter policy, EVA's only for methods
    that run EVA.
    """
    settings: dict[str, Any] = {
        "agent_sha256": file_sha256(agent_zip(spec.agent_path)),
        "agent_inputs": {path.name: file_sha256(path) for path in agent_inputs(spec.agent_path)},
        **task_settings(spec),
    }
    return json.loads(json.dumps(settings))


def task_settings(spec: RunSpec) -> dict[str, Any]:
    """:func:`run_settings` but the agent's: what the task, the method and its settings decide (two specs with the
    same agent file, method and seed and equal task settings are the same run, whatever their folders)."""
    task, method = spec.task, get_method(spec.method)
    settings: dict[str, Any] = {
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
    if task.critic_warmup:  # recorded where set, so the runs made before it existed still match
        settings["critic_warmup"] = task.critic_warmup
    if not method.pretrained:
        settings.update(policy=task.policy, policy_kwargs=task.policy_kwargs)
    if method.adapters:
        settings["lora"] = dataclasses.asdict(method.lora_config(task.lora))
    if method.runs_eva:
        settings["eva"] = {k: v for k, v in dataclasses.asdict(task.eva).items() if k != "seed"}  # the run's seed
    return json.loads(json.dumps(settings))


_ANY = object()
ADDED_SETTINGS: dict[str, Any] = {
    "agent_inputs": _ANY,
    "lora.use_rslora": False,
    "lora.train_A": True,
    "eva.convergence": "components",
}
"""Settings added to the record after results were written (dotted), with the value that gives what runs did before
they existed: a result that records none is not stale for it while the run asks for that value (any value for a
record that only got more detailed, like ``agent_inputs``)."""


def settings_differences(recorded: dict[str, Any], current: dict[str, Any], ignored: Collection[str] = ()) -> list[str]:
    """``["key: recorded -> current", ...]`` for every (dotted, nested) setting that differs, but those in
    ``ignored``."""
    old, new = _flatten(recorded), _flatten(current)
    for added, before in ADDED_SETTINGS.items():
        if any(key == added or key.startswith(f"{added}.") for key in old):
            continue
        for key in [key for key in new if key == added or key.startswith(f"{added}.")]:
            if before is _ANY or new[key] == before:
                del new[key]
    missing = "unset"
    return [
        f"{key}: {old.get(key, missing)!r} -> {new.get(key, missing)!r}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key, missing) != new.get(key, missing) and key not in ignored
    ]


EVA_CAP_SETTINGS = ("eva.max_batches", "eva.on_max_batches")
"""EVA's batch cap and what it does there: settings that a run whose EVA stopped before the cap never used."""


def run_differences(folder: RunFolder, recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """:func:`settings_differences` of the run in ``folder``, less those its run never used: EVA's cap where the
    run's EVA stopped (converged, or its budget ended) before both the recorded and the current cap (the two
    settings then make the same run)."""
    differences = settings_differences(recorded, current)
    uncapped = settings_differences(recorded, current, ignored=EVA_CAP_SETTINGS)
    if len(uncapped) < len(differences) and _stopped_before_caps(folder.read_eva(), recorded, current):
        return uncapped
    return differences


def _stopped_before_caps(eva: EvaReport | None, recorded: dict[str, Any], current: dict[str, Any]) -> bool:
    caps = [settings.get("eva", {}).get("max_batches") for settings in (recorded, current)]
    return eva is not None and all(cap is None or eva.batches_used < cap for cap in caps)


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _stale_message(run_dir: Path, kind: str, differences: list[str]) -> str:
    return (
        f"{run_dir} holds {kind} run made with other settings ({'; '.join(differences)}); pass --overwrite to start "
        "it over with these settings, or use another --log-dir"
    )


def _completed(spec: RunSpec, settings: dict[str, Any]) -> RunResult:
    """The result of the completed run in ``spec.run_dir``, if it was made with ``settings``.

    :raises RunDirError: naming the settings that differ.
    """
    result = spec.folder.read_result()
    differences = [] if result.settings is None else run_differences(spec.folder, result.settings, settings)
    if differences:
        raise RunDirError(_stale_message(spec.run_dir, "a completed", differences))
    return result


def completed_result(spec: RunSpec) -> RunResult:
    """The completed run of ``spec`` (for reports), checked against its settings like :func:`run` checks them.

    :raises RunDirError: if the folder holds a run made with other settings.
    """
    return _completed(spec, run_settings(spec))


def _run_locked(spec: RunSpec, settings: dict[str, Any], progress: bool | ProgressSink) -> RunResult:
    """The run itself, under its folder's lock: envs, the model (new or resumed), training, outputs."""
    start = time.perf_counter()
    if callable(progress):  # what the run does before PPO's first step (its bar shows nothing yet)
        progress(0, spec.task.total_timesteps, "EVA" if get_method(spec.method).runs_eva else "starting")
    agent = load_pretrained(spec.agent_path, device="cpu")
    # "auto" trains on CUDA only where the policy is large enough to be faster there
    device = run_device(spec.device, agent.model.policy)
    if device.type != "cpu":
        agent = load_pretrained(spec.agent_path, device=device)
    spec = dataclasses.replace(spec, device=str(device))
    folder = spec.folder
    unfinished = folder.has_checkpoint
    latest = folder.latest_checkpoint() if unfinished else None
    if unfinished and latest is None and folder.first_checkpoint_cut_off:
        warnings.warn(
            f"{spec.run_dir}: its first checkpoint was cut off while it was written; the run starts over", stacklevel=2
        )
        folder.clear()
        unfinished = False
    if unfinished and latest is None:
        raise RunDirError(
            f"{spec.run_dir} holds no whole checkpoint to resume from (each was cut off while it was written, or was "
            "written by an earlier eva-rl); pass --overwrite to start the run over"
        )
    stats = latest[0].stats() if latest else None
    task = spec.task
    with ExitStack() as envs:
        train_env = envs.enter_context(
            closing(agent_env(task, agent, task.n_envs, spec.seed, training=task.update_obs_stats, stats=stats))
        )
        eval_env = envs.enter_context(
            closing(agent_env(task, agent, task.eval.env_count, task.eval.seed, evaluation=True, stats=stats))
        )
        if latest is not None:
            model, state = _resume_model(spec, agent, train_env, *latest)
        else:
            model, state = _start_model(spec, agent, train_env, progress is True), None
            folder.write_settings(settings)
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
            f"which fine-tunes this {agent.algorithm.upper()} agent (the task's settings are for another "
            "algorithm's agent); pass a task file whose ppo section fits it (--config), or fine-tune a plain env id "
            "(--env <id>), where the agent's own settings apply"
        )
    # the budget: a rollout at least, an update at least, and a critic warm-up shorter than it
    rollout = rollout_steps(task, agent)
    if rollout is not None and task.total_timesteps < rollout:
        raise ConfigError(
            f"total_timesteps={task.total_timesteps} is below one rollout of {ALGORITHMS[algorithm].__name__} "
            f"({rollout} steps: n_steps {rollout // task.n_envs} x n_envs {task.n_envs}), so a run would train "
            f"{rollout} steps; expected at least {rollout}, or a smaller n_steps or n_envs"
        )
    updates, how = updates_in_budget(task, agent)
    if task.critic_warmup:
        _check_critic_warmup(task, agent, updates, how)
    if updates == 0:
        raise ConfigError(
            f"total_timesteps={task.total_timesteps} makes no update of {ALGORITHMS[algorithm].__name__} ({how}), so a "
            "run would end where it started; expected a larger budget, or a smaller learning_starts or train_freq "
            "in the task's ppo settings"
        )


def _check_critic_warmup(task: TaskConfig, agent: PretrainedAgent, updates: int | None, how: str) -> None:
    """:raises ConfigError: for a critic warm-up of an off-policy algorithm, or one that lasts the whole budget."""
    if rollout_steps(task, agent) is None:
        name = ALGORITHMS[run_algorithm(task, agent)].__name__
        raise ConfigError(
            f"critic_warmup={task.critic_warmup} is invalid for {name}: the warm-up is for on-policy algorithms (ppo, "
            "a2c), whose actor and critic share an optimizer; expected 0"
        )
    if updates is not None and task.critic_warmup >= updates:
        raise ConfigError(
            f"critic_warmup={task.critic_warmup} is invalid: the budget makes {updates} updates ({how}), so the actor "
            f"would never train; expected at most {updates - 1}"
        )


def _algorithm_setting(task: TaskConfig, agent: PretrainedAgent, name: str) -> Any:
    """The value of the algorithm argument ``name`` a run takes: the task's, else the agent's, else the default."""
    algorithm = ALGORITHMS[run_algorithm(task, agent)]
    if name in task.ppo:
        return task.ppo[name]
    value = algorithm_hyperparameters(agent.model, algorithm).get(name)
    return value if value is not None else inspect.signature(algorithm.__init__).parameters[name].default


def updates_in_budget(task: TaskConfig, agent: PretrainedAgent) -> tuple[int | None, str]:
    """How many updates a run of ``task``'s budget makes, and how that count comes about.

    On-policy: one update (``n_epochs`` passes) per rollout. Off-policy: none in the first ``learning_starts`` steps,
    then ``gradient_steps`` every ``train_freq`` steps of each env (``None`` for a ``train_freq`` counted in
    episodes, which depends on their lengths).
    """
    rollout = rollout_steps(task, agent)
    if rollout is not None:
        rollouts = -(-task.total_timesteps // rollout)
        return rollouts, f"one per rollout of {rollout} steps"
    learning_starts = int(_algorithm_setting(task, agent, "learning_starts"))
    train_freq = _algorithm_setting(task, agent, "train_freq")
    frequency, unit = (train_freq, "step") if isinstance(train_freq, int) else tuple(train_freq)[:2]
    unit = getattr(unit, "value", unit)
    after_warm_up = max(0, task.total_timesteps - learning_starts)
    how = f"after learning_starts={learning_starts} steps, every train_freq={frequency} {unit}(s) of each env"
    if unit != "step":
        return (None if after_warm_up else 0), how
    calls = after_warm_up // (int(frequency) * task.n_envs)
    gradient_steps = int(_algorithm_setting(task, agent, "gradient_steps"))
    per_call = gradient_steps if gradient_steps > 0 else int(frequency) * task.n_envs
    return calls * per_call, f"{how}, {per_call} gradient step(s) each"


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
    spec.folder.clear_events()
    report = _eva_report(model)
    if report is not None:
        spec.folder.write_eva(report)
    model.set_logger(configure(str(spec.run_dir), ["tensorboard"]))
    _log_start(spec, model, report)
    return model


def _resume_model(
    spec: RunSpec,
    agent: PretrainedAgent,
    train_env: VecEnv,
    checkpoint: Checkpoint,
    state: dict[str, Any],
    cut_off: list[Checkpoint],
) -> tuple[BaseAlgorithm, dict[str, Any]]:
    """The model of a whole checkpoint and the callback state (eval curve, wall time) saved with it; later
    checkpoints that were cut off while written are named and removed."""
    if cut_off:
        steps = ", ".join(str(c.step) for c in cut_off)
        warnings.warn(
            f"{spec.run_dir}: the checkpoint at step {steps} was cut off while it was written; resuming from the "
            f"whole one at step {checkpoint.step}",
            stacklevel=2,
        )
        spec.folder.keep_only(checkpoint)
    # as the run began: a pretrained method's SAC/TD3/DQN warm-up acts with its policy, not at random
    warm_up = get_method(spec.method).pretrained
    algorithm = run_algorithm(spec.task, agent)
    model = load_agent(checkpoint.model_file, spec.device, algorithm, env=train_env, warm_up=warm_up)
    if checkpoint.buffer_file.is_file():
        model.load_replay_buffer(checkpoint.buffer_file)
    if checkpoint.runtime_file.is_file():  # after load, which reseeds every generator
        restore_runtime_state(model, checkpoint.runtime_file)
    if get_method(spec.method).runs_eva and _eva_report(model) is None:
        raise RunDirError(
            f"{checkpoint.path} was saved before EVA on PPO's rollouts finished; delete {spec.run_dir} to start it over"
        )
    model.set_logger(resumed_logger(spec.run_dir, model.num_timesteps))
    return model, state


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
        spec.folder,
        task.checkpoint_freq,
        task.total_timesteps,
        state=state,
        progress=progress,
        description=f"{spec.method} seed{spec.seed}",
    )


def _train(spec: RunSpec, model: BaseAlgorithm, callback: RunCallback) -> None:
    """The algorithm up to the task's budget (with EVA on PPO's rollouts, EVA finishes within it: on its last
    rollout at the latest, :class:`~eva_rl.eva_ppo.EvaRolloutsMixin`)."""
    remaining = spec.task.total_timesteps - model.num_timesteps
    callbacks = [callback, CachedAdapterWeights()]
    if spec.task.critic_warmup:
        callbacks.append(CriticWarmup(spec.task.critic_warmup))
    if remaining > 0:
        model.learn(remaining, callback=callbacks, reset_num_timesteps=False)


def _write_outputs(spec: RunSpec, model: BaseAlgorithm, callback: RunCallback, settings: dict[str, Any]) -> RunResult:
    """``model.zip``, ``vecnormalize.pkl``, ``adapter/``, ``eva.json`` and last ``result.json`` (its presence marks
    the run complete)."""
    folder = spec.folder
    report = _eva_report(model)
    if report is not None:
        folder.write_eva(report)  # EVA on PPO's data finishes during training
    atomic_save_model(model, folder.model_file)
    atomic_save_stats(model, folder.stats_file)
    if get_method(spec.method).adapters:
        save_adapter(model, folder.adapter_dir, method=spec.method)
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
        source_return=source_return(spec),
        settings=settings,
        agent=str(spec.agent_path),
        platform=describe_platform(model.device, spec.task.target_env),
        success_curve=callback.success_curve or None,
    )
    folder.write_result(result)
    folder.remove_checkpoint()
    return result


def source_return(spec: RunSpec) -> float | None:
    """The fine-tuned model's return back on the task's source env, with the task's eval seeds (``None`` when the
    task has no other source env): what it retains of the skill it was pretrained for."""
    task, folder = spec.task, spec.folder
    if task.source_env is None or task.source_env == task.target_env:
        return None
    model = load_agent(folder.model_file, device="cpu")
    agent = load_pretrained(spec.agent_path, device="cpu")
    env = agent_env(
        task, agent, task.eval.env_count, task.eval.seed, env_id=task.source_env, evaluation=True, stats=folder.stats()
    )
    with closing(env):
        return evaluate(model, env, task.eval.episodes, task.eval.seed, task.eval.deterministic).mean
