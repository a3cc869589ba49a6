"""``adapt``: a pretrained agent plus the model a fine-tuning method starts from; ``merge``: fold adapters back in."""

from __future__ import annotations

import dataclasses
from typing import Any

from stable_baselines3 import DQN
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.type_aliases import GymEnv
from stable_baselines3.common.vec_env import VecEnv

from eva_rl.config import EvaConfig, LoraConfig
from eva_rl.errors import ConfigError, SpaceMismatchError
from eva_rl.eva import EvaResult, EvaSession
from eva_rl.eva_ppo import EVA_ROLLOUT_ALGORITHMS
from eva_rl.inits import kaiming_signal
from eva_rl.inject import inject_adapters, merged_state_dict, remove_adapters
from eva_rl.loading import ALGORITHMS, ON_POLICY, algorithm_name
from eva_rl.methods import Method, get_method
from eva_rl.models import (
    build_model,
    carry_learned_coefficients,
    load_base_weights,
    policy_kwargs_for,
    wrap_target_env,
)
from eva_rl.offpolicy import PRETRAINED_WARMUP
from eva_rl.plan import AdapterPlan
from eva_rl.policies import (
    PLAIN_POLICY_FOR,
    LoraPolicyMixin,
    excluded_layers,
    lora_policy_class,
    lora_policy_kwargs,
    plain_policy_kwargs,
    sync_target_networks,
)
from eva_rl.rollouts import RolloutBatches, Transition, policy_forward

__all__ = ["SpaceMismatchError", "adapt", "load_base_weights", "merge"]


def adapter_plan(model: BaseAlgorithm, method: Method, lora: LoraConfig, eva: EvaConfig) -> AdapterPlan:
    """The per-layer plan ``method`` fine-tunes ``model``'s policy with (``lora`` as the method uses it)."""
    return AdapterPlan.resolve(
        model.policy,
        lora,
        eva if method.runs_eva else None,
        exclude=excluded_layers(model.policy, lora),
        method=method.name,
        cap_at_weight_rank=method.rewrites_base,
    )


def reads_algorithm_rollouts(eva: EvaConfig, algorithm: type[BaseAlgorithm], n_steps: int | None, n_envs: int) -> bool:
    """Whether EVA reads the algorithm's own first rollouts: ``data_source="ppo"``, or ``"auto"`` for an on-policy
    algorithm whose rollout (``n_steps * n_envs``) holds an EVA batch (A2C's 5-step rollouts on few envs do not)."""
    if eva.data_source == "auto":
        return algorithm in EVA_ROLLOUT_ALGORITHMS and n_steps is not None and n_steps * n_envs >= eva.batch_size
    return eva.data_source == "ppo"


def check_eva_batch_size(plan: AdapterPlan, eva: EvaConfig) -> None:
    """:raises ConfigError: if an EVA batch has fewer rows than the components EVA tracks at some layer."""
    if eva.batch_size < plan.eva_components:
        raise ConfigError(
            f"EvaConfig.batch_size={eva.batch_size} is below the {plan.eva_components} components EVA tracks per "
            f"layer (round(r*rho) plus extra_components, at most the fan-in); use batch_size >= {plan.eva_components}"
        )


def eva_from_rollouts(
    model: BaseAlgorithm,
    vec_env: VecEnv,
    plan: AdapterPlan,
    eva: EvaConfig,
    progress: bool = False,
    transitions: list[Transition] | None = None,
) -> EvaResult:
    """EVA on rollouts of ``model``'s policy in ``vec_env``, for the layers of ``plan``; with a ``transitions``
    list, every step taken is appended to it (for a replay buffer)."""
    check_eva_batch_size(plan, eva)
    # Off-policy critics see (observation, action) pairs; DQN explores epsilon-greedily as fine-tuning will.
    with_actions = hasattr(model.policy, "critic")
    exploration = model.exploration_final_eps if isinstance(model, DQN) else 0.0
    rollouts = RolloutBatches(
        model.policy,
        vec_env,
        eva.batch_size,
        eva.deterministic,
        eva.seed,
        with_actions,
        exploration,
        keep_transitions=transitions is not None,
    )
    result = EvaSession(model.policy, plan, eva, forward_fn=policy_forward).run(rollouts, progress)
    result.env_steps = rollouts.env_steps
    if transitions is not None:
        transitions.extend(rollouts.transitions)
        result.replayed_steps = rollouts.env_steps
    return result


