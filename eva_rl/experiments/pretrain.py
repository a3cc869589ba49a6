"""Pretraining of the source agents we bundle: reproducible (fixed seed, config hyperparameters), small, with a
model card recording how to reproduce them and how well they do."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.vec_env import VecEnv, VecNormalize
from tqdm.auto import tqdm

from eva_rl.errors import ConfigError
from eva_rl.experiments.environments import env_factory, import_packages, load_object, make_vec
from eva_rl.experiments.run_folder import RunFolder
from eva_rl.experiments.tasks import ROOT, TaskConfig
from eva_rl.experiments.training import Evaluation, evaluate
from eva_rl.files import atomic_save_model, atomic_save_stats, atomic_write_json, atomic_write_text
from eva_rl.loading import ALGORITHMS, load_statistics
from eva_rl.physics import simulator_packages

_PACKAGES = ("eva-rl", "torch", "stable-baselines3", "gymnasium", "minigrid", "numpy")


def resolve_policy_kwargs(policy_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Turn ``module:Class`` strings of ``*_class`` and ``activation_fn`` entries into the objects."""
    resolved = {}
    for key, value in policy_kwargs.items():
        if isinstance(value, str) and (key.endswith("_class") or key == "activation_fn"):
            value = load_object(value, f"policy_kwargs.{key}")
        resolved[key] = value
    return resolved


def _display_path(path: Path) -> str:
    """``path`` relative to the project root when inside it, so the card reads the same on every clone."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def package_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Installed versions of the packages an agent depends on (and of ``extra``), skipping those not installed."""
    versions = {}
    for name in (*_PACKAGES, *extra):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


class ProgressCallback(BaseCallback):
    """A tqdm bar over the training steps."""

    def __init__(self, total: int, description: str) -> None:
        super().__init__()
        self.total = total
        self.description = description
        self._bar: tqdm | None = None

    def _on_training_start(self) -> None:
        self._bar = tqdm(total=self.total, desc=self.description, unit="step", leave=False, mininterval=1.0)

    def _on_step(self) -> bool:
        self._bar.update(min(self.num_timesteps, self.total) - self._bar.n)
        return True

    def _on_training_end(self) -> None:
        self._bar.close()


def _new_model(task: TaskConfig, algorithm: str, env: VecEnv, seed: int, device: str) -> BaseAlgorithm:
    """A fresh model of ``algorithm`` with the task's policy and hyperparameters.

    :raises ConfigError: when SB3 refuses the policy for the env (a Dict observation space under ``MlpPolicy``).
    """
    try:
        return ALGORITHMS[algorithm](
            task.policy,
            env,
            policy_kwargs=resolve_policy_kwargs(task.policy_kwargs),
            seed=seed,
            device=device,
            verbose=0,
            **task.ppo,
        )
    except (ValueError, AssertionError, KeyError, TypeError) as error:
        raise ConfigError(
            f"policy={task.policy!r} cannot be built by {ALGORITHMS[algorithm].__name__} for the observation space "
            f"{env.observation_space} ({type(error).__name__}: {error}); pass --policy (MultiInputPolicy for Dict "
            "observations) or a task file whose wrappers encode the observations"
        ) from error


def agent_folder(task: TaskConfig) -> Path:
    """Where ``pretrain`` writes ``task``'s source agent by default: the folder of the task's ``agent``, else
    ``agents/<source env id>/``."""
    if task.agent_path is not None:
        return task.agent_path.parent
    return ROOT / "agents" / (task.source_env or task.target_env).replace(":", "-")


def clear_optimizer_state(model: BaseAlgorithm) -> None:
    """Empty the state (Adam's moments and step counts) of every optimizer ``model`` saves, keeping their settings.

    Fine-tuning starts a fresh optimizer for every method, so the moments are never read, and they would triple the
    bundled zip (two moments per weight); the zip still loads strictly, with an optimizer as new as a fresh model's.
    """
    for name in model._get_torch_save_params()[0]:
        owner = model
        for part in name.split("."):
            owner = getattr(owner, part)
        if isinstance(owner, torch.optim.Optimizer):
            owner.state.clear()


