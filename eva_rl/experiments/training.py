"""Fixed-seed evaluation and the callback of a fine-tuning run: evaluations, progress, atomic checkpoints."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, NamedTuple

import numpy as np
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.vec_env import VecEnv, sync_envs_normalization
from tqdm.auto import tqdm

from eva_rl.experiments.environments import start_new_games
from eva_rl.experiments.resume import generator_state, save_runtime_state
from eva_rl.experiments.run_folder import RunFolder
from eva_rl.files import atomic_save_model, atomic_save_stats, atomic_write
from eva_rl.layers import cached_adapter_weights
from eva_rl.policies import target_pairs

__all__ = [
    "ProgressSink",
    "RunCallback",
    "Evaluation",
    "count_parameters",
    "eval_mode",
    "evaluate",
    "one_line_warnings",
    "whole_rollouts",
]

ProgressSink = Callable[[int, int, str], None]
"""Receives a run's progress: ``(steps, total steps, status)``."""


def _one_line_warning(message: Warning | str, category: type[Warning], *_: object, **__: object) -> str:
    return f"warning: {message}\n"


def one_line_warnings() -> None:
    """Print warnings as one ``warning: ...`` line each (the command line, and the processes of a sweep)."""
    warnings.formatwarning = _one_line_warning


def whole_rollouts(total_timesteps: int, rollout: int) -> int:
    """The steps an on-policy run of ``total_timesteps`` takes: it finishes its last rollout of ``rollout`` steps."""
    return -(-total_timesteps // rollout) * rollout


def count_parameters(model: BaseAlgorithm) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts of ``model.policy``, target networks left out (they follow their
    online networks and are never deployed)."""
    targets = tuple(f"{target}." for _, target in target_pairs(model.policy))
    params = [p for name, p in model.policy.named_parameters() if not name.startswith(targets)]
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


class Evaluation(NamedTuple):
    """One evaluation: the mean and std return over its episodes, and the share of episodes in which the env set
    ``info["success"]`` at any step (Continual World's success; ``None`` for an env that never reports it)."""

    mean: float
    std: float
    success_rate: float | None = None


class _SuccessCounter:
    """``evaluate_policy``'s per-step callback: whether each counted episode reported success at any step."""

    def __init__(self, n_envs: int) -> None:
        self.running = np.zeros(n_envs, dtype=bool)
        self.episodes: list[bool] = []
        self.reported = False

    def __call__(self, locals_: dict[str, Any], globals_: dict[str, Any]) -> None:
        i, info = locals_["i"], locals_["info"]
        if "success" in info:
            self.reported = True
            self.running[i] |= bool(info["success"])
        # evaluate_policy counts an episode where a Monitor says it ended (a lost life is not an episode's end)
        ended = locals_["done"] and (not locals_["is_monitor_wrapped"] or "episode" in info)
        if ended:
            self.episodes.append(bool(self.running[i]))
            self.running[i] = False

    def rate(self) -> float | None:
        return float(np.mean(self.episodes)) if self.reported and self.episodes else None


@contextmanager
def eval_mode(policy: BasePolicy) -> Iterator[None]:
    """The policy in eval mode for the block, switched once: SB3's ``predict`` switches it again at every call, a walk
    over every module (0.2-0.3 ms, a fifth of a ``predict`` call of the DoorKey agents: BENCHMARKS.md). Inside the
    block a switch is made only where it changes the mode; the policy stays in eval mode after it, as after ``predict``
    (switching back to training mode checks that the adapters can train, and EVA's may be waiting for rollouts)."""
    switch = policy.set_training_mode
    switch(False)
    policy.set_training_mode = lambda mode: None if mode == policy.training else switch(mode)  # type: ignore[method-assign]
    try:
        yield
    finally:
        del policy.set_training_mode


def evaluate(
    model: BaseAlgorithm, env: VecEnv, episodes: int, seed: int, deterministic: bool = False, switch_once: bool = True
) -> Evaluation:
    """Mean and std return (and success rate, where the env reports success) over ``episodes`` episodes with fixed
    env seeds and a fixed action-sampling seed.

    The sampling runs in a forked RNG, so evaluation neither depends on nor disturbs the training RNG: two
    policies with identical outputs get identical returns.

    :param switch_once: Switch the policy to eval mode once (:func:`eval_mode`); ``False`` leaves SB3's switch at
        every ``predict`` (for the benchmark that measures the difference).
    """
    start_new_games(env)
    env.seed(seed)
    devices = [model.device] if model.device.type == "cuda" else []
    successes = _SuccessCounter(env.num_envs)
    switching = eval_mode(model.policy) if switch_once else nullcontext()
    with torch.random.fork_rng(devices=devices), cached_adapter_weights(model.policy), switching:
        torch.manual_seed(seed)
        mean, std = evaluate_policy(
            model, env, n_eval_episodes=episodes, deterministic=deterministic, callback=successes
        )
    return Evaluation(float(mean), float(std), successes.rate())


class RunCallback(BaseCallback):
    """Evaluates at step 0 and every ``eval_freq`` steps, checkpoints every ``checkpoint_freq`` steps, and shows
    a progress bar. Logs ``eval/mean_return``, ``eval/std_return``, ``eval/success_rate`` (where the env reports
    ``info["success"]``) and ``train/trainable_params``.

    :param eval_env: The evaluation env.
    :param eval_freq: Environment steps between evaluations.
    :param eval_episodes: Episodes per evaluation.
    :param eval_seed: Seed of the evaluation episodes and sampling.
    :param deterministic: Greedy evaluation.
    :param folder: The run folder its checkpoints go to.
    :param checkpoint_freq: Environment steps between checkpoints.
    :param total_timesteps: The run's budget, for the progress bar.
    :param state: Curve and wall time carried over from an interrupted run.
    :param progress: Show a progress bar; or a callable taking ``(steps, total steps, status)``, called about twice a
        second and after each evaluation, to show the progress elsewhere (runs side by side in other processes).
    :param description: Progress bar label.
    """

    def __init__(
        self,
        eval_env: VecEnv,
        eval_freq: int,
        eval_episodes: int,
        eval_seed: int,
        deterministic: bool,
        folder: RunFolder,
        checkpoint_freq: int,
        total_timesteps: int,
        state: dict[str, Any] | None = None,
        progress: bool | ProgressSink = True,
        description: str = "PPO",
    ) -> None:
        super().__init__()
        self.eval_env = eval_env
        self.eval_freq = eval_freq
        self.eval_episodes = eval_episodes
        self.eval_seed = eval_seed
        self.deterministic = deterministic
        self.folder = folder
        self.checkpoint_freq = checkpoint_freq
        self.total_timesteps = total_timesteps
        # A resumed run carries on its eval curve and wall time.
        state = state or {}
        self.curve: list[list[float]] = state.get("curve", [])
        self.success_curve: list[list[float]] = state.get("success_curve", [])
        self.wall_before = float(state.get("wall_seconds", 0.0))
        self.progress = progress
        self.description = description
        self._started = 0.0
        self._next_eval = 0
        self._next_checkpoint = 0
        self._bar: tqdm | None = None
        self._sink: ProgressSink | None = progress if callable(progress) else None
        self._reported = 0.0
        self._status = ""
        self._warned_env = False
        self.generator_before_noise: dict[str, Any] | None = None

    @property
    def wall_seconds(self) -> float:
        return self.wall_before + (time.perf_counter() - self._started if self._started else 0.0)

    def _evaluate(self) -> None:
        sync_envs_normalization(self.training_env, self.eval_env)  # statistics that keep updating
        mean, std, success_rate = evaluate(
            self.model, self.eval_env, self.eval_episodes, self.eval_seed, self.deterministic
        )
        step = self.num_timesteps
        self.curve.append([step, mean])
        trainable, _ = count_parameters(self.model)
        self.logger.record("eval/mean_return", mean)
        self.logger.record("eval/std_return", std)
        if success_rate is not None:
            self.success_curve.append([step, success_rate])
            self.logger.record("eval/success_rate", success_rate)
        self.logger.record("train/trainable_params", trainable)
        self.logger.dump(step)
        self._status = f"eval {mean:.3f}"
        if self._bar is not None:
            self._bar.set_postfix_str(self._status)
        self._report(force=True)

    def _report(self, force: bool = False) -> None:
        if self._sink is not None and (force or time.perf_counter() - self._reported >= 0.5):
            self._reported = time.perf_counter()
            self._sink(min(self.num_timesteps, self.total_steps), self.total_steps, self._status)

    @property
    def total_steps(self) -> int:
        """The steps the run will have taken: an on-policy algorithm finishes its last rollout, so the budget rounds
        up to a whole number of rollouts (``n_steps x n_envs``)."""
        model = self.model
        if isinstance(model, OnPolicyAlgorithm):
            return whole_rollouts(self.total_timesteps, model.n_steps * model.n_envs)
        return self.total_timesteps

    def _keep_generator_state_before_noise(self) -> None:
        """With gSDE, SB3 draws a rollout's exploration matrix (``reset_noise``) just before the rollout starts, so a
        checkpoint written then would hold the generator one draw late, and a resumed run would draw another matrix.
        Each ``reset_noise`` of the policy (and of an off-policy actor) first keeps the generator's state, which the
        checkpoint then saves instead."""
        for owner in {id(m): m for m in (self.model.policy, getattr(self.model, "actor", None)) if m}.values():
            draw = owner.reset_noise

            def keep_then_draw(*args: Any, draw: Callable[..., Any] = draw, **kwargs: Any) -> Any:
                self.generator_before_noise = generator_state()
                return draw(*args, **kwargs)

            owner.reset_noise = keep_then_draw

    def _on_training_start(self) -> None:
        if getattr(self.model, "use_sde", False):
            self._keep_generator_state_before_noise()
        self._started = time.perf_counter()
        step = self.num_timesteps
        self._next_eval = (step // self.eval_freq + 1) * self.eval_freq
        self._next_checkpoint = (step // self.checkpoint_freq + 1) * self.checkpoint_freq
        if self.progress is True:
            self._bar = tqdm(
                total=self.total_steps,
                initial=step,
                desc=self.description,
                unit="step",
                leave=False,
                mininterval=1.0,
            )
        if not self.curve:  # the jumpstart; a resumed run goes on with its evaluation schedule
            self._evaluate()

    def _on_step(self) -> bool:
        step = self.num_timesteps
        if self._bar is not None:
            self._bar.update(min(step, self.total_steps) - self._bar.n)
        self._report()
        if step >= self._next_eval and step < self.total_timesteps:  # the last one runs after the last update
            self._next_eval += self.eval_freq
            self._evaluate()
        return True

    def _on_rollout_start(self) -> None:
        # Checkpoints are written here, after the update on the last rollout and before the next one is collected:
        # a run resumed from one does every update an uninterrupted run does (one written mid-rollout would lose
        # the update on the rollout in progress).
        step = self.num_timesteps
        # The last update's train/ values, at the step of the rollout it trained on; SB3 would write them only after
        # the next rollout, so a process killed after the checkpoint would lose them.
        self.logger.dump(step)
        if step >= self._next_checkpoint and step < self.total_timesteps:
            if getattr(self.model, "eva_pending", False):
                # EVA's session and the rollouts it keeps are not saved: the checkpoint waits until EVA is done, and a
                # run killed before that starts over on --resume (as one killed before its first checkpoint does)
                return
            self._next_checkpoint = (step // self.checkpoint_freq + 1) * self.checkpoint_freq
            self.save_checkpoint()

    def save_checkpoint(self) -> None:
        """A new checkpoint folder: model, statistics, replay buffer (so a resumed off-policy run trains on the same
        data) and the runtime state (generators, envs mid-episode), then the state with each part's SHA-256, which
        makes it whole; only then is the previous checkpoint removed. A kill at any moment leaves one whole
        checkpoint to resume from."""
        checkpoint = self.folder.new_checkpoint(self.num_timesteps)
        atomic_save_model(self.model, checkpoint.model_file)
        atomic_save_stats(self.model, checkpoint.stats_file)
        if isinstance(self.model, OffPolicyAlgorithm):
            atomic_write(checkpoint.buffer_file, self.model.save_replay_buffer, suffix=".pkl")
        left_out = save_runtime_state(self.model, checkpoint.runtime_file, self.generator_before_noise)
        if left_out is not None and not self._warned_env:
            self._warned_env = True
            warnings.warn(
                f"the training env cannot be saved with the checkpoint ({left_out}); a resumed run keeps every "
                "update but starts new episodes",
                stacklevel=2,
            )
        checkpoint.commit(
            {
                "num_timesteps": self.num_timesteps,
                "curve": self.curve,
                "success_curve": self.success_curve,
                "wall_seconds": self.wall_seconds,
            }
        )
        self.folder.keep_only(checkpoint)

    def _on_training_end(self) -> None:
        if not self.curve or self.curve[-1][0] < self.num_timesteps:
            self._evaluate()
        self.logger.dump(self.num_timesteps)  # SB3 records the last update's train/ values but dumps them later
        if self._bar is not None:
            self._bar.update(max(self.num_timesteps - self._bar.n, 0))
            self._bar.close()
        self._report(force=True)
