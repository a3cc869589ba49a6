"""``adapt``: a pretrained PPO agent plus LoRA adapters (EVA or standard init); ``merge``: fold them back in."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from stable_baselines3 import PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.type_aliases import GymEnv
from stable_baselines3.common.vec_env import VecEnv
from torch import nn

from eva_rl.config import EvaConfig, LoraConfig
from eva_rl.eva import EvaResult, EvaSession, run_eva
from eva_rl.eva_ppo import EvaPPO
from eva_rl.inits import olora_init, pissa_init
from eva_rl.inject import (
    inject_adapters,
    layer_fan_in,
    merged_state_dict,
    pattern_value,
    remove_adapters,
    resolve_ranks,
)
from eva_rl.policies import HEADS, LORA_POLICY_FOR, PLAIN_POLICY_FOR, LoraPolicyMixin
from eva_rl.rollouts import RolloutBatches, policy_forward

METHODS = ("eva", "lora", "pissa", "olora", "dora", "eva+dora", "lora-redist", "head")
"""Adapter initializations :func:`adapt` knows."""
EVA_METHODS = ("eva", "eva+dora", "lora-redist")
"""Methods that run EVA (for directions, ranks or both)."""

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


def _factorization_ranks(model: PPO, lora: LoraConfig, exclude: tuple[str, ...], method: str) -> LoraConfig:
    """PiSSA/OLoRA factor ``W`` itself, so a layer's rank is capped at ``min(out, fan_in)`` (a value head has
    ``out = 1``); capped layers keep ``alpha / r``, and a warning names them."""
    rank_pattern, alpha_pattern, capped = dict(lora.rank_pattern), dict(lora.alpha_pattern), []
    for name, (rank, alpha) in resolve_ranks(model.policy, lora, exclude).items():
        weight = model.policy.get_submodule(name).weight
        limit = min(weight.shape[0], weight[0].numel())
        if rank > limit:
            rank_pattern[name], alpha_pattern[name] = limit, alpha * limit / rank
            capped.append(f"{name} ({rank} -> {limit})")
    if capped:
        warnings.warn(f"{method}: rank capped at min(out, fan_in) for {', '.join(capped)}", stacklevel=3)
    return dataclasses.replace(lora, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)


def _check_eva_batch_size(policy: nn.Module, lora: LoraConfig, eva: EvaConfig, exclude: tuple[str, ...]) -> None:
    resolved = resolve_ranks(policy, lora, exclude)
    fan_in = {name: layer_fan_in(policy.get_submodule(name)) for name in resolved}
    tracked = max(
        min(round(rank * eva.rho) + eva.extra_components, fan_in[name]) for name, (rank, _) in resolved.items()
    )
    if eva.batch_size < tracked:
        raise ValueError(
            f"EvaConfig.batch_size={eva.batch_size} is below the {tracked} components EVA tracks per layer "
            f"(round(r*rho) plus extra_components, at most the fan-in); use batch_size >= {tracked}"
        )


def _run_eva(
    model: PPO, vec_env: VecEnv, lora: LoraConfig, eva: EvaConfig, exclude: tuple[str, ...], progress: bool
) -> EvaResult:
    _check_eva_batch_size(model.policy, lora, eva, exclude)
    rollouts = RolloutBatches(model.policy, vec_env, eva.batch_size, eva.deterministic, eva.seed)
    result = run_eva(model.policy, rollouts, lora, eva, forward_fn=policy_forward, exclude=exclude, progress=progress)
    result.env_steps = rollouts.env_steps
    return result


def adapt(
    model: PPO,
    env: GymEnv,
    method: str = "eva",
    lora: LoraConfig | None = None,
    eva: EvaConfig | None = None,
    progress: bool = False,
    **ppo_kwargs: Any,
) -> PPO:
    """A new PPO on ``env`` whose policy is ``model``'s pretrained policy plus adapters initialized by ``method``.

    Every method leaves the policy's outputs unchanged at step 0:

    - ``"eva"``: A from the principal directions of each layer's inputs on rollouts of the pretrained policy in
      ``env``, ranks redistributed by explained variance, B = 0;
    - ``"lora"``: Kaiming-uniform A, B = 0;
    - ``"pissa"`` / ``"olora"``: A and B from the SVD / QR of ``W``, the residual ``W - s B A`` frozen;
    - ``"dora"`` / ``"eva+dora"``: ``"lora"`` / ``"eva"`` with DoRA's trainable magnitude;
    - ``"lora-redist"``: EVA's rank allocation with Kaiming-uniform A (separates EVA's ranks from its directions);
    - ``"head"``: no adapters; only the action and value heads (and ``log_std``) train.

    :param model: The pretrained agent (MLP, CNN or MultiInput actor-critic policy).
    :param env: The target environment (a Gymnasium env or a VecEnv); its spaces must match the agent's.
    :param method: One of :data:`METHODS`.
    :param lora: Adapter configuration.
    :param eva: EVA configuration (methods that run EVA).
    :param progress: Show a progress bar during EVA.
    :param ppo_kwargs: PPO constructor arguments overriding those taken from ``model``.
    :return: The adapted PPO. ``model.policy.eva_report`` holds EVA's report (``None`` without EVA).
    :raises SpaceMismatchError: if ``env``'s spaces differ from ``model``'s.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is invalid: expected one of {METHODS}")
    lora = lora or LoraConfig()
    eva = eva or EvaConfig()
    if method in ("dora", "eva+dora"):
        lora = dataclasses.replace(lora, use_dora=True)
    if method == "head":
        lora = dataclasses.replace(lora, train_heads=True, rank_pattern={".*": 0})
    policy_class = _lora_policy_class(model)
    vec_env = wrap_target_env(model, env)
    exclude = HEADS if lora.train_heads else ()
    if method in ("pissa", "olora"):
        lora = _factorization_ranks(model, lora, exclude, method)

    result = None
    eva_from_ppo = method in EVA_METHODS and eva.data_source == "ppo"
    if method in EVA_METHODS and not eva_from_ppo:
        result = _run_eva(model, vec_env, lora, eva, exclude, progress)
        lora = eva_lora_config(lora, result, eva.adjust_scaling_factors)

    hyperparameters = ppo_hyperparameters(model)
    hyperparameters.update(ppo_kwargs)
    policy_kwargs = {k: v for k, v in model.policy_kwargs.items() if k not in _LORA_POLICY_KWARGS}
    policy_kwargs.update(lora_config=lora.to_dict(), eva_report=result.to_dict() if result else None)
    # With EVA on PPO's rollouts the adapters start as placeholders (configured ranks, B = 0) until EVA is done.
    algorithm = EvaPPO if eva_from_ppo else PPO
    adapted = algorithm(policy_class, vec_env, policy_kwargs=policy_kwargs, **hyperparameters)
    load_base_weights(adapted.policy, model.policy.state_dict())
    _init_adapters(adapted.policy, method, result)
    if eva_from_ppo:
        _check_eva_batch_size(adapted.policy, lora, eva, exclude)
        if eva.batch_size > adapted.n_steps * adapted.n_envs:
            raise ValueError(
                f"EvaConfig.batch_size={eva.batch_size} exceeds PPO's rollout of n_steps*n_envs="
                f"{adapted.n_steps * adapted.n_envs} steps; with data_source='ppo' use an EVA batch_size <= that"
            )
        session = EvaSession(adapted.policy, lora, eva, forward_fn=policy_forward, exclude=exclude)
        adapted.start_eva(session, lambda eva_result: _swap_in_eva(adapted, method, lora, eva, eva_result))
    return adapted


