"""Adapter banks as the application uses them: each task evaluated through a bank, on the env its record names."""

from __future__ import annotations

from contextlib import closing
from typing import Any

from eva_rl.bank import AdapterBank
from eva_rl.errors import ConfigError
from eva_rl.experiments.environments import agent_env, import_packages
from eva_rl.experiments.tasks import find_task
from eva_rl.experiments.training import evaluate
from eva_rl.experiments.trust import check_recorded_code, code_references
from eva_rl.loading import load_pretrained


def evaluate_bank(bank: AdapterBank, episodes: int | None = None, trust_code: bool = False) -> dict[str, float]:
    """Each task's return through ``bank``, on the env its ``info`` names (``task``: the task file whose wrappers and
    evaluation settings apply, ``env``, ``env_kwargs``, ``eval_episodes``; banks made by ``eva-rl continual`` record
    them).

    :param episodes: Episodes per task (default: the number the task's info records, else its task file's).
    :param trust_code: Import an env entry point the bank records from outside the trusted packages
        (:mod:`eva_rl.experiments.trust`).

    :raises ConfigError: for a task whose info does not say where to evaluate it, or names code it may not import.
    """
    returns = {}
    agents: dict[str, Any] = {}  # the env wrappers need the base agent (its VecNormalize); load it once per file
    for name, adapter in bank.tasks.items():
        task = find_task(str(adapter.info.get("task")))
        if task is None or not isinstance(adapter.info.get("env"), str):
            raise ConfigError(
                f"bank task {name!r} records no task file and env to evaluate on (info {adapter.info}); banks made "
                "by eva-rl continual do"
            )
        check_recorded_code(code_references([adapter.info["env"]]), f"bank task {name!r}'s env", trust_code)
        import_packages(task.env_packages)
        overrides = {
            "target_env": adapter.info["env"],
            "env_kwargs": {**task.env_kwargs, **adapter.info.get("env_kwargs", {})},
            "eval_episodes": episodes or adapter.info.get("eval_episodes") or task.eval.episodes,
        }
        task = task.with_overrides(overrides, where=f"bank task {name!r}")
        agent_path = str(bank.base_path or task.agent_path)
        if agent_path not in agents:
            agents[agent_path] = load_pretrained(agent_path, device="cpu")
        agent = agents[agent_path]
        bank.activate(name)
        with closing(agent_env(task, agent, task.eval.env_count, task.eval.seed, evaluation=True)) as env:
            bank.prepare_env(name, env)
            returns[name] = evaluate(bank.model, env, task.eval.episodes, task.eval.seed, task.eval.deterministic)[0]
    bank.deactivate()
    return returns
