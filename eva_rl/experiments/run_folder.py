"""A run folder ``<log_dir>/<task>/<method>/seed<k>/``: the one place that knows its files, and what a completed,
resumable or stale run is.

Files: the TensorBoard events, ``model.zip``, ``result.json`` (its presence marks the run complete), ``adapter/``
(adapter runs: the adapter-only checkpoint), ``eva.json`` (runs that used EVA), ``vecnormalize.pkl`` (agents trained
with VecNormalize: the run's own statistics, which evaluating ``model.zip`` needs), and while running
``settings.json`` and ``checkpoints/<step>/`` for ``--resume`` (:class:`Checkpoint`: the model, statistics, replay
buffer and runtime state, then ``state.json`` with each part's SHA-256, written last: a checkpoint is complete and
whole or it is not used); ``eva-rl record`` adds ``agent.gif`` and
``before_after.gif``. Studies may cache what they computed on a completed run beside it
(``returns_on_every_task.json``).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eva_rl.errors import ConfigError, EvaRLError
from eva_rl.eva_report import EvaReport
from eva_rl.files import STATS, atomic_write_json, cached_json, file_sha256, read_text

UPDATES_REPORTED = (5, 10, 25)
"""The update counts after which the pages report the score: EVA's argument is about the first updates."""


class RunDirError(EvaRLError, ValueError):
    """A run folder in a state that needs the user's decision."""


