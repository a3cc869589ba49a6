"""Building one SB3 model from another: the same algorithm and hyperparameters, another policy class or weights.

:func:`build_model` is the one place a model is derived from a pretrained agent: :func:`~eva_rl.adapt.adapt`
(adapted, full and from-scratch models), :func:`~eva_rl.checkpoints.load_adapter` and :func:`~eva_rl.adapt.merge`
all go through it.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.type_aliases import GymEnv
from stable_baselines3.common.vec_env import VecEnv
from torch import nn

from eva_rl.errors import AgentError, SpaceMismatchError

# Constructor arguments that are not hyperparameters: what the model is built from, not how it learns.
_NOT_HYPERPARAMETERS = {"self", "policy", "env", "policy_kwargs", "_init_setup_model"}


def _constructor_parameters(algorithm: type[BaseAlgorithm]) -> list[str]:
    """The named parameters of ``algorithm``'s constructor; a mixin's ``__init__(*args, **kwargs)`` (``EvaPPO``'s)
    passes them on, so they are read from the first class in the MRO that names them."""
    for cls in algorithm.__mro__:
        if "__init__" not in vars(cls):
            continue
        parameters = inspect.signature(cls.__init__).parameters.values()
        if not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters):
            return [p.name for p in parameters]
    return []


def algorithm_hyperparameters(model: BaseAlgorithm, algorithm: type[BaseAlgorithm] | None = None) -> dict[str, Any]:
    """The constructor arguments of ``algorithm`` (default: ``model``'s own) that ``model``'s setup gives.

    Read from the attributes SB3 stores each argument under (``name``, or ``_name`` for private ones); an
    argument SB3 keeps nowhere takes its default. For another algorithm (an A2C agent fine-tuned with PPO) the
    rollout length ``n_steps`` is not carried over: each algorithm's is its own (A2C 5, PPO 2048).
    """
    algorithm = algorithm or type(model)
    same = issubclass(algorithm, type(model)) or issubclass(type(model), algorithm)  # EvaPPO is PPO
    skipped = _NOT_HYPERPARAMETERS | (set() if same else {"n_steps"})
    values = {}
    for name in _constructor_parameters(algorithm):
        if name in skipped:
            continue
        for attribute in (name, f"_{name}"):
            if hasattr(model, attribute):
                values[name] = getattr(model, attribute)
                break
    return values


def wrap_target_env(model: BaseAlgorithm, env: GymEnv) -> VecEnv:
    """Vectorize ``env`` the way SB3 does and check that its spaces match ``model``'s.

    :raises SpaceMismatchError: naming both spaces when they differ.
    """
    vec_env = BaseAlgorithm._wrap_env(env, verbose=0, monitor_wrapper=True)
    for kind in ("observation", "action"):
        expected, got = getattr(model, f"{kind}_space"), getattr(vec_env, f"{kind}_space")
        if expected != got:
            raise SpaceMismatchError(
                f"the target env's {kind} space does not match the pretrained agent's: pretrained agent: {expected}; "
                f"target env: {got}; use the same observation wrappers (encoding) as in pretraining, or an agent "
                "trained for this env"
            )
    return vec_env


def build_model(
    agent: BaseAlgorithm,
    policy_class: type,
    policy_kwargs: dict[str, Any],
    env: GymEnv | None = None,
    algorithm: type[BaseAlgorithm] | None = None,
    **overrides: Any,
) -> BaseAlgorithm:
    """A new model with ``agent``'s algorithm hyperparameters and a freshly built ``policy_class``.

    :param agent: The model whose hyperparameters (and spaces) the new one takes.
    :param policy_class: The new model's policy class.
    :param policy_kwargs: Its ``policy_kwargs``.
    :param env: The new model's environment; its spaces must match ``agent``'s. Without one, the model is built
        the way ``PPO.load`` builds one, from ``agent``'s spaces and ``n_envs``.
    :param algorithm: The algorithm class (default: ``agent``'s).
    :param overrides: Constructor arguments replacing ``agent``'s.
    :raises SpaceMismatchError: if ``env``'s spaces differ from ``agent``'s.
    """
    algorithm = algorithm or type(agent)
    hyperparameters = {**algorithm_hyperparameters(agent, algorithm), **overrides}
    if env is not None:
        return algorithm(policy_class, wrap_target_env(agent, env), policy_kwargs=policy_kwargs, **hyperparameters)
    model = algorithm(policy_class, None, policy_kwargs=policy_kwargs, _init_setup_model=False, **hyperparameters)
    model.observation_space, model.action_space = agent.observation_space, agent.action_space
    model.n_envs = agent.n_envs
    model._setup_model()
    return model


def carry_learned_coefficients(model: BaseAlgorithm, agent: BaseAlgorithm) -> None:
    """Give ``model`` what ``agent`` learned besides its policy's weights, so fine-tuning continues its training.

    SAC learns its entropy coefficient (``log_ent_coef``, optimized towards ``target_entropy``); a model built from
    the agent's constructor arguments (``ent_coef="auto"``) would restart it at 1.0, which on a pretrained agent
    (rl-zoo3's HalfCheetah ends near 0.01) floods the critic's targets with entropy and collapses the policy. The
    value is copied in place, so the coefficient's optimizer keeps optimizing the same tensor. A model whose
    coefficient is fixed (a float ``ent_coef`` given for the run) keeps its own.
    """
    source, target = getattr(agent, "log_ent_coef", None), getattr(model, "log_ent_coef", None)
    if isinstance(source, torch.Tensor) and isinstance(target, torch.Tensor):
        with torch.no_grad():
            target.copy_(source.detach().to(target.device))


def load_base_weights(policy: nn.Module, plain_state_dict: dict[str, torch.Tensor]) -> None:
    """Load a plain policy's weights into the base layers of a LoRA policy; adapters are left as they are.

    A key ``x.base_layer.weight`` of the LoRA policy takes ``x.weight`` of the plain one.

    :raises AgentError: listing missing or mismatched keys.
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
        raise AgentError(f"pretrained weights do not fit the adapted policy; missing: {missing}, shape: {mismatched}")
    policy.load_state_dict(state, strict=True)


def policy_kwargs_for(agent: BaseAlgorithm, algorithm: type[BaseAlgorithm]) -> dict[str, Any]:
    """``agent``'s ``policy_kwargs`` as ``algorithm`` should build its policy: A2C writes its RMSprop optimizer into
    them, which another algorithm should not inherit (and A2C adds again when it is missing)."""
    kwargs = dict(agent.policy_kwargs)
    if algorithm is not type(agent) and kwargs.get("optimizer_class") is torch.optim.RMSprop:
        kwargs.pop("optimizer_class")
        kwargs.pop("optimizer_kwargs", None)
    return kwargs