def _clone_experts(task: TaskConfig, model: BaseAlgorithm, progress: bool) -> dict[str, Any]:
    """Pretrain ``model`` by cloning the experts of ``task.pretrain_cloning`` (:mod:`eva_rl.experiments.cloning`).

    :return: What the card records of it: the demonstrations' size, the experts' success, the fit.
    """
    from eva_rl.experiments.cloning import clone, collect_demonstrations

    if not isinstance(model, OnPolicyAlgorithm):
        raise ConfigError(
            f"pretrain_cloning needs an actor-critic algorithm (ppo or a2c), not algo={task.algo!r}: the clone's value "
            "head is fitted too"
        )
    settings, seed = task.pretrain_cloning, task.pretrain_seed
    demonstrations = collect_demonstrations(settings, task.ppo.get("gamma", 0.99), seed, task.wrappers, progress)
    fit = clone(model, demonstrations, settings, seed, progress)
    return {"transitions": len(demonstrations), "expert_success": demonstrations.expert_success, **fit}


def pretrain(
    task: TaskConfig,
    out: Path | None = None,
    eval_episodes: int = 100,
    device: str = "auto",
    command: str = "",
    progress: bool = True,
    replace: bool = False,
) -> dict[str, Any]:
    """Train ``task``'s source agent and write ``model.zip``, ``card.json`` and ``README.md`` to ``out``.

    :param out: The agent's folder (default: :func:`agent_folder`).
    :param replace: Replace an agent ``out`` already holds (a bundled one, by default); without it that is an error.
    :raises ConfigError: for an ``out`` that holds an agent, after the settings are checked and before training.

    :return: The model card.
    """
    import_packages(task.env_packages)
    cloning = task.pretrain_cloning
    # a clone's spaces are those its experts' envs share: the first one builds the model
    source_env = cloning.envs[0] if cloning else task.source_env or task.target_env
    steps, seed = task.pretrain_timesteps, task.pretrain_seed
    out = out or agent_folder(task)
    factory = env_factory(source_env, task.wrappers, task.env_kwargs)
    start = time.perf_counter()
    algorithm = task.algo or "ppo"
    cloned: dict[str, Any] = {}
    with closing(make_vec(factory, task.n_envs, seed)) as train_env:
        if task.pretrain_normalize:
            train_env = VecNormalize(train_env, gamma=task.ppo.get("gamma", 0.99))
        model = _new_model(task, algorithm, train_env, seed, device)
        if (out / RunFolder.MODEL).exists() and not replace:
            raise ConfigError(
                f"{out} already holds an agent ({RunFolder.MODEL}); pass --overwrite to replace it, or --out for "
                "another folder"
            )
        if cloning:
            cloned = _clone_experts(task, model, progress)
        else:
            callbacks = [ProgressCallback(steps, f"pretrain {source_env}")] if progress else []
            model.learn(steps, callback=callbacks)
        # Written first: evaluating the agent needs them, and the zip without them is not the agent.
        normalized = atomic_save_stats(model, out / RunFolder.STATS)
    train_seconds = time.perf_counter() - start

    def evaluate_on(env_id: str, episodes: int) -> Evaluation:
        make_env = env_factory(env_id, task.wrappers, task.env_kwargs)
        env = make_vec(make_env, min(task.eval.env_count, episodes), task.eval.seed)
        if normalized:
            env = load_statistics(out / RunFolder.STATS, env)
            env.norm_reward = False
        with closing(env):
            return evaluate(model, env, episodes, task.eval.seed, task.eval.deterministic)

    if cloning:
        # the clone on each of its experts' envs, task.eval.episodes episodes each
        evaluations = {env_id: evaluate_on(env_id, task.eval.episodes) for env_id in cloning.envs}
        cloned["success"] = {env_id: evaluation.success_rate for env_id, evaluation in evaluations.items()}
        eval_episodes = task.eval.episodes * len(cloning.envs)
        returns = [evaluation.mean for evaluation in evaluations.values()]
        eval_return, eval_std = float(np.mean(returns)), float(np.std(returns))
    else:
        eval_return, eval_std = evaluate_on(source_env, eval_episodes)[:2]
    target = evaluate_on(task.target_env, eval_episodes) if task.target_env != source_env or cloning else None

    clear_optimizer_state(model)
    atomic_save_model(model, out / RunFolder.MODEL)
    card = {
        "task": task.name,
        "source_env": source_env,
        "target_env": task.target_env,
        "path": _display_path(out / RunFolder.MODEL),
        "timesteps": int(model.num_timesteps),
        "seed": seed,
        "algorithm": algorithm,
        "policy": task.policy,
        "policy_kwargs": task.policy_kwargs,
        "parameters": sum(parameter.numel() for parameter in model.policy.parameters()),
        "optimizer_state": "cleared (fine-tuning starts a fresh optimizer)",
        "ppo": {"n_envs": task.n_envs, **task.ppo},
        "observation_encoding": task.wrappers or ["none (raw observations)"],
        "vec_normalize": RunFolder.STATS if normalized else None,
        "observation_space": str(model.observation_space),
        "action_space": str(model.action_space),
        "eval_return": eval_return,
        "eval_return_std": eval_std,
        "eval_episodes": eval_episodes,
        "eval_deterministic": task.eval.deterministic,
        "eval_seed": task.eval.seed,
        "target_return": target.mean if target else None,
        "target_success": target.success_rate if target else None,
        "train_seconds": round(train_seconds, 1),
        "packages": package_versions(simulator_packages(source_env)),
        "command": command,
    }
    if cloning:
        card["source_env"] = f"{len(cloning.envs)} envs, each expert's"
        card["cloning"] = {**dataclasses.asdict(cloning), **cloned}
        card.pop("timesteps")  # no RL steps: the demonstrations are in card["cloning"]
    atomic_write_json(out / "card.json", card)
    atomic_write_text(out / "README.md", model_card_markdown(card))
    return card