def store_transitions(buffer: ReplayBuffer, transitions: list[Transition]) -> None:
    """Add EVA's steps to an off-policy algorithm's replay buffer: the pretrained policy collected them with the
    algorithm's exploration, so its first updates learn from them as from its own warm-up."""
    for transition in transitions:
        buffer.add(*transition)


def fine_tuning_algorithm(model: BaseAlgorithm, algorithm: str | type[BaseAlgorithm] | None) -> type[BaseAlgorithm]:
    """The algorithm class to fine-tune ``model`` with: ``algorithm`` (a name or class), or ``model``'s own.

    :raises ConfigError: for an unknown name, or an algorithm whose policies are not ``model``'s kind (an on-policy
        actor-critic agent can be fine-tuned with PPO or A2C; an off-policy agent only with its own algorithm).
    """
    own = type(model)
    if algorithm is None:
        return own
    if isinstance(algorithm, str):
        if algorithm not in ALGORITHMS:
            raise ConfigError(f"algorithm {algorithm!r} is not supported; expected one of {list(ALGORITHMS)}")
        algorithm = ALGORITHMS[algorithm]
    on_policy = tuple(ALGORITHMS[name] for name in ON_POLICY)
    if algorithm is not own and not (issubclass(own, on_policy) and issubclass(algorithm, on_policy)):
        own_name = next((name for name, cls in ALGORITHMS.items() if issubclass(own, cls)), own.__name__.lower())
        raise ConfigError(
            f"a {own.__name__} agent cannot be fine-tuned with {algorithm.__name__}: their policies differ "
            f"(PPO and A2C share theirs; other algorithms fine-tune their own agents); pass --algo {own_name}, or "
            "set algo in the task file"
        )
    return algorithm


