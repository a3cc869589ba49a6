"""SB3 policies with LoRA adapters, built in the constructor so that ``PPO.load`` / ``SAC.load`` rebuild them.

SB3 creates the optimizers inside ``_build`` (``ortho_init`` too, for actor-critic policies). These classes let
``_build`` finish, then wrap the planned layers, mirror the adapters into the target networks of off-policy
algorithms (SAC, TD3, DQN), freeze the base weights and rebuild the optimizers over the trainable parameters only,
in a fixed order, so the optimizer state saved by ``save`` loads back strictly. The LoRA config, the adapter plan
(per-layer ranks, EVA's included) and the EVA report are constructor arguments, so they travel in ``policy_kwargs``
inside the zip.

Targets: the adapter plan covers the online networks (``actor``, ``critic``, ``q_net``); each target network
(``actor_target``, ``critic_target``, ``q_net_target``) gets the same adapters at the same places, starts as a copy
of its online network, and follows it by the algorithm's own Polyak update (which averages every parameter,
adapters included). Target parameters are frozen: the algorithms only change them under ``no_grad``.

Keep this module path and these class names stable: SB3 pickles the policy class by reference.
"""

from __future__ import annotations

from typing import Any

from stable_baselines3.common.policies import (
    ActorCriticCnnPolicy,
    ActorCriticPolicy,
    BasePolicy,
    MultiInputActorCriticPolicy,
)
from stable_baselines3.common.type_aliases import Schedule
from stable_baselines3.dqn.policies import CnnPolicy as DQNCnnPolicy
from stable_baselines3.dqn.policies import DQNPolicy
from stable_baselines3.dqn.policies import MultiInputPolicy as DQNMultiInputPolicy
from stable_baselines3.sac.policies import CnnPolicy as SACCnnPolicy
from stable_baselines3.sac.policies import MultiInputPolicy as SACMultiInputPolicy
from stable_baselines3.sac.policies import SACPolicy
from stable_baselines3.td3.policies import CnnPolicy as TD3CnnPolicy
from stable_baselines3.td3.policies import MultiInputPolicy as TD3MultiInputPolicy
from stable_baselines3.td3.policies import TD3Policy
from torch import nn

from eva_rl.config import LoraConfig
from eva_rl.errors import AgentError, CheckpointError
from eva_rl.eva_report import EvaReport
from eva_rl.inject import inject_adapters, lora_layers, set_submodule
from eva_rl.layers import LoraLayer, keep_adapted_weights, lora_layer_type
from eva_rl.plan import AdapterPlan

HEADS = ("action_net", "value_net")
"""The heads of an actor-critic policy (PPO, A2C)."""
TARGET_NETWORKS = {"actor": "actor_target", "critic": "critic_target", "q_net": "q_net_target"}
"""Each online network of an off-policy policy and the target network that follows it."""
LORA_POLICY_KWARGS = ("lora_config", "lora_plan", "eva_report", "eva_pending")
"""The ``policy_kwargs`` a LoRA policy adds to its plain counterpart's."""


def target_pairs(policy: nn.Module) -> list[tuple[str, str]]:
    """``[(online name, target name)]`` of the target networks ``policy`` has (none for actor-critic policies)."""
    return [(online, target) for online, target in TARGET_NETWORKS.items() if hasattr(policy, target)]


def _last_linear(module: nn.Module, prefix: str) -> str:
    names = [
        name
        for name, child in module.named_modules()
        if isinstance(child, (nn.Linear, LoraLayer)) and "base_layer" not in name.split(".")
    ]
    return f"{prefix}.{names[-1]}" if names and names[-1] else prefix


def head_names(policy: BasePolicy) -> tuple[str, ...]:
    """The output layers of ``policy``: the action and value heads of an actor-critic policy; the actor's mean
    (and SAC's log-std) layer and each Q-network's last layer of an off-policy one."""
    if isinstance(policy, ActorCriticPolicy):
        return HEADS
    names = []
    actor = getattr(policy, "actor", None)
    if actor is not None and hasattr(actor, "latent_pi"):  # SAC: mu and log_std are the heads
        names.append(_last_linear(actor.mu, "actor.mu"))
        if isinstance(actor.log_std, nn.Module):
            names.append("actor.log_std")
    elif actor is not None:  # TD3: mu is the whole actor network
        names.append(_last_linear(actor.mu, "actor.mu"))
    critic = getattr(policy, "critic", None)
    if critic is not None:
        names += [_last_linear(q_net, f"critic.qf{i}") for i, q_net in enumerate(critic.q_networks)]
    if hasattr(policy, "q_net"):
        names.append(_last_linear(policy.q_net.q_net, "q_net.q_net"))
    return tuple(names)