def _success(rate: float | None) -> str:
    return "" if rate is None else f", success {rate:.2f}"


def _how_trained(card: dict[str, Any]) -> str:
    """The card's lines on what the agent learned from, and how well it does there."""
    episodes = f"({'greedy' if card['eval_deterministic'] else 'stochastic'} actions, eval seed {card['eval_seed']})"
    cloning = card.get("cloning")
    if cloning is None:
        return (
            f"- Trained on `{card['source_env']}` for {card['timesteps']:,} steps, seed {card['seed']} "
            f"({card['train_seconds']} s)\n"
            f"- Return on `{card['source_env']}`: **{card['eval_return']:.3f}** ± {card['eval_return_std']:.3f} over "
            f"{card['eval_episodes']} episodes {episodes}\n"
        )
    rates = [rate for rate in cloning["success"].values() if rate is not None]
    experts = [rate for rate in cloning["expert_success"].values() if rate is not None]
    mean_success = f"; mean success **{sum(rates) / len(rates):.2f}**" if rates else ""
    expert_success = f" (the experts' own success with the noise: {sum(experts) / len(experts):.2f})" if experts else ""
    per_env = "".join(f"  - `{env}`: {rate:.2f}\n" for env, rate in cloning["success"].items() if rate is not None)
    return (
        f"- Cloned from `{cloning['expert']}` on {len(cloning['envs'])} envs: {cloning['episodes']} demonstrations "
        f"each, {cloning['transitions']:,} transitions, action noise {cloning['action_noise']}, "
        f"{cloning['epochs']} epochs, seed {card['seed']} ({card['train_seconds']} s){expert_success}\n"
        f"- Fit: log-likelihood {cloning['log_likelihood']:.2f} per action, value RMSE {cloning['value_rmse']:.1f}\n"
        f"- Mean return over those envs: **{card['eval_return']:.3f}** (std across envs {card['eval_return_std']:.3f}, "
        f"{card['eval_episodes']} episodes in all {episodes}){mean_success}; per env:\n{per_env}"
    )


def model_card_markdown(card: dict[str, Any]) -> str:
    target = (
        f"- Zero-shot return on `{card['target_env']}` (the jumpstart): **{card['target_return']:.3f}**"
        f"{_success(card.get('target_success'))}\n"
        if card["target_return"] is not None
        else ""
    )
    stats = (
        f"- Trained inside `VecNormalize`: its statistics are `{card['vec_normalize']}` beside the zip (the agent "
        "needs them; fine-tuning loads them)\n"
        if card.get("vec_normalize")
        else ""
    )
    # cards written before the count was recorded do not have it
    size = f", {card['parameters']:,} parameters" if "parameters" in card else ""
    title = card["task"] if "cloning" in card else card["source_env"]
    return (
        f"# {title} source agent\n\n"
        f"{card.get('algorithm', 'ppo').upper()} agent trained by eva-rl's `scripts/pretrain.py` for task "
        f"`{card['task']}`.\n\n"
        f"{_how_trained(card)}"
        f"{target}"
        f"- Observation encoding: {', '.join(f'`{w}`' for w in card['observation_encoding'])}\n"
        f"{stats}"
        f"- Policy: `{card['policy']}` with `{json.dumps(card['policy_kwargs'])}`{size}\n"
        f"- Packages: {', '.join(f'{k} {v}' for k, v in card['packages'].items())}\n\n"
        f"Reproduce:\n\n```bash\n{card['command']}\n```\n\n"
        "SB3 zips contain pickles: load them only from sources you trust.\n"
    )