def _init_adapters(policy: LoraPolicyMixin, method: str, result: EvaResult | None) -> None:
    for name, layer in policy.lora_layers.items():
        if method in ("eva", "eva+dora") and result is not None:
            layer.set_lora_A(result.A[name])
        elif method == "pissa":
            pissa_init(layer)
        elif method == "olora":
            olora_init(layer)
        if layer.use_dora:
            layer.reset_dora_magnitude()  # to the loaded pretrained weights


def _swap_in_eva(model: PPO, method: str, lora: LoraConfig, eva: EvaConfig, result: EvaResult) -> None:
    """Replace the placeholder adapters of ``model`` by EVA's (ranks and A), and the optimizer with them."""
    policy = model.policy
    lora = eva_lora_config(lora, result, eva.adjust_scaling_factors)
    remove_adapters(policy)
    policy.lora_config = lora
    policy.eva_report = result.to_dict()
    inject_adapters(policy, lora, exclude=HEADS if lora.train_heads else ())
    policy.to(model.device)
    policy._set_trainable()
    _init_adapters(policy, method, result)
    learning_rate = model.lr_schedule(model._current_progress_remaining)
    policy.optimizer = policy.optimizer_class(
        policy.trainable_parameters(), lr=learning_rate, **policy.optimizer_kwargs
    )
    model.policy_kwargs.update(lora_config=lora.to_dict(), eva_report=policy.eva_report)


def merge(model: PPO, env: GymEnv | None = None) -> PPO:
    """A plain-policy PPO (SB3's own policy class) with ``model``'s adapters folded into the base weights.

    :param model: An adapted PPO.
    :param env: Environment for the new model; none is needed (the spaces come from ``model``).
    :return: A PPO whose actions equal ``model``'s, loadable by ``PPO.load`` without eva_rl's LoRA classes.
    """
    if not isinstance(model.policy, LoraPolicyMixin):
        raise ValueError(f"model.policy is a {type(model.policy).__name__}, which has no LoRA adapters to merge")
    policy_kwargs = {k: v for k, v in model.policy_kwargs.items() if k not in _LORA_POLICY_KWARGS}
    # Built the way PPO.load builds a model, so no environment is needed: spaces and n_envs come from `model`.
    merged = PPO(
        PLAIN_POLICY_FOR[type(model.policy)],
        None,
        policy_kwargs=policy_kwargs,
        _init_setup_model=False,
        **ppo_hyperparameters(model),
    )
    merged.observation_space, merged.action_space, merged.n_envs = (
        model.observation_space,
        model.action_space,
        model.n_envs,
    )
    merged._setup_model()
    merged.policy.load_state_dict(merged_state_dict(model.policy), strict=True)
    env = env if env is not None else model.get_env()
    if env is not None:
        merged.set_env(env)
    return merged