def excluded_layers(policy: BasePolicy, lora: LoraConfig) -> tuple[str, ...]:
    """Layers of ``policy`` that never get their own adapters under ``lora``: the target networks (they mirror their
    online networks) and, when they train fully, the heads."""
    targets = tuple(rf"{target}\..*" for _, target in target_pairs(policy))
    return targets + (head_names(policy) if lora.train_heads else ())


def sync_target_networks(policy: nn.Module) -> None:
    """Make every target network an exact copy of its online network (and keep it in eval mode)."""
    for online, target in target_pairs(policy):
        getattr(policy, target).load_state_dict(getattr(policy, online).state_dict())
        getattr(policy, target).set_training_mode(False)


class LoraPolicyMixin:
    """Adds LoRA adapters to an SB3 policy class (actor-critic, SAC, TD3 or DQN).

    :param lora_config: A :class:`~eva_rl.config.LoraConfig` or its ``to_dict()`` form.
    :param lora_plan: The :class:`~eva_rl.plan.AdapterPlan` (or its ``to_dict()`` form) to build the adapters from;
        ``None`` resolves one from ``lora_config`` (a policy built by hand, or a zip saved before plans existed).
    :param eva_report: The :class:`~eva_rl.eva_report.EvaReport` (or its dict form), kept with the policy.
    :param eva_pending: The adapters are placeholders until EVA on PPO's rollouts finishes
        (:class:`~eva_rl.eva_ppo.EvaPPO`); saved with the policy, so one saved before then cannot be trained.
    """

    lora_config: LoraConfig
    lora_plan: AdapterPlan
    eva_report: EvaReport | None

    def __init__(
        self,
        *args: Any,
        lora_config: dict[str, Any] | LoraConfig | None = None,
        lora_plan: dict[str, Any] | AdapterPlan | None = None,
        eva_report: dict[str, Any] | EvaReport | None = None,
        eva_pending: bool = False,
        **kwargs: Any,
    ) -> None:
        # _build (called from the SB3 constructor) needs these, so they are set before nn.Module.__init__.
        object.__setattr__(self, "lora_config", LoraConfig.from_dict(lora_config or {}))
        object.__setattr__(self, "lora_plan", None if lora_plan is None else AdapterPlan.from_dict(lora_plan))
        object.__setattr__(self, "eva_report", None if eva_report is None else EvaReport.from_dict(eva_report))
        object.__setattr__(self, "eva_pending", bool(eva_pending))
        super().__init__(*args, **kwargs)

    def _build(self, lr_schedule: Schedule) -> None:
        super()._build(lr_schedule)  # type: ignore[misc]
        if self.lora_plan is None:
            exclude = excluded_layers(self, self.lora_config)  # type: ignore[arg-type]
            object.__setattr__(self, "lora_plan", AdapterPlan.resolve(self, self.lora_config, exclude=exclude))  # type: ignore[arg-type]
        inject_adapters(self, self.lora_plan)  # type: ignore[arg-type]
        self._mirror_into_targets()
        self._set_trainable()
        self._make_optimizers(lr_schedule)
        self._cache_acting_weights()

    def _cache_acting_weights(self) -> None:
        """The online networks' LoRA layers keep their adapted weight ``W + s B A`` between calls made without
        gradients (acting, evaluating, PPO's value estimates), so SAC, TD3 and DQN, which act one env step at a time,
        compute it once per update instead of once per step. It is computed again whenever one of its parameters
        changes in place (an optimizer step, ``load_state_dict``), is replaced (``.to(device)``) or the scaling
        changes. Target networks never keep one: SB3's Polyak update writes them through ``.data``, which PyTorch
        does not count as a change (:func:`~eva_rl.layers.cached_adapter_weights`)."""
        keep_adapted_weights(self.lora_layers.values())

    def _mirror_into_targets(self) -> None:
        """Give each target network the adapters of its online network, then make it a copy of it."""
        for online_name, target_name in target_pairs(self):  # type: ignore[arg-type]
            online, target = getattr(self, online_name), getattr(self, target_name)
            for name, layer in lora_layers(online).items():
                base = target.get_submodule(name)
                if isinstance(base, LoraLayer):
                    continue  # shared with another target network (TD3's shared extractor): wrapped already
                dropout = self.lora_plan.dropout
                wrapped = lora_layer_type(base)(base, layer.r, layer.alpha, dropout, layer.use_dora, layer.use_rslora)
                set_submodule(target, name, wrapped)
        sync_target_networks(self)  # type: ignore[arg-type]

    def _set_trainable(self) -> None:
        """Freeze Linear/Conv2d weights (and biases unless ``train_bias``) and every target network; adapters (A
        unless ``train_A`` is off) and any other parameter (``log_std``, normalization layers) stay trainable;
        ``train_heads`` unfreezes the heads."""
        config = self.lora_config
        for module in self.modules():  # type: ignore[attr-defined]
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.weight.requires_grad_(False)
                if module.bias is not None:
                    module.bias.requires_grad_(config.train_bias)
        if config.train_heads:
            for head in head_names(self):  # type: ignore[arg-type]
                self.get_submodule(head).requires_grad_(True)  # type: ignore[attr-defined]
        if not config.train_A:
            for layer in lora_layers(self).values():  # type: ignore[arg-type]
                layer.lora_A.requires_grad_(False)
        for _, target in target_pairs(self):  # type: ignore[arg-type]
            getattr(self, target).requires_grad_(False)

    def _make_optimizers(self, lr_schedule: Schedule) -> None:
        """Rebuild the optimizers ``_build`` made, over the trainable parameters only (one for actor-critic)."""
        self.optimizer = self._optimizer(self.trainable_parameters(), lr_schedule)

    def _optimizer(self, parameters: list[nn.Parameter], lr_schedule: Schedule) -> Any:
        return self.optimizer_class(parameters, lr=lr_schedule(1), **self.optimizer_kwargs)  # type: ignore[attr-defined]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates, in ``named_parameters`` order."""
        return [p for p in self.parameters() if p.requires_grad]  # type: ignore[attr-defined]

    @property
    def lora_layers(self) -> dict[str, LoraLayer]:
        """The LoRA layers of the online networks by name (the plan's layers; targets mirror them)."""
        targets = tuple(f"{target}." for _, target in target_pairs(self))  # type: ignore[arg-type]
        return {name: layer for name, layer in lora_layers(self).items() if not name.startswith(targets)}  # type: ignore[arg-type]

    def sync_targets(self) -> None:
        """Copy every online network into its target (after the adapters were initialized)."""
        sync_target_networks(self)  # type: ignore[arg-type]

    @property
    def lora_ranks(self) -> dict[str, int]:
        """``{layer: rank}`` of the adapters present."""
        return {name: layer.r for name, layer in self.lora_layers.items()}

    def check_trainable(self) -> None:
        """:raises CheckpointError: if the adapters are EVA placeholders with no EVA session to finish them (a policy
        saved before EVA on PPO's rollouts finished): training them would be plain LoRA, silently."""
        if self.eva_pending:
            raise CheckpointError(
                "this policy was saved before EVA on PPO's rollouts finished: its adapters are placeholders and EVA's "
                "data was not saved, so training would be plain LoRA; adapt the pretrained agent again, or save the "
                "model once its eva_pending is False"
            )

    def set_training_mode(self, mode: bool) -> None:
        if mode:
            self.check_trainable()  # every SB3 algorithm's train() starts here
        super().set_training_mode(mode)  # type: ignore[misc]

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()  # type: ignore[misc]
        data.update(lora_policy_kwargs(self.lora_config, self.lora_plan, self.eva_report, eva_pending=self.eva_pending))
        return data


