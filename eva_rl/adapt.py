"""``adapt``: a pretrained PPO agent plus LoRA adapters (EVA or standard init); ``merge``: fold them back in."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from stable_baselines3 import PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.type_aliases import GymEnv
from stable_baselines3.common.vec_env import VecEnv
from torch import nn

from eva_rl.config import EvaConfig, LoraConfig
from eva_rl.eva import EvaResult, run_eva
from eva_rl.inject import layer_fan_in, merged_state_dict, pattern_value, resolve_ranks
from eva_rl.policies import HEADS, LORA_POLICY_FOR, PLAIN_POLICY_FOR, LoraPolicyMixin
from eva_rl.rollouts import RolloutBatches, policy_forward

METHODS = ("eva", "lora")

# PPO constructor arguments carried over from the pretrained model unless overridden.
_PPO_HYPERPARAMETERS = (
    "learning_rate",
    "n_steps",
    "batch_size",
    "n_epochs",
    "gamma",
    "gae_lambda",
    "clip_range",
    "clip_range_vf",
    "normalize_advantage",
    "ent_coef",
    "vf_coef",
    "max_grad_norm",
    "use_sde",
    "sde_sample_freq",
    "target_kl",
    "stats_window_size",
    "tensorboard_log",
    "verbose",
    "seed",
    "device",
)
_LORA_POLICY_KWARGS = ("lora_config", "eva_report")


class SpaceMismatchError(ValueError):
    """The target environment's spaces differ from the pretrained agent's."""


def ppo_hyperparameters(model: PPO) -> dict[str, Any]:
    """The constructor arguments that rebuild ``model``'s PPO setup (not its policy or env)."""
    attribute = {"stats_window_size": "_stats_window_size"}
    return {name: getattr(model, attribute.get(name, name)) for name in _PPO_HYPERPARAMETERS}


def wrap_target_env(model: BaseAlgorithm, env: GymEnv) -> VecEnv:
    """Vectorize ``env`` the way SB3 does and check that its spaces match ``model``'s.

    :raises SpaceMismatchError: naming both spaces when they differ.
    """
    vec_env = BaseAlgorithm._wrap_env(env, verbose=0, monitor_wrapper=True)
    for kind in ("observation", "action"):
        expected, got = getattr(model, f"{kind}_space"), getattr(vec_env, f"{kind}_space")
        if expected != got:
            raise SpaceMismatchError(
                f"the target env's {kind} space does not match the pretrained agent's:\n"
                f"  pretrained agent: {expected}\n  target env:       {got}\n"
                "Use the same observation wrappers (encoding) as in pretraining, or an agent trained for this env."
            )
    return vec_env


def load_base_weights(policy: nn.Module, plain_state_dict: dict[str, torch.Tensor]) -> None:
    """Load a plain policy's weights into the base layers of a LoRA policy; adapters are left as they are.

    A key ``x.base_layer.weight`` of the LoRA policy takes ``x.weight`` of the plain one.

    :raises ValueError: listing missing or mismatched keys.
    """
    state = policy.state_dict()
    missing, mismatched = [], []
    for key, value in state.items():
        if key.rpartition(".")[2].startswith("lora_"):
            continue
        plain_key = key.replace(".base_layer.", ".")
        if plain_key not in plain_state_dict:
            missing.append(plain_key)
        elif plain_state_dict[plain_key].shape != value.shape:
            mismatched.append(f"{plain_key}: {tuple(plain_state_dict[plain_key].shape)} vs {tuple(value.shape)}")
        else:
            state[key] = plain_state_dict[plain_key]
    if missing or mismatched:
        raise ValueError(f"pretrained weights do not fit the adapted policy; missing: {missing}, shape: {mismatched}")
    policy.load_state_dict(state, strict=True)


def _lora_policy_class(model: PPO) -> type:
    policy_class = type(model.policy)
    if isinstance(model.policy, LoraPolicyMixin):
        raise ValueError("the model already has LoRA adapters; eva_rl.merge(model) it first to adapt it again")
    if policy_class not in LORA_POLICY_FOR:
        supported = ", ".join(c.__name__ for c in LORA_POLICY_FOR)
        raise ValueError(f"policy class {policy_class.__name__} is not supported; expected one of: {supported}")
    return LORA_POLICY_FOR[policy_class]


def eva_lora_config(lora: LoraConfig, result: EvaResult, adjust_scaling_factors: bool = True) -> LoraConfig:
    """``lora`` with EVA's ranks written into ``rank_pattern`` (and alpha scaled so ``alpha / r`` is unchanged)."""
    rank_pattern = dict(lora.rank_pattern)
    alpha_pattern = dict(lora.alpha_pattern)
    for name, rank in result.ranks.items():
        configured_rank = pattern_value(lora.rank_pattern, name, lora.r)
        alpha = float(pattern_value(lora.alpha_pattern, name, lora.default_alpha))
        rank_pattern[name] = rank
        if adjust_scaling_factors and rank > 0 and configured_rank > 0:
            alpha_pattern[name] = alpha * rank / configured_rank
    return dataclasses.replace(lora, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)