def adapt(
    model: BaseAlgorithm,
    env: GymEnv,
    method: str = "eva",
    lora: LoraConfig | None = None,
    eva: EvaConfig | None = None,
    progress: bool = False,
    algorithm: str | type[BaseAlgorithm] | None = None,
    **kwargs: Any,
) -> BaseAlgorithm:
    """A new model on ``env`` that fine-tunes ``model``'s pretrained policy with ``method``.

    The methods are those of :mod:`eva_rl.methods`; every one but ``"scratch"`` leaves the policy's outputs
    unchanged at step 0:

    - ``"eva"``: A from the principal directions of each layer's inputs on rollouts of the pretrained policy in
      ``env``, ranks redistributed by explained variance, B = 0;
    - ``"lora"``: Kaiming-uniform A, B = 0;
    - ``"pissa"`` / ``"olora"``: A and B from the SVD / QR of ``W``, the residual ``W - s B A`` frozen;
    - ``"dora"`` / ``"eva+dora"``: ``"lora"`` / ``"eva"`` with DoRA's trainable magnitude;
    - ``"lora-redist"``: EVA's rank allocation with Kaiming-uniform A (separates EVA's ranks from its directions);
    - ``"lora-orth"``, ``"eva-rescaled"``, ``"eva-signal"``, ``"eva-fa"``, ``"lora-fa"``, ``"lora-orth-fa"``,
      ``"lora-deferred"``: controls (random orthonormal A; EVA's rows at Kaiming-uniform's norm; EVA's rows carrying
      a Kaiming-uniform row's output variance; ``eva`` / ``lora`` / ``lora-orth`` with A frozen; ``lora`` whose first
      update waits for EVA as ``eva``'s does);
    - ``"eva-own"``: ``"eva"`` on rollouts of its own before training, whatever ``eva.data_source`` says;
    - ``"eva-span"``: ``"eva"`` whose convergence test is each layer's span (``EvaConfig.convergence="subspace"``);
    - ``"head"``: no adapters; only the action and value heads (and ``log_std``) train;
    - ``"full"``: the pretrained policy, every weight trainable; ``"scratch"``: the same architecture, freshly
      initialized.

    :param model: The pretrained agent (MLP, CNN or MultiInput actor-critic policy for adapter methods).
    :param env: The target environment (a Gymnasium env or a VecEnv); its spaces must match the agent's.
    :param method: A registered method name.
    :param lora: Adapter configuration.
    :param eva: EVA configuration (methods that run EVA).
    :param progress: Show a progress bar during EVA.
    :param algorithm: The algorithm to fine-tune with (default: ``model``'s; PPO and A2C can swap).
    :param kwargs: Constructor arguments of the algorithm overriding those taken from ``model``.
    :return: The new model. For adapter methods ``model.policy.eva_report`` holds EVA's report (``None`` without
        EVA) and ``model.policy.lora_plan`` the per-layer plan.
    :raises SpaceMismatchError: if ``env``'s spaces differ from ``model``'s.
    :raises ConfigError: for an unknown method or settings that do not fit the policy.
    """
    spec = get_method(method)
    algorithm = fine_tuning_algorithm(model, algorithm)
    base_kwargs = policy_kwargs_for(model, algorithm)
    if spec.pretrained and algorithm in PRETRAINED_WARMUP:
        if isinstance(model, DQN):  # go on exploring as little as the pretrained agent ended, not from epsilon 1
            kwargs.setdefault("exploration_initial_eps", model.exploration_final_eps)
        algorithm = PRETRAINED_WARMUP[algorithm]
    if not spec.adapters:
        fresh = build_model(model, type(model.policy), plain_policy_kwargs(base_kwargs), env, algorithm, **kwargs)
        if spec.pretrained:
            fresh.policy.load_state_dict(model.policy.state_dict())
            sync_target_networks(fresh.policy)  # every method starts with targets equal to the online networks
            carry_learned_coefficients(fresh, model)
        return fresh

    lora = spec.lora_config(lora or LoraConfig())
    eva = eva or EvaConfig()
    if spec.eva_data is not None:
        eva = dataclasses.replace(eva, data_source=spec.eva_data)
    if spec.eva_convergence is not None:
        eva = dataclasses.replace(eva, convergence=spec.eva_convergence)
    policy_class = lora_policy_class(type(model.policy))
    vec_env = wrap_target_env(model, env)
    plan = adapter_plan(model, spec, lora, eva)
    n_steps = kwargs.get("n_steps", getattr(model, "n_steps", None))
    eva_from_ppo = spec.runs_eva and reads_algorithm_rollouts(eva, algorithm, n_steps, vec_env.num_envs)
    if eva_from_ppo and algorithm not in EVA_ROLLOUT_ALGORITHMS:
        raise ConfigError(
            f"EvaConfig.data_source='ppo' reads the rollouts of an on-policy algorithm; {algorithm.__name__} has "
            "none: use data_source='rollouts'"
        )
    result = None
    # an off-policy algorithm keeps EVA's steps in its replay buffer rather than discarding them
    transitions: list[Transition] | None = [] if issubclass(algorithm, OffPolicyAlgorithm) else None
    if spec.runs_eva and not eva_from_ppo:
        result = ranks_taken(spec, plan, eva_from_rollouts(model, vec_env, plan, eva, progress, transitions))
        plan = plan.with_ranks(result.ranks, eva.adjust_scaling_factors)

    # With EVA on PPO's rollouts the adapters start as placeholders (configured ranks, B = 0) until EVA is done.
    policy_kwargs = lora_policy_kwargs(
        plan.lora_config(lora), plan, result and result.report(), base_kwargs, eva_pending=eva_from_ppo
    )
    built_with = EVA_ROLLOUT_ALGORITHMS[algorithm] if eva_from_ppo else algorithm
    adapted = build_model(model, policy_class, policy_kwargs, vec_env, built_with, **kwargs)
    load_base_weights(adapted.policy, model.policy.state_dict())
    init_adapters(adapted.policy, spec, result)
    if transitions:
        store_transitions(adapted.replay_buffer, transitions)
    adapted.policy.sync_targets()
    carry_learned_coefficients(adapted, model)
    if eva_from_ppo:
        check_eva_batch_size(plan, eva)
        rollout = adapted.n_steps * adapted.n_envs
        if eva.batch_size > rollout:
            raise ConfigError(
                f"EvaConfig.batch_size={eva.batch_size} exceeds the rollout of n_steps*n_envs={rollout} steps; "
                "with data_source='ppo' use an EVA batch_size <= that"
            )
        session = EvaSession(adapted.policy, plan, eva, forward_fn=policy_forward)
        adapted.start_eva(session, lambda eva_result: _swap_in_eva(adapted, spec, lora, eva, eva_result))
    return adapted