class LoraActorCriticPolicy(LoraPolicyMixin, ActorCriticPolicy):
    """``MlpPolicy`` with LoRA adapters."""


class LoraActorCriticCnnPolicy(LoraPolicyMixin, ActorCriticCnnPolicy):
    """``CnnPolicy`` with LoRA adapters."""


class LoraMultiInputActorCriticPolicy(LoraPolicyMixin, MultiInputActorCriticPolicy):
    """``MultiInputPolicy`` (Dict observations) with LoRA adapters."""


class _LoraSACMixin(LoraPolicyMixin):
    def _make_optimizers(self, lr_schedule: Schedule) -> None:
        actor, critic = self.actor, self.critic  # type: ignore[attr-defined]
        actor.optimizer = self._optimizer([p for p in actor.parameters() if p.requires_grad], lr_schedule)
        # As SB3: a features extractor shared with the actor is trained by the actor loss only.
        shared = self.share_features_extractor  # type: ignore[attr-defined]
        critic_parameters = [
            p for n, p in critic.named_parameters() if p.requires_grad and not (shared and "features_extractor" in n)
        ]
        critic.optimizer = self._optimizer(critic_parameters, lr_schedule)


class _LoraTD3Mixin(LoraPolicyMixin):
    def _make_optimizers(self, lr_schedule: Schedule) -> None:
        for network in (self.actor, self.critic):  # type: ignore[attr-defined]
            network.optimizer = self._optimizer([p for p in network.parameters() if p.requires_grad], lr_schedule)


