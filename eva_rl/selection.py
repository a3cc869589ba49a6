"""Which task is this? Picking a bank's adapter for an unlabelled env from the subspaces its layers' inputs span.

EVA's directions are the top principal directions of each adapted layer's inputs when the pretrained policy acts
in a task's env. Those subspaces differ between tasks as their observations differ, so they work as a signature:
run the base policy a few hundred steps in the new env, and pick the task whose subspaces capture the largest
share of the new inputs' energy, averaged over the layers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.vec_env import VecEnv
from torch import nn

from eva_rl.errors import ConfigError
from eva_rl.eva import layer_input_rows
from eva_rl.inject import disable_adapters
from eva_rl.plan import adaptable_layers
from eva_rl.rollouts import RolloutBatches, policy_forward


def layer_activations(
    policy: BasePolicy, env: VecEnv, steps: int, seed: int = 0, layers: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """The inputs of ``layers`` (default: every Linear/Conv2d layer) over ``steps`` env steps of ``policy`` acting
    in ``env`` (actions sampled from a private stream seeded by ``seed``), as rows ``(n, fan-in)``; adapters, if
    any, are bypassed (the base policy's view).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps={steps!r} is invalid: expected an integer >= 1")
    modules = adaptable_layers(policy)
    names = list(layers) if layers is not None else list(modules)
    batch = next(iter(RolloutBatches(policy, env, steps, seed=seed)))
    captured: dict[str, list[torch.Tensor]] = {}

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(layer: nn.Module, args: tuple[Any, ...]) -> None:
            captured.setdefault(name, []).append(layer_input_rows(layer, args[0]).detach().float().cpu())

        return hook

    handles = [modules[name].register_forward_pre_hook(hook_for(name)) for name in names]
    was_training = policy.training
    try:
        policy.eval()
        with torch.no_grad(), disable_adapters(policy):
            policy_forward(policy, batch)
    finally:
        for handle in handles:
            handle.remove()
        policy.train(was_training)
    return {name: torch.cat(captured[name]) for name in names if name in captured}


def subspace_signature(activations: Mapping[str, torch.Tensor], k: int = 4) -> dict[str, torch.Tensor]:
    """Per layer, the top-``k`` right singular vectors of its input rows (orthonormal rows, ``(k, fan-in)``)."""
    signature = {}
    for name, rows in activations.items():
        _, _, vh = torch.linalg.svd(rows.double(), full_matrices=False)
        signature[name] = vh[: min(k, vh.shape[0])].float().contiguous()
    return signature


def captured_energy(activations: Mapping[str, torch.Tensor], signature: Mapping[str, torch.Tensor]) -> float:
    """The share of the rows' energy (squared norm) inside ``signature``'s subspaces, averaged over the layers both
    have: 1 when every input lies in the subspace, about ``k / fan-in`` for unrelated inputs."""
    shares = []
    for name, basis in signature.items():
        rows = activations.get(name)
        if rows is None or rows.shape[1] != basis.shape[1]:
            continue
        total = rows.double().square().sum()
        inside = (rows.double() @ basis.double().T).square().sum()
        shares.append(float(inside / total) if total > 0 else 0.0)
    if not shares:
        raise ConfigError("the signature and the activations share no layer; they come from different policies")
    return sum(shares) / len(shares)


def select_task(
    activations: Mapping[str, torch.Tensor], signatures: Mapping[str, Mapping[str, torch.Tensor]]
) -> tuple[str, dict[str, float]]:
    """The task whose signature captures the most of ``activations``' energy, and every task's score."""
    if not signatures:
        raise ConfigError("no task has a signature to compare with")
    scores = {task: captured_energy(activations, signature) for task, signature in signatures.items()}
    return max(scores, key=scores.__getitem__), scores
