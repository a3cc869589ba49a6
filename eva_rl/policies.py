"""SB3 actor-critic policies with LoRA adapters, built in the constructor so that ``PPO.load`` rebuilds them.

SB3 creates the optimizer inside ``_build`` over ``self.parameters()`` and runs ``ortho_init`` there too. These
classes let ``_build`` finish (ortho init included), then wrap the target layers, freeze the base weights and
rebuild the optimizer over the trainable parameters only, in a fixed order, so the optimizer state saved by
``PPO.save`` loads back strictly. The LoRA config, the adapter plan (per-layer ranks, EVA's included) and the EVA
report are constructor arguments, so they travel in ``policy_kwargs`` inside the zip.

Keep this module path and these class names stable: SB3 pickles the policy class by reference.
"""

from __future__ import annotations

from typing import Any

from stable_baselines3.common.policies import (
    ActorCriticCnnPolicy,
    ActorCriticPolicy,
    MultiInputActorCriticPolicy,
)
from stable_baselines3.common.type_aliases import Schedule
from torch import nn

from eva_rl.config import LoraConfig
from eva_rl.errors import AgentError
from eva_rl.eva_report import EvaReport
from eva_rl.inject import inject_adapters, lora_layers
from eva_rl.layers import LoraLayer
from eva_rl.plan import AdapterPlan

HEADS = ("action_net", "value_net")
LORA_POLICY_KWARGS = ("lora_config", "lora_plan", "eva_report")
"""The ``policy_kwargs`` a LoRA policy adds to its plain counterpart's."""


def excluded_layers(lora: LoraConfig) -> tuple[str, ...]:
    """Layers that never get adapters under ``lora``: the heads when they train fully."""
    return HEADS if lora.train_heads else ()


class LoraPolicyMixin:
    """Adds LoRA adapters to an SB3 ``ActorCriticPolicy`` subclass.

    :param lora_config: A :class:`~eva_rl.config.LoraConfig` or its ``to_dict()`` form.
    :param lora_plan: The :class:`~eva_rl.plan.AdapterPlan` (or its ``to_dict()`` form) to build the adapters from;
        ``None`` resolves one from ``lora_config`` (a policy built by hand, or a zip saved before plans existed).
    :param eva_report: The :class:`~eva_rl.eva_report.EvaReport` (or its dict form), kept with the policy.
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
        **kwargs: Any,
    ) -> None:
        # _build (called from the SB3 constructor) needs these, so they are set before nn.Module.__init__.
        object.__setattr__(self, "lora_config", LoraConfig.from_dict(lora_config or {}))
        object.__setattr__(self, "lora_plan", None if lora_plan is None else AdapterPlan.from_dict(lora_plan))
        object.__setattr__(self, "eva_report", None if eva_report is None else EvaReport.from_dict(eva_report))
        super().__init__(*args, **kwargs)

    def _build(self, lr_schedule: Schedule) -> None:
        super()._build(lr_schedule)  # type: ignore[misc]
        if self.lora_plan is None:
            plan = AdapterPlan.resolve(self, self.lora_config, exclude=excluded_layers(self.lora_config))  # type: ignore[arg-type]
            object.__setattr__(self, "lora_plan", plan)
        inject_adapters(self, self.lora_plan)  # type: ignore[arg-type]
        self._set_trainable()
        self.optimizer = self.optimizer_class(  # type: ignore[attr-defined]
            self.trainable_parameters(),
            lr=lr_schedule(1),
            **self.optimizer_kwargs,  # type: ignore[attr-defined]
        )

    def _set_trainable(self) -> None:
        """Freeze Linear/Conv2d weights (and biases unless ``train_bias``); adapters and any other parameter
        (``log_std``, normalization layers) stay trainable; ``train_heads`` unfreezes the heads."""
        config = self.lora_config
        for module in self.modules():  # type: ignore[attr-defined]
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.weight.requires_grad_(False)
                if module.bias is not None:
                    module.bias.requires_grad_(config.train_bias)
        if config.train_heads:
            for head in HEADS:
                getattr(self, head).requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates, in ``named_parameters`` order."""
        return [p for p in self.parameters() if p.requires_grad]  # type: ignore[attr-defined]

    @property
    def lora_layers(self) -> dict[str, LoraLayer]:
        """The LoRA layers by name."""
        return lora_layers(self)  # type: ignore[arg-type]

    @property
    def lora_ranks(self) -> dict[str, int]:
        """``{layer: rank}`` of the adapters present."""
        return {name: layer.r for name, layer in self.lora_layers.items()}

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()  # type: ignore[misc]
        data.update(lora_policy_kwargs(self.lora_config, self.lora_plan, self.eva_report))
        return data


class LoraActorCriticPolicy(LoraPolicyMixin, ActorCriticPolicy):
    """``MlpPolicy`` with LoRA adapters."""


class LoraActorCriticCnnPolicy(LoraPolicyMixin, ActorCriticCnnPolicy):
    """``CnnPolicy`` with LoRA adapters."""


class LoraMultiInputActorCriticPolicy(LoraPolicyMixin, MultiInputActorCriticPolicy):
    """``MultiInputPolicy`` (Dict observations) with LoRA adapters."""


LORA_POLICY_FOR: dict[type[ActorCriticPolicy], type[ActorCriticPolicy]] = {
    ActorCriticPolicy: LoraActorCriticPolicy,
    ActorCriticCnnPolicy: LoraActorCriticCnnPolicy,
    MultiInputActorCriticPolicy: LoraMultiInputActorCriticPolicy,
}
"""The LoRA counterpart of each SB3 actor-critic policy class."""

PLAIN_POLICY_FOR: dict[type[ActorCriticPolicy], type[ActorCriticPolicy]] = {v: k for k, v in LORA_POLICY_FOR.items()}


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
    lora: LoraConfig, plan: AdapterPlan | None, report: EvaReport | None, base: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``policy_kwargs`` of a LoRA policy: ``base`` (a plain policy's kwargs) plus the config, plan and report,
    in the plain-``dict`` form SB3 stores in the zip."""
    kwargs = plain_policy_kwargs(base or {})
    kwargs.update(
        lora_config=lora.to_dict(),
        lora_plan=None if plan is None else plan.to_dict(),
        eva_report=None if report is None else report.to_dict(),
    )
    return kwargs


def plain_policy_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` without the entries only a LoRA policy takes."""
    return {key: value for key, value in kwargs.items() if key not in LORA_POLICY_KWARGS}