@dataclass
class RunResult:
    """What a run wrote to ``result.json`` (:meth:`to_dict` / :meth:`from_dict` keep that file's fields).

    :ivar eval_curve: ``[[env step, mean eval return], ...]``, from the step-0 evaluation (the jumpstart) on.
    :ivar eva_env_steps: Env steps EVA's own rollouts took before PPO (0 without EVA or with EVA on PPO's data).
    :ivar eva_skipped_steps: Env steps of PPO rollouts that fed EVA without an update (EVA on PPO's data).
    :ivar source_return: The fine-tuned model's return back on the task's source env (``None`` when the task has no
        other source env).
    :ivar algorithm: The algorithm that fine-tuned (``"ppo"``, ``"a2c"``...; results before it existed were PPO).
    :ivar settings: What the run was made with (``runs.run_settings``); ``None`` in results written before it existed.
    :ivar agent: The pretrained agent's path, as the run was given it (``eva-rl record`` loads it again).
    :ivar platform: What the run was made on (:func:`~eva_rl.experiments.machine.describe_platform`); ``None`` in
        results written before it existed.
    :ivar success_curve: ``[[env step, success rate], ...]`` at the evaluations of ``eval_curve``, for an env that
        reports ``info["success"]`` (Meta-World); ``None`` otherwise.
    :ivar return_curve: In a copy scored by success rate (:meth:`scored`), the eval returns its ``eval_curve``
        replaced; ``None`` elsewhere, and never written.
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
    platform: dict[str, Any] | None = None
    success_curve: list[list[float]] | None = None
    return_curve: list[list[float]] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("return_curve")
        return data

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """The algorithm's constructor arguments the run recorded (``learning_rate``, ``n_steps`` ...); empty where it
        recorded none."""
        return (self.settings or {}).get("hyperparameters") or {}

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

    def scored(self, score: str) -> RunResult:
        """This result as a page compares it: itself for ``"return"``; for ``"success"`` a copy whose curve, jumpstart,
        final and best values are the success rates.

        :raises ConfigError: for ``"success"`` when the run's env reported no success.
        """
        if score == "return":
            return self
        if not self.success_curve:
            raise ConfigError(
                f"{self.task} {self.method} seed {self.seed}: score 'success' needs an env that sets "
                "info['success'] (Meta-World's do); this run recorded none"
            )
        rates = [rate for _, rate in self.success_curve]
        return dataclasses.replace(
            self,
            eval_curve=self.success_curve,
            jumpstart=rates[0],
            final_return=rates[-1],
            best_return=max(rates),
            return_curve=self.eval_curve,
        )

    @property
    def eval_returns(self) -> list[float]:
        """The eval returns, whatever the score :meth:`scored` compares."""
        return [value for _, value in self.return_curve or self.eval_curve]

    def score_after_updates(self, k: int) -> float | None:
        """The eval score after ``k`` updates of an on-policy run (PPO, A2C): its evaluation at exactly
        ``k * n_steps * n_envs`` env steps (EVA's own env steps make no update and are not counted); ``None`` where it
        was not evaluated there, with no interpolation between evaluations, or where the run is off-policy."""
        n_steps, n_envs = self.hyperparameters.get("n_steps"), (self.settings or {}).get("n_envs")
        if self.algorithm not in ("ppo", "a2c") or n_steps is None or n_envs is None:
            return None
        return {int(step): value for step, value in self.eval_curve}.get(k * n_steps * n_envs)

    @property
    def budget(self) -> float:
        """The env steps of training, the eval curve's last step: the window every AUC is taken over, so that env
        steps EVA collected on its own come out of the same budget."""
        return float(self.eval_curve[-1][0])

    @property
    def budget_return(self) -> float:
        """The eval return at the end of the budget, EVA's own env steps included: the final return where EVA took
        none, else the sample curve's value at the budget (interpolated between the two evaluations around it)."""
        return float(np.interp(self.budget, *self.sample_curve()))

    def sample_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """The eval curve against every env step the run took, EVA's own included, from step 0.

        EVA's own collection shifts the curve right by its env steps; the pretrained policy (B = 0, so unchanged)
        is what acts while it collects, so the shifted curve is led by its first eval from step 0.
        """
        curve = np.asarray(self.eval_curve, float)
        steps, returns = curve[:, 0] + self.eva_env_steps, curve[:, 1]
        if self.eva_env_steps > 0:
            steps, returns = np.insert(steps, 0, 0.0), np.insert(returns, 0, returns[0])
        return steps, returns


def values_after_updates(
    results: Sequence[RunResult], counts: Sequence[int] = UPDATES_REPORTED
) -> dict[int, list[float]]:
    """``{k: each run's score after k updates}`` (:meth:`RunResult.score_after_updates`) for the ``counts`` at which
    every one of ``results`` was evaluated."""
    after = {}
    for k in counts:
        values = [result.score_after_updates(k) for result in results]
        if values and None not in values:
            after[k] = values
    return after


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of a run: a folder ``checkpoints/<step>/`` whose parts are written first and whose
    ``state.json`` (the callback's state and each part's SHA-256) is written last. A folder without a ``state.json``
    whose hashes match its parts was cut off while it was written, and is never resumed from.

    :param path: The checkpoint's folder.
    """

    MODEL = "checkpoint.zip"
    STATS = "vecnormalize.pkl"
    BUFFER = "replay_buffer.pkl"
    RUNTIME = "runtime.pkl"
    STATE = "state.json"
    PARTS = (MODEL, STATS, BUFFER, RUNTIME)

    path: Path

    @property
    def model_file(self) -> Path:
        return self.path / self.MODEL

    @property
    def stats_file(self) -> Path:
        return self.path / self.STATS

    @property
    def buffer_file(self) -> Path:
        return self.path / self.BUFFER

    @property
    def runtime_file(self) -> Path:
        return self.path / self.RUNTIME

    @property
    def step(self) -> int:
        return int(self.path.name)

    def stats(self) -> Path | None:
        return self.stats_file if self.stats_file.is_file() else None

    def commit(self, state: dict[str, Any]) -> None:
        """Write ``state.json`` with the SHA-256 of every part written: from here on the checkpoint is whole."""
        parts = {name: file_sha256(self.path / name) for name in self.PARTS if (self.path / name).is_file()}
        atomic_write_json(self.path / self.STATE, {**state, "parts": parts})

    def read_state(self) -> dict[str, Any] | None:
        """The state saved with the checkpoint; ``None`` unless it is whole (its state written, every part there with
        the SHA-256 the state records)."""
        try:
            state = json.loads(read_text(self.path / self.STATE))
            parts = state.pop("parts")
            whole = all(file_sha256(self.path / name) == digest for name, digest in parts.items())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # ConfigError (read_text) is a ValueError
            return None
        return state if whole else None


class RunFolder:
    """The files of one run and the states they make: empty, unfinished (resumable), completed, or made with other
    settings (stale; :mod:`eva_rl.experiments.runs` decides what to do with each)."""

    RESULT = "result.json"
    SETTINGS = "settings.json"
    STATE = "state.json"
    MODEL = "model.zip"
    CHECKPOINTS = "checkpoints"
    STATS = STATS
    EVA = "eva.json"
    ADAPTER = "adapter"
    LOCK = ".lock"
    EVENTS = "events.out.tfevents.*"
    RETURNS_ON_EVERY_TASK = "returns_on_every_task.json"
    SUCCESS_ON_EVERY_TASK = "success_on_every_task.json"
    AGENT_GIF = "agent.gif"
    BEFORE_AFTER_GIF = "before_after.gif"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def of(cls, log_dir: Path, task: str, method: str, seed: int) -> RunFolder:
        """The folder of ``method``'s run with ``seed`` on ``task`` under ``log_dir``."""
        return cls(Path(log_dir) / task / method / f"seed{seed}")

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # what the folder holds
    @property
    def result_file(self) -> Path:
        return self.path / self.RESULT

    @property
    def model_file(self) -> Path:
        return self.path / self.MODEL

    @property
    def adapter_dir(self) -> Path:
        return self.path / self.ADAPTER

    @property
    def eva_file(self) -> Path:
        return self.path / self.EVA

    @property
    def stats_file(self) -> Path:
        return self.path / self.STATS

    def stats(self) -> Path | None:
        """The run's VecNormalize statistics, if its agent had any."""
        return self.stats_file if self.stats_file.is_file() else None

    @property
    def is_complete(self) -> bool:
        return self.result_file.is_file()

    @property
    def has_checkpoint(self) -> bool:
        """Whether a run began checkpointing here (whole or not: the folder holds an unfinished run)."""
        return any(self.checkpoints()) or (self.path / self.STATE).exists()

    @property
    def first_checkpoint_cut_off(self) -> bool:
        """Whether the run was cut off while writing its first checkpoint: no checkpoint got as far as its model, so
        there is nothing to resume from and nothing that starting over would lose."""
        checkpoints = self.checkpoints()
        return (
            bool(checkpoints)
            and not (self.path / self.STATE).exists()
            and not any(c.model_file.exists() for c in checkpoints)
        )

    def checkpoints(self) -> list[Checkpoint]:
        """The checkpoint folders, the latest first (whole or not)."""
        folder = self.path / self.CHECKPOINTS
        steps = [p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()] if folder.is_dir() else []
        return sorted((Checkpoint(p) for p in steps), key=lambda c: c.step, reverse=True)

    def latest_checkpoint(self) -> tuple[Checkpoint, dict[str, Any], list[Checkpoint]] | None:
        """The latest whole checkpoint, its state, and the later ones that were cut off while written (``None``: no
        whole checkpoint)."""
        checkpoints = self.checkpoints()
        for index, checkpoint in enumerate(checkpoints):
            state = checkpoint.read_state()
            if state is not None:
                return checkpoint, state, checkpoints[:index]
        return None

    def new_checkpoint(self, step: int) -> Checkpoint:
        """An empty folder for the checkpoint at ``step`` (one cut off at the same step is replaced)."""
        path = self.path / self.CHECKPOINTS / str(step)
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return Checkpoint(path)

    def keep_only(self, checkpoint: Checkpoint) -> None:
        """Remove every checkpoint but ``checkpoint`` (called once it is whole)."""
        for other in self.checkpoints():
            if other.path != checkpoint.path:
                shutil.rmtree(other.path)

    @property
    def has_adapter(self) -> bool:
        return (self.adapter_dir / "adapter.safetensors").is_file()

    @staticmethod
    def holds_run(path: Path) -> bool:
        """Whether ``path`` is a folder eva-rl wrote a run to (complete or not)."""
        return any((Path(path) / name).is_file() for name in (RunFolder.RESULT, RunFolder.SETTINGS))

    def event_files(self) -> list[Path]:
        return sorted(self.path.glob(self.EVENTS))

    # records
    def read_result(self) -> RunResult:
        data = self._read_json(self.result_file)
        try:
            return RunResult.from_dict(data)
        except ConfigError as error:
            raise RunDirError(f"{self.result_file} is damaged ({error}); {self._start_over}") from error

    def write_result(self, result: RunResult) -> None:
        """Written last: its presence marks the run complete."""
        atomic_write_json(self.result_file, result.to_dict())

    def recorded_settings(self) -> dict[str, Any] | None:
        """The settings of the run the folder holds: its ``result.json``'s, or an unfinished run's ``settings.json``
        (``None``: nothing there, or a run written before settings were recorded)."""
        if self.result_file.is_file():
            return self._read_json(self.result_file).get("settings")
        path = self.path / self.SETTINGS
        return self._read_json(path) if path.is_file() else None

    _start_over = "pass --overwrite to start the run over, or move the folder away"

    def _read_json(self, path: Path) -> dict[str, Any]:
        """A JSON object the run wrote.

        :raises RunDirError: for a file that is not one (damaged), naming it and how to go on.
        """
        try:
            data = json.loads(read_text(path))
        except (ConfigError, ValueError, RecursionError) as error:
            raise RunDirError(f"{path} is damaged (not JSON: {error}); {self._start_over}") from error
        if not isinstance(data, dict):
            raise RunDirError(f"{path} is damaged (not a JSON object); {self._start_over}")
        return data

    def write_settings(self, settings: dict[str, Any]) -> None:
        atomic_write_json(self.path / self.SETTINGS, settings)

    def write_eva(self, report: EvaReport) -> None:
        atomic_write_json(self.eva_file, report.to_dict())

    def read_eva(self) -> EvaReport | None:
        return EvaReport.from_dict(json.loads(self.eva_file.read_text())) if self.eva_file.is_file() else None

    def cached(self, name: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """What ``compute`` returns, kept in the folder as ``name`` (a study's figures of a completed run)."""
        return cached_json(self.path / name, compute)

    # changes
    def clear(self) -> None:
        """Remove everything a run wrote (its lock stays: the caller holds it)."""
        for path in self.path.iterdir():
            if path.name == self.LOCK:
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()

    @property
    def set_aside_dir(self) -> Path:
        """Where a run that ``--overwrite`` replaces waits until its replacement completes (a hidden sibling)."""
        return self.path.with_name(f".{self.path.name}.replaced")

    def set_aside(self) -> None:
        """Move what the folder holds (its lock aside) out of the way of a replacing run, keeping it."""
        aside = self.set_aside_dir
        if aside.exists():
            shutil.rmtree(aside)
        aside.mkdir()
        for path in self.path.iterdir():
            if path.name != self.LOCK:
                path.rename(aside / path.name)

    def settle_set_aside(self) -> None:
        """Finish a replacement: a completed run drops the run it replaced; an unfinished one (killed, interrupted,
        failed) is removed and the replaced run comes back."""
        aside = self.set_aside_dir
        if not aside.is_dir():
            return
        if not self.is_complete:
            self.clear()
            for path in aside.iterdir():
                path.rename(self.path / path.name)
        shutil.rmtree(aside)

    def clear_events(self) -> None:
        """A run killed before its first checkpoint starts over: one curve per run in TensorBoard."""
        for stale in self.event_files():
            stale.unlink()

    def remove_checkpoint(self) -> None:
        """The files only an unfinished run needs, once the run is complete."""
        shutil.rmtree(self.path / self.CHECKPOINTS, ignore_errors=True)
        for name in (self.STATE, self.SETTINGS):
            (self.path / name).unlink(missing_ok=True)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder's lock for the duration of a run, so two processes never write one run folder.

        The lock is the operating system's (``flock``), so a killed process releases it.

        :raises RunDirError: if another process holds it.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / self.LOCK, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as error:
                raise RunDirError(
                    f"{self.path} is in use by another run; wait for it to finish or use another --log-dir"
                ) from error
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