class _LoraDQNMixin(LoraPolicyMixin):
    def _make_optimizers(self, lr_schedule: Schedule) -> None:
        parameters = [p for p in self.q_net.parameters() if p.requires_grad]  # type: ignore[attr-defined]
        self.optimizer = self._optimizer(parameters, lr_schedule)


class LoraSACPolicy(_LoraSACMixin, SACPolicy):
    """SAC's ``MlpPolicy`` with LoRA adapters on the actor and the critics (mirrored into the critic target)."""


class LoraSACCnnPolicy(_LoraSACMixin, SACCnnPolicy):
    """SAC's ``CnnPolicy`` with LoRA adapters."""


class LoraSACMultiInputPolicy(_LoraSACMixin, SACMultiInputPolicy):
    """SAC's ``MultiInputPolicy`` with LoRA adapters."""


class LoraTD3Policy(_LoraTD3Mixin, TD3Policy):
    """TD3's ``MlpPolicy`` with LoRA adapters on the actor and the critics (mirrored into both targets)."""


class LoraTD3CnnPolicy(_LoraTD3Mixin, TD3CnnPolicy):
    """TD3's ``CnnPolicy`` with LoRA adapters."""


class LoraTD3MultiInputPolicy(_LoraTD3Mixin, TD3MultiInputPolicy):
    """TD3's ``MultiInputPolicy`` with LoRA adapters."""


class LoraDQNPolicy(_LoraDQNMixin, DQNPolicy):
    """DQN's ``MlpPolicy`` with LoRA adapters on the Q-network (mirrored into its target)."""


class LoraDQNCnnPolicy(_LoraDQNMixin, DQNCnnPolicy):
    """DQN's ``CnnPolicy`` with LoRA adapters."""


class LoraDQNMultiInputPolicy(_LoraDQNMixin, DQNMultiInputPolicy):
    """DQN's ``MultiInputPolicy`` with LoRA adapters."""


LORA_POLICY_FOR: dict[type[BasePolicy], type[BasePolicy]] = {
    ActorCriticPolicy: LoraActorCriticPolicy,
    ActorCriticCnnPolicy: LoraActorCriticCnnPolicy,
    MultiInputActorCriticPolicy: LoraMultiInputActorCriticPolicy,
    SACPolicy: LoraSACPolicy,
    SACCnnPolicy: LoraSACCnnPolicy,
    SACMultiInputPolicy: LoraSACMultiInputPolicy,
    TD3Policy: LoraTD3Policy,
    TD3CnnPolicy: LoraTD3CnnPolicy,
    TD3MultiInputPolicy: LoraTD3MultiInputPolicy,
    DQNPolicy: LoraDQNPolicy,
    DQNCnnPolicy: LoraDQNCnnPolicy,
    DQNMultiInputPolicy: LoraDQNMultiInputPolicy,
}
"""The LoRA counterpart of each SB3 policy class."""

PLAIN_POLICY_FOR: dict[type[BasePolicy], type[BasePolicy]] = {v: k for k, v in LORA_POLICY_FOR.items()}
"""The SB3 policy class each LoRA policy class adapts (what :func:`~eva_rl.adapt.merge` folds back into)."""


def lora_policy_class(plain: type) -> type:
    """The LoRA counterpart of the SB3 policy class ``plain``.

    :raises AgentError: for a policy that already has adapters, or a class without a LoRA counterpart.
    """
    if issubclass(plain, LoraPolicyMixin):
        raise AgentError("the model already has LoRA adapters; eva_rl.merge(model) it first to adapt it again")
    if plain not in LORA_POLICY_FOR:
        supported = ", ".join(c.__name__ for c in LORA_POLICY_FOR)
        raise AgentError(f"policy class {plain.__name__} is not supported; expected one of: {supported}")
    return LORA_POLICY_FOR[plain]


def lora_policy_kwargs(
    lora: LoraConfig,
    plan: AdapterPlan | None,
    report: EvaReport | None,
    base: dict[str, Any] | None = None,
    eva_pending: bool = False,
) -> dict[str, Any]:
    """The ``policy_kwargs`` of a LoRA policy: ``base`` (a plain policy's kwargs) plus the config, plan and report
    (and ``eva_pending`` while it holds), in the plain-``dict`` form SB3 stores in the zip."""
    kwargs = plain_policy_kwargs(base or {})
    kwargs.update(
        lora_config=lora.to_dict(),
        lora_plan=None if plan is None else plan.to_dict(),
        eva_report=None if report is None else report.to_dict(),
    )
    if eva_pending:
        kwargs["eva_pending"] = True
    return kwargs


def plain_policy_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` without the entries only a LoRA policy takes."""
    return {key: value for key, value in kwargs.items() if key not in LORA_POLICY_KWARGS}
