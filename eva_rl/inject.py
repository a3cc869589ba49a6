"""Wrap the layers of an adapter plan in LoRA layers, remove the wrappers again, and run a model without them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from eva_rl.config import LoraConfig
from eva_rl.errors import ConfigError
from eva_rl.layers import LoraLayer, lora_layer_type
from eva_rl.plan import AdapterPlan, find_target_layers

__all__ = [
    "disable_adapters",
    "find_target_layers",
    "inject_adapters",
    "lora_layers",
    "merged_state_dict",
    "remove_adapters",
]


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule ``name`` of ``root`` by ``new``."""
    parent_name, _, child_name = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child_name, new)


def inject_adapters(
    module: nn.Module, plan: AdapterPlan | LoraConfig, exclude: Iterable[str] = ()
) -> dict[str, LoraLayer]:
    """Wrap the planned layers of ``module`` in LoRA layers, in place; rank-0 layers are left as they are.

    :param plan: An :class:`~eva_rl.plan.AdapterPlan`, or a :class:`~eva_rl.config.LoraConfig` to resolve into one.
    :param exclude: With a ``LoraConfig``: layer names never targeted.
    :return: The new LoRA layers by name.
    :raises ConfigError: if a pattern matches nothing, a rank exceeds a layer's width, or the plan does not fit.
    """
    if isinstance(plan, LoraConfig):
        plan = AdapterPlan.resolve(module, plan, exclude=exclude)
    plan.check_fits(module)
    wrapped: dict[str, LoraLayer] = {}
    for name, layer_plan in plan.adapted.items():
        layer = module.get_submodule(name)
        if isinstance(layer, LoraLayer):
            raise ConfigError(f"layer {name!r} already has a LoRA adapter; remove_adapters() first")
        lora = lora_layer_type(layer)(
            layer, layer_plan.rank, layer_plan.alpha, plan.dropout, plan.use_dora, plan.use_rslora
        )
        set_submodule(module, name, lora)
        wrapped[name] = lora
    return wrapped


def lora_layers(module: nn.Module) -> dict[str, LoraLayer]:
    """Every LoRA layer of ``module`` by qualified name."""
    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


def remove_adapters(module: nn.Module, merge: bool = False) -> nn.Module:
    """Replace every LoRA layer of ``module`` by its base layer, in place.

    :param merge: Fold each adapter into its base weight first; otherwise the adapters are discarded.
    :return: ``module``.
    """
    for name, layer in lora_layers(module).items():
        if merge:
            layer.merge()
        elif layer.merged:
            layer.unmerge()
        set_submodule(module, name, layer.base_layer)
    return module


@torch.no_grad()
def merged_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict ``module`` would have with every adapter folded into its base layer and removed.

    Keys are those of the plain model (``x.weight``, not ``x.base_layer.weight``); ``module`` is not modified.
    Aliased submodules (SB3's ``pi_features_extractor`` and ``features_extractor``) are handled under every name.
    """
    state = {
        key.replace(".base_layer.", "."): value
        for key, value in module.state_dict().items()
        if not key.rpartition(".")[2].startswith("lora_")
    }
    for name, layer in module.named_modules(remove_duplicate=False):
        if isinstance(layer, LoraLayer) and not layer.merged:
            key = f"{name}.weight" if name else "weight"
            state[key] = layer.adapted_weight().to(layer.base_layer.weight.dtype)
    return state


@contextmanager
def disable_adapters(module: nn.Module) -> Iterator[None]:
    """Run ``module`` as its base model: every LoRA layer skips its adapter inside the block.

    Merged layers are unmerged for the duration of the block and merged again afterwards.
    """
    layers = list(lora_layers(module).values())
    previous = [(layer.disabled, layer.merged) for layer in layers]
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    try:
        yield
    finally:
        for layer, (disabled, merged) in zip(layers, previous):
            layer.disabled = disabled
            if merged:
                layer.merge()
