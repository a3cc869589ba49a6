"""A policy library: one frozen base agent and many named task adapters, one active at a time.

Full fine-tuning needs a copy of the network per task; an adapter needs its LoRA factors (and whatever else its
run trained: ``log_std``, heads, biases). :class:`AdapterBank` keeps one base model and, per task, only those
tensors; :meth:`AdapterBank.activate` swaps the active task's adapters into the base policy (the LoRA layers are
rebuilt at that task's ranks, its tensors loaded, anything it had changed in the base put back first), so the
base is never reloaded or copied. :meth:`AdapterBank.predict` with ``task=`` switches as needed.

A bank folder is JSON and safetensors, no pickle: ``bank.json`` (the base agent's path and SHA-256, and each
task's method, LoRA config, adapter plan, EVA report and free-form info), ``adapters/<task>.safetensors`` and,
for tasks with one, ``signatures/<task>.safetensors`` (:meth:`AdapterBank.identify`) and
``normalization/<task>.safetensors`` (the observation statistics of a task whose run kept updating the agent's
``VecNormalize``: :meth:`AdapterBank.prepare_env` puts them in an env). The base agent stays the SB3 zip it was (a
pickle: load only agents you trust).
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import VecEnv, VecNormalize, unwrap_vec_normalize

from eva_rl.checkpoints import (
    adapter_settings,
    adapter_state,
    check_adapter_tensors,
    read_adapter_config,
    read_tensors,
    read_versioned_json,
)
from eva_rl.config import LoraConfig
from eva_rl.errors import CheckpointError, ConfigError
from eva_rl.eva_report import EvaReport
from eva_rl.files import STATS, atomic_write, atomic_write_json, file_sha256
from eva_rl.inject import inject_adapters, lora_layers, remove_adapters
from eva_rl.loading import load_agent
from eva_rl.plan import AdapterPlan
from eva_rl.policies import LoraPolicyMixin
from eva_rl.selection import layer_activations, select_task, subspace_signature

FORMAT = "eva-rl-bank"
VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def _bank_json(folder: Path) -> Path:
    """``folder``'s ``bank.json``.

    :raises CheckpointError: for a folder that holds none (one run's adapter folder is named as such).
    """
    path = folder / "bank.json"
    if not path.is_file():
        if (folder / "adapter_config.json").is_file():
            raise CheckpointError(
                f"{folder} is one run's adapter folder, not a bank (bank.json and adapters/): put it in one with "
                "AdapterBank.add (README, Policy library)"
            )
        raise CheckpointError(f"{folder} is not an eva-rl adapter bank: expected bank.json")
    return path


def _recorded_base(folder: Path, data: Mapping[str, Any]) -> Path | None:
    """The base agent's zip a bank's ``bank.json`` content records, resolved from its folder."""
    recorded = data.get("base")
    if isinstance(recorded, dict) and isinstance(recorded.get("path"), str):
        return (folder / recorded["path"]).resolve()
    return None


def _is_lora_key(key: str) -> bool:
    return key.rpartition(".")[2].startswith("lora_")


def _plain_key(key: str) -> str:
    """The base policy's name of an adapted policy's state-dict key (``x.base_layer.weight`` is ``x.weight``)."""
    return key.replace(".base_layer.", ".")


@dataclass
class ObservationStats:
    """A run's ``VecNormalize`` observation statistics, as a bank keeps them (tensors and numbers, no pickle).

    :ivar mean: ``{key: running mean}``; the key is ``""`` for a Box observation, the Dict keys otherwise.
    :ivar var: ``{key: running variance}``.
    :ivar count: Observations the statistics have seen.
    """

    mean: dict[str, torch.Tensor]
    var: dict[str, torch.Tensor]
    count: float

    @classmethod
    def of(cls, normalize: VecNormalize | None) -> ObservationStats | None:
        """The observation statistics of ``normalize`` (``None`` without one, or when it leaves observations as
        they are)."""
        if normalize is None or not normalize.norm_obs:
            return None
        running = normalize.obs_rms if isinstance(normalize.obs_rms, dict) else {"": normalize.obs_rms}
        return cls(
            {k: torch.as_tensor(r.mean).clone() for k, r in running.items()},
            {k: torch.as_tensor(r.var).clone() for k, r in running.items()},
            float(next(iter(running.values())).count),
        )

    def apply(self, normalize: VecNormalize) -> None:
        """Make ``normalize`` normalize observations with these statistics (it stops updating them)."""
        running = normalize.obs_rms if isinstance(normalize.obs_rms, dict) else {"": normalize.obs_rms}
        if set(running) != set(self.mean):
            raise ConfigError(
                f"the env normalizes observations {sorted(running)}, these statistics {sorted(self.mean)}"
            )
        for key, statistics in running.items():
            statistics.mean = self.mean[key].numpy().copy()
            statistics.var = self.var[key].numpy().copy()
            statistics.count = self.count
        normalize.training = False

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"mean/{k}": v for k, v in self.mean.items()}, **{f"var/{k}": v for k, v in self.var.items()}}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], count: float) -> ObservationStats:
        part = {
            kind: {k.partition("/")[2]: v for k, v in tensors.items() if k.startswith(f"{kind}/")}
            for kind in ("mean", "var")
        }
        return cls(part["mean"], part["var"], float(count))


def _read_observation_stats(path: Path, count: Any, where: str) -> ObservationStats:
    """A bank task's saved statistics.

    :raises CheckpointError: for a count that is not a number >= 0, or a file without matching means and variances.
    """
    if isinstance(count, bool) or not isinstance(count, (int, float)) or not count >= 0:
        raise CheckpointError(f"{where}: normalization_count={count!r} is invalid: expected a number >= 0")
    stats = ObservationStats.from_tensors(read_tensors(path), count)
    if not stats.mean or set(stats.mean) != set(stats.var):
        raise CheckpointError(f"{path} holds no matching mean/<key> and var/<key> tensors: not a task's statistics")
    return stats


def read_observation_stats(path: Path) -> ObservationStats | None:
    """The observation statistics of a ``vecnormalize.pkl`` a run wrote beside its adapter (a pickle: a run folder
    the user made)."""
    with open(path, "rb") as handle:
        return ObservationStats.of(pickle.load(handle))  # noqa: S301 (the run's own statistics file)


@dataclass
class TaskAdapter:
    """One task's adapter in a bank.

    :ivar name: The task's name in the bank.
    :ivar plan: The adapter plan (which layers, at which rank and alpha).
    :ivar tensors: ``{adapted policy state-dict key: tensor}`` on the CPU: the LoRA factors and whatever else the
        task's run trained or rewrote (see :func:`~eva_rl.checkpoints.adapter_state`).
    :ivar lora_config: The LoRA config the adapter was made with.
    :ivar method: The method that made it (``"eva"``, ``"lora"`` ...), if known.
    :ivar eva_report: EVA's report, for EVA methods.
    :ivar info: Free-form JSON-ready facts (target env, source run, returns).
    :ivar signature: ``{layer: (k, fan-in)}`` subspaces of the base policy's layer inputs in the task's env
        (:func:`~eva_rl.selection.subspace_signature`), which :meth:`AdapterBank.identify` compares; optional.
    :ivar normalization: The observation statistics the task's run ended with, when its agent normalizes
        observations (a run with ``update_obs_stats`` moves them away from the base agent's).
    """

    name: str
    plan: AdapterPlan
    tensors: dict[str, torch.Tensor]
    lora_config: LoraConfig = field(default_factory=LoraConfig)
    method: str | None = None
    eva_report: EvaReport | None = None
    info: dict[str, Any] = field(default_factory=dict)
    signature: dict[str, torch.Tensor] | None = None
    normalization: ObservationStats | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of its tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def ranks(self) -> dict[str, int]:
        return {name: layer.rank for name, layer in self.plan.adapted.items()}

    def to_dict(self) -> dict[str, Any]:
        entry = {
            "method": self.method,
            "lora_config": self.lora_config.to_dict(),
            "lora_plan": self.plan.to_dict(),
            "eva_report": None if self.eva_report is None else self.eva_report.to_dict(),
            "keys": sorted(self.tensors),
            "info": self.info,
        }
        if self.normalization is not None:
            entry["normalization_count"] = self.normalization.count
        return entry


class AdapterBank:
    """A base agent and named task adapters; the active task's adapters sit in the base policy.

    :param base: The pretrained agent (a plain SB3 policy, without adapters). The bank acts through it: after
        :meth:`activate`, ``bank.model.predict`` is that task's fine-tuned policy.
    :param base_path: The zip ``base`` was loaded from, recorded when the bank is saved.
    :raises ConfigError: if ``base``'s policy already has adapters.
    """

    def __init__(self, base: BaseAlgorithm, base_path: str | Path | None = None) -> None:
        if isinstance(base.policy, LoraPolicyMixin) or lora_layers(base.policy):
            raise ConfigError(
                "an AdapterBank needs the pretrained agent itself (a plain policy); this one already has adapters"
            )
        self.model = base
        self.base_path = None if base_path is None else Path(base_path)
        self.tasks: dict[str, TaskAdapter] = {}
        self.active: str | None = None
        # Base values of every non-adapter tensor some task replaces (a head, log_std, a PiSSA residual), by the
        # base policy's key: put back before another task is activated.
        self._base_values: dict[str, torch.Tensor] = {}

    # -- adding tasks ------------------------------------------------------------------------------------------

    def add(self, name: str, adapter: str | Path | BaseAlgorithm, info: Mapping[str, Any] | None = None) -> TaskAdapter:
        """Add task ``name`` from an adapter checkpoint folder (:func:`~eva_rl.checkpoints.save_adapter`, a run's
        ``adapter/``) or from an adapted model in memory; it is checked against the base by activating it once.

        :raises ConfigError: for a name that is taken or not a simple name.
        :raises CheckpointError: for an adapter that is not one or does not fit the base agent.
        """
        self._check_new_name(name)
        if isinstance(adapter, BaseAlgorithm):
            policy = adapter.policy
            if not isinstance(policy, LoraPolicyMixin):
                raise CheckpointError(f"task {name!r}: the model has no adapters (a {type(policy).__name__})")
            task = TaskAdapter(
                name,
                policy.lora_plan,
                adapter_state(adapter),
                policy.lora_config,
                policy.lora_plan.method,
                policy.eva_report,
                dict(info or {}),
                normalization=ObservationStats.of(adapter.get_vec_normalize_env()),
            )
        else:
            task = self._read_task(name, Path(adapter), info)
        return self._insert(task)

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(
                f"task name {name!r} is invalid: expected letters, digits and '_.+-', starting with a letter or digit"
            )
        if name in self.tasks:
            raise ConfigError(f"task {name!r} is already in the bank; remove() it first")

    def _read_task(self, name: str, folder: Path, info: Mapping[str, Any] | None) -> TaskAdapter:
        config = read_adapter_config(folder)
        lora, plan, report = adapter_settings(config, folder / "adapter_config.json")
        tensors = read_tensors(folder / "adapter.safetensors")
        if plan is None:
            raise CheckpointError(f"{folder}: written before adapter plans were recorded; fine-tune it again")
        keys = config.get("keys")
        if not isinstance(keys, list) or sorted(keys) != sorted(tensors):
            raise CheckpointError(f"{folder}: the config's keys do not list the file's {len(tensors)} tensors")
        stats = read_observation_stats(folder / STATS) if (folder / STATS).is_file() else None
        return TaskAdapter(
            name, plan, tensors, lora, config.get("method"), report, dict(info or {}), normalization=stats
        )

    def _insert(self, task: TaskAdapter) -> TaskAdapter:
        """Add ``task`` after activating it once (which checks it fits); the active task stays what it was."""
        previous = self.active
        self.tasks[task.name] = task
        try:
            self.activate(task.name)
        except (CheckpointError, ConfigError):
            del self.tasks[task.name]
            raise
        finally:
            if previous is None:
                self.deactivate()
            else:
                self.activate(previous)
        return task

    def remove(self, name: str) -> None:
        """Remove task ``name`` (the base policy is restored if it was active)."""
        self._task(name)
        if self.active == name:
            self.deactivate()
        del self.tasks[name]

    # -- switching ---------------------------------------------------------------------------------------------

    def _task(self, name: str) -> TaskAdapter:
        if name not in self.tasks:
            raise ConfigError(f"task {name!r} is not in the bank; it has {sorted(self.tasks)}")
        return self.tasks[name]

    @torch.no_grad()
    def deactivate(self) -> None:
        """Take the active task's adapters out: the policy is the base agent's again, weight for weight."""
        policy = self.model.policy
        remove_adapters(policy)
        if self._base_values:
            state = policy.state_dict()
            for key, value in self._base_values.items():
                state[key].copy_(value)
        self.active = None

    @torch.no_grad()
    def activate(self, name: str) -> None:
        """Make task ``name`` the active one: its adapters at its ranks in the base policy, its tensors loaded.

        :raises CheckpointError: if its tensors do not fit the base policy (names or shapes).
        """
        task = self._task(name)
        if self.active == name:
            return
        self.deactivate()
        policy = self.model.policy
        try:
            inject_adapters(policy, task.plan)
        except ConfigError as error:
            raise CheckpointError(f"task {name!r} does not fit the base agent: {error}") from error
        state = policy.state_dict()
        # Named once each (SB3's shared extractor has two names): the keys an adapter checkpoint holds.
        lora_keys = {key for key, _ in policy.named_parameters() if _is_lora_key(key)}
        others = {key for key in task.tensors if not _is_lora_key(key)}
        try:
            check_adapter_tensors(
                task.tensors, lora_keys | (others & set(state)), sorted(task.tensors), f"task {name!r}"
            )
            mismatched = [
                f"{k} {tuple(v.shape)} vs {tuple(state[k].shape)}"
                for k, v in task.tensors.items()
                if v.shape != state[k].shape
            ]
            if mismatched:
                raise CheckpointError(f"task {name!r} does not fit the base agent: shape mismatch {mismatched}")
        except CheckpointError:
            remove_adapters(policy)
            raise
        for key, value in task.tensors.items():
            if not _is_lora_key(key):
                self._base_values.setdefault(_plain_key(key), state[key].detach().clone())
            state[key].copy_(value)
        self.active = name

    # -- acting ------------------------------------------------------------------------------------------------

    def predict(
        self,
        observation: np.ndarray | dict[str, np.ndarray],
        task: str | None = None,
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """SB3's ``predict`` with task ``task``'s adapters (default: the active task's, or the base agent's)."""
        if task is not None:
            self.activate(task)
        return self.model.predict(observation, state, episode_start, deterministic)

    def prepare_env(self, task: str, env: VecEnv) -> None:
        """Give ``env``'s ``VecNormalize`` (the base agent's, wrapped around the task's env) task ``task``'s own
        observation statistics, where its run kept them; nothing otherwise.

        :raises ConfigError: if the task has statistics and ``env`` normalizes no observations.
        """
        stats = self._task(task).normalization
        if stats is None:
            return
        normalize = unwrap_vec_normalize(env)
        if normalize is None:
            raise ConfigError(
                f"task {task!r} acts on observations normalized with its run's statistics; wrap the env in the base "
                "agent's VecNormalize (load_pretrained(...).wrap_vec_env) first"
            )
        stats.apply(normalize)

    def evaluate(
        self, task: str | None, env: VecEnv, n_eval_episodes: int = 10, deterministic: bool = True
    ) -> tuple[float, float]:
        """Mean and std of the episode return of task ``task``'s policy (``None``: the base agent's) on ``env``
        (prepared with :meth:`prepare_env`)."""
        if task is None:
            self.deactivate()
        else:
            self.activate(task)
            self.prepare_env(task, env)
        mean, std = evaluate_policy(self.model, env, n_eval_episodes, deterministic=deterministic)
        return float(mean), float(std)

    def set_signature(self, task: str, env: VecEnv, steps: int = 1024, k: int = 4, seed: int = 0) -> None:
        """Record task ``task``'s signature: the subspaces of the base policy's layer inputs over ``steps`` steps in
        ``env`` (the task's own env)."""
        self._task(task).signature = subspace_signature(self._base_activations(env, steps, seed), k)

    def identify(self, env: VecEnv, steps: int = 256, seed: int = 0) -> tuple[str, dict[str, float]]:
        """The task of an unlabelled ``env``: the base policy acts ``steps`` steps there, and the task whose signature
        captures the largest share of its layers' input energy wins.

        :return: The task, and every task's score.
        :raises ConfigError: if no task has a signature.
        """
        signatures = {name: t.signature for name, t in self.tasks.items() if t.signature is not None}
        if not signatures:
            raise ConfigError("no task of the bank has a signature; set_signature() on each task's env first")
        return select_task(self._base_activations(env, steps, seed), signatures)

    def _base_activations(self, env: VecEnv, steps: int, seed: int) -> dict[str, torch.Tensor]:
        active = self.active
        self.deactivate()
        try:
            return layer_activations(self.model.policy, env, steps, seed)
        finally:
            if active is not None:
                self.activate(active)

    # -- sizes -------------------------------------------------------------------------------------------------

    def base_nbytes(self) -> int:
        """Bytes of the base policy's parameters and buffers (what a full copy per task would cost)."""
        self.deactivate()
        tensors = {id(t): t for t in [*self.model.policy.parameters(), *self.model.policy.buffers()]}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    # -- files -------------------------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        """Write the bank to ``folder``: ``bank.json`` and ``adapters/<task>.safetensors`` (atomically, file by
        file). Adapter files of tasks no longer in the bank are removed.

        :return: The folder.
        """
        folder = Path(folder)
        (folder / "adapters").mkdir(parents=True, exist_ok=True)
        for task in self.tasks.values():
            atomic_write(
                folder / "adapters" / f"{task.name}.safetensors",
                lambda tmp, task=task: save_file({k: v.contiguous() for k, v in task.tensors.items()}, str(tmp)),
            )
            if task.signature is not None:
                (folder / "signatures").mkdir(exist_ok=True)
                atomic_write(
                    folder / "signatures" / f"{task.name}.safetensors",
                    lambda tmp, task=task: save_file(task.signature, str(tmp)),
                )
            if task.normalization is not None:
                (folder / "normalization").mkdir(exist_ok=True)
                atomic_write(
                    folder / "normalization" / f"{task.name}.safetensors",
                    lambda tmp, task=task: save_file(task.normalization.tensors(), str(tmp)),
                )
        base = None
        if self.base_path is not None:
            base = {
                "path": os.path.relpath(self.base_path.resolve(), folder.resolve()),
                "sha256": file_sha256(self.base_path),
            }
        atomic_write_json(
            folder / "bank.json",
            {
                "format": FORMAT,
                "version": VERSION,
                "base": base,
                "policy_class": type(self.model.policy).__name__,
                "tasks": {name: task.to_dict() for name, task in self.tasks.items()},
            },
        )
        optional = {"signatures": "signature", "normalization": "normalization"}
        for stale in [*(folder / "adapters").glob("*.safetensors"), *(folder / "signatures").glob("*.safetensors"),
                      *(folder / "normalization").glob("*.safetensors")]:  # fmt: skip
            task = self.tasks.get(stale.stem)
            kept = optional.get(stale.parent.name)
            if task is None or (kept is not None and getattr(task, kept) is None):
                stale.unlink()
        return folder

    @staticmethod
    def base_file(folder: str | Path) -> Path | None:
        """The base agent's zip as ``folder``'s ``bank.json`` records it (``None`` where it records none)."""
        return _recorded_base(Path(folder), read_versioned_json(_bank_json(Path(folder)), FORMAT, VERSION))

    @classmethod
    def load(
        cls,
        folder: str | Path,
        base: BaseAlgorithm | None = None,
        device: str = "auto",
        base_file: str | Path | None = None,
    ) -> AdapterBank:
        """Read a bank written by :meth:`save`.

        :param base: The base agent, if already loaded; otherwise the zip ``bank.json`` names is loaded (after its
            SHA-256 is checked).
        :param base_file: The base agent's zip, where the path ``bank.json`` records does not reach it (a bank
            copied elsewhere); its SHA-256 is checked the same way.
        :raises CheckpointError: for a folder that is not a bank, a base agent whose file changed, or an adapter
            that does not fit.
        """
        folder = Path(folder)
        path = _bank_json(folder)
        data = read_versioned_json(path, FORMAT, VERSION)
        recorded = data.get("base")
        base_path = Path(base_file).resolve() if base_file is not None else _recorded_base(folder, data)
        if base is None:
            if base_path is None:
                raise CheckpointError(
                    f"{path}: base={recorded!r} is invalid: expected {{'path': <the base agent's zip>, 'sha256': ...}}"
                    "; or pass base= (the command line: --base)"
                )
            if not base_path.is_file() and base_file is not None:
                raise CheckpointError(f"base_file={str(base_file)!r} is invalid: expected the base agent's zip file")
            if not base_path.is_file():
                raise CheckpointError(
                    f"{path}: the base agent {str(base_path)!r} is not there; pass its zip as base_file= (the command "
                    "line: --base), e.g. for a bank copied elsewhere"
                )
            if not isinstance(recorded, dict):
                recorded = {}
            if file_sha256(base_path) != recorded.get("sha256"):
                raise CheckpointError(
                    f"{path}: the base agent {str(base_path)!r} is not the one the bank was saved with (SHA-256 "
                    "differs; changed or another file): its adapters were trained on that one"
                )
            base = load_agent(base_path, device=device)
        bank = cls(base, base_path)
        tasks = data.get("tasks")
        if not isinstance(tasks, dict):
            raise CheckpointError(f"{path}: tasks={tasks!r} is invalid: expected a mapping of task names")
        for name, entry in tasks.items():
            where = folder / "adapters" / f"{name}.safetensors"
            if not isinstance(entry, dict):
                raise CheckpointError(f"{path}: task {name!r} is not a mapping")
            lora, plan, report = adapter_settings(entry, path)
            if plan is None:
                raise CheckpointError(f"{path}: task {name!r} has no lora_plan")
            tensors = read_tensors(where)
            if sorted(entry.get("keys") or []) != sorted(tensors):
                raise CheckpointError(f"{where}: holds other tensors than bank.json lists for task {name!r}")
            info = entry.get("info") or {}
            signature_path = folder / "signatures" / f"{name}.safetensors"
            signature = read_tensors(signature_path) if signature_path.is_file() else None
            stats_path = folder / "normalization" / f"{name}.safetensors"
            stats = None
            if "normalization_count" in entry:
                stats = _read_observation_stats(stats_path, entry["normalization_count"], f"{path}: task {name!r}")
            bank._check_new_name(name)
            task = TaskAdapter(name, plan, tensors, lora, entry.get("method"), report, dict(info), signature, stats)
            bank._insert(task)
        return bank

    def __repr__(self) -> str:
        tasks = ", ".join(f"{name} ({task.method}, {task.nbytes:,} B)" for name, task in self.tasks.items())
        return f"AdapterBank(active={self.active!r}, tasks=[{tasks}])"


__all__ = ["AdapterBank", "TaskAdapter"]