def init_adapters(policy: LoraPolicyMixin, method: Method, result: EvaResult | None) -> None:
    """Initialize every adapter of ``policy`` the way ``method`` does (EVA's directions when it has them)."""
    for name, layer in policy.lora_layers.items():
        if method.eva_directions and result is not None:
            layer.set_lora_A(result.A[name])
            if method.match_signal:
                kaiming_signal(layer, result.explained_variance_ratio[name])
        elif method.init is not None:
            method.init(layer)
        if method.rescale is not None:
            method.rescale(layer)
        if layer.use_dora:
            layer.reset_dora_magnitude()  # to the loaded pretrained weights


def ranks_taken(method: Method, plan: AdapterPlan, result: EvaResult) -> EvaResult:
    """``result`` with the ranks ``method`` takes: EVA's allocation, or ``plan``'s own ranks (``eva_ranks=False``)."""
    if method.eva_ranks:
        return result
    return dataclasses.replace(result, ranks={name: plan.ranks[name] for name in result.ranks})


def _swap_in_eva(model: OnPolicyAlgorithm, method: Method, lora: LoraConfig, eva: EvaConfig, result: EvaResult) -> None:
    """Replace the placeholder adapters of ``model`` by EVA's (ranks and A), and the optimizer with them."""
    policy = model.policy
    result = ranks_taken(method, policy.lora_plan, result)
    plan = policy.lora_plan.with_ranks(result.ranks, eva.adjust_scaling_factors)
    remove_adapters(policy)
    policy.lora_config, policy.lora_plan, policy.eva_report = plan.lora_config(lora), plan, result.report()
    policy.eva_pending = False
    inject_adapters(policy, plan)
    policy.to(model.device)
    policy._set_trainable()
    init_adapters(policy, method, result)
    learning_rate = model.lr_schedule(model._current_progress_remaining)
    policy.optimizer = policy.optimizer_class(
        policy.trainable_parameters(), lr=learning_rate, **policy.optimizer_kwargs
    )
    model.policy_kwargs.pop("eva_pending", None)
    model.policy_kwargs.update(lora_policy_kwargs(policy.lora_config, plan, policy.eva_report))
    policy._cache_acting_weights()  # the layers at EVA's ranks are new ones


def merge(model: BaseAlgorithm, env: GymEnv | None = None) -> BaseAlgorithm:
    """A plain-policy model (SB3's own policy class) with ``model``'s adapters folded into the base weights.

    :param model: An adapted model (PPO or A2C).
    :param env: Environment for the new model; none is needed (the spaces come from ``model``).
    :return: A model of ``model``'s algorithm whose actions equal ``model``'s, loadable by its plain ``load``
        (``PPO.load``) without eva_rl's LoRA classes.
    """
    if not isinstance(model.policy, LoraPolicyMixin):
        raise ConfigError(f"model.policy ({type(model.policy).__name__}) has no LoRA adapters to merge")
    plain_class = PLAIN_POLICY_FOR[type(model.policy)]
    algorithm = ALGORITHMS[algorithm_name(model)]  # EvaPPO merges into PPO
    merged = build_model(model, plain_class, plain_policy_kwargs(model.policy_kwargs), algorithm=algorithm)
    merged.policy.load_state_dict(merged_state_dict(model.policy), strict=True)
    carry_learned_coefficients(merged, model)
    env = env if env is not None else model.get_env()
    if env is not None:
        merged.set_env(env)
    return merged
