"""SB3 actor-critic policies with LoRA adapters, built in the constructor so that ``PPO.load`` rebuilds them.

SB3 creates the optimizer inside ``_build`` over ``self.parameters()`` and runs ``ortho_init`` there too. These
classes let ``_build`` finish (ortho init included), then wrap the target layers, freeze the base weights and
rebuild the optimizer over the trainable parameters only, in a fixed order, so the optimizer state saved by
``PPO.save`` loads back strictly. The LoRA config (with the per-layer ranks EVA chose) and the EVA report are
constructor arguments, so they travel in ``policy_kwargs`` inside the zip.

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
from eva_rl.inject import inject_adapters, lora_layers
from eva_rl.layers import LoraLayer

HEADS = ("action_net", "value_net")


class LoraPolicyMixin:
    """Adds LoRA adapters to an SB3 ``ActorCriticPolicy`` subclass.

    :param lora_config: A :class:`~eva_rl.config.LoraConfig` or its ``to_dict()`` form.
    :param eva_report: The EVA report (ranks, ratios, batches, env steps, seconds), kept with the policy.
    """

    lora_config: LoraConfig
    eva_report: dict[str, Any] | None

    def __init__(
        self,
        *args: Any,
        lora_config: dict[str, Any] | LoraConfig | None = None,
        eva_report: dict | None = None,
        **kwargs: Any,
    ) -> None:
        # _build (called from the SB3 constructor) needs the config, so it is set before nn.Module.__init__.
        object.__setattr__(self, "lora_config", LoraConfig.from_dict(lora_config or {}))
        object.__setattr__(self, "eva_report", eva_report)
        super().__init__(*args, **kwargs)

    def _build(self, lr_schedule: Schedule) -> None:
        super()._build(lr_schedule)  # type: ignore[misc]
        exclude = HEADS if self.lora_config.train_heads else ()
        inject_adapters(self, self.lora_config, exclude=exclude)  # type: ignore[arg-type]
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
        data.update(lora_config=self.lora_config.to_dict(), eva_report=self.eva_report)
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