def adapt(
    model: PPO,
    env: GymEnv,
    method: Literal["eva", "lora"] = "eva",
    lora: LoraConfig | None = None,
    eva: EvaConfig | None = None,
    progress: bool = False,
    **ppo_kwargs: Any,
) -> PPO:
    """A new PPO on ``env`` whose policy is ``model``'s pretrained policy plus LoRA adapters.

    :param model: The pretrained agent (MLP, CNN or MultiInput actor-critic policy).
    :param env: The target environment (a Gymnasium env or a VecEnv); its spaces must match the agent's.
    :param method: ``"eva"``: A from the principal directions of each layer's inputs on rollouts of the
        pretrained policy in ``env``, ranks redistributed by explained variance; ``"lora"``: Kaiming-uniform A.
        B = 0 either way, so the new policy acts exactly as the pretrained one.
    :param lora: Adapter configuration.
    :param eva: EVA configuration (``method="eva"`` only).
    :param progress: Show a progress bar during EVA.
    :param ppo_kwargs: PPO constructor arguments overriding those taken from ``model``.
    :return: The adapted PPO. ``model.policy.eva_report`` holds EVA's report (``None`` for ``"lora"``).
    :raises SpaceMismatchError: if ``env``'s spaces differ from ``model``'s.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is invalid: expected one of {METHODS}")
    lora = lora or LoraConfig()
    eva = eva or EvaConfig()
    policy_class = _lora_policy_class(model)
    vec_env = wrap_target_env(model, env)
    exclude = HEADS if lora.train_heads else ()

    resolved = resolve_ranks(model.policy, lora, exclude)
    report = None
    result = None
    if method == "eva":
        fan_in = {name: layer_fan_in(model.policy.get_submodule(name)) for name in resolved}
        tracked = max(min(round(rank * eva.rho), fan_in[name]) for name, (rank, _) in resolved.items())
        if eva.batch_size < tracked:
            raise ValueError(
                f"EvaConfig.batch_size={eva.batch_size} is below the {tracked} components EVA tracks per layer "
                f"(round(r*rho), at most the fan-in); use batch_size >= {tracked}"
            )
        rollouts = RolloutBatches(model.policy, vec_env, eva.batch_size, eva.deterministic, eva.seed)
        result = run_eva(
            model.policy, rollouts, lora, eva, forward_fn=policy_forward, exclude=exclude, progress=progress
        )
        result.env_steps = rollouts.env_steps
        lora = eva_lora_config(lora, result, eva.adjust_scaling_factors)
        report = result.to_dict()

    hyperparameters = ppo_hyperparameters(model)
    hyperparameters.update(ppo_kwargs)
    policy_kwargs = {k: v for k, v in model.policy_kwargs.items() if k not in _LORA_POLICY_KWARGS}
    policy_kwargs.update(lora_config=lora.to_dict(), eva_report=report)
    adapted = PPO(policy_class, vec_env, policy_kwargs=policy_kwargs, **hyperparameters)
    load_base_weights(adapted.policy, model.policy.state_dict())
    if result is not None:
        layers = adapted.policy.lora_layers
        for name, directions in result.A.items():
            if name in layers:
                layers[name].set_lora_A(directions)
    return adapted


def merge(model: PPO, env: GymEnv | None = None) -> PPO:
    """A plain-policy PPO (SB3's own policy class) with ``model``'s adapters folded into the base weights.

    :param model: An adapted PPO.
    :param env: Environment for the new model; defaults to ``model``'s.
    :return: A PPO whose actions equal ``model``'s, loadable by ``PPO.load`` without eva_rl's LoRA classes.
    """
    if not isinstance(model.policy, LoraPolicyMixin):
        raise ValueError(f"model.policy is a {type(model.policy).__name__}, which has no LoRA adapters to merge")
    env = env if env is not None else model.get_env()
    if env is None:
        raise ValueError("the model has no environment; pass env= to merge()")
    plain_class = PLAIN_POLICY_FOR[type(model.policy)]
    policy_kwargs = {k: v for k, v in model.policy_kwargs.items() if k not in _LORA_POLICY_KWARGS}
    merged = PPO(plain_class, env, policy_kwargs=policy_kwargs, **ppo_hyperparameters(model))
    merged.policy.load_state_dict(merged_state_dict(model.policy), strict=True)
    return merged
