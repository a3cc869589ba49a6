"""Find target layers by name pattern, wrap them in LoRA layers, and remove the wrappers again."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import nn

from eva_rl.config import LoraConfig
from eva_rl.layers import LORA_LAYER_TYPES, LoraLayer

T = TypeVar("T")

ADAPTABLE_TYPES: tuple[type[nn.Module], ...] = tuple(LORA_LAYER_TYPES)


def adaptable_layers(module: nn.Module) -> dict[str, nn.Module]:
    """Every Linear/Conv2d layer (or existing LoRA wrapper) of ``module``, by qualified name.

    Layers inside a LoRA wrapper (its ``base_layer``) are reported under the wrapper's name.
    """
    found: dict[str, nn.Module] = {}
    for name, child in module.named_modules():
        if any(name.startswith(wrapped + ".") for wrapped in found if isinstance(found[wrapped], LoraLayer)):
            continue
        if isinstance(child, (LoraLayer, *ADAPTABLE_TYPES)):
            found[name] = child
    return found


def _matches(pattern: str, name: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def pattern_value(patterns: Mapping[str, T], name: str, default: T) -> T:
    """Value of the first key of ``patterns`` that matches ``name`` (exact name first), else ``default``.

    A key matches when it equals the name, is a ``.``-separated suffix of it, or is a regex matching it whole.
    """
    if name in patterns:
        return patterns[name]
    for pattern, value in patterns.items():
        if _matches(pattern, name):
            return value
    return default


def find_target_layers(
    module: nn.Module, target_modules: Iterable[str] | str | None, exclude: Iterable[str] = ()
) -> dict[str, nn.Module]:
    """Select the Linear/Conv2d layers of ``module`` named by ``target_modules``.

    :param module: The model to search.
    :param target_modules: ``None`` for all adaptable layers, a list of names/suffixes, or one regex string.
    :param exclude: Names (or suffixes) never to select, e.g. heads that are trained fully.
    :return: ``{qualified name: layer}`` in module order.
    :raises ValueError: if a pattern matches no adaptable layer.
    """
    layers = adaptable_layers(module)
    exclude = list(exclude)
    candidates = {n: m for n, m in layers.items() if not any(_matches(e, n) for e in exclude)}
    if target_modules is None:
        selected = candidates
    elif isinstance(target_modules, str):
        selected = {n: m for n, m in candidates.items() if re.fullmatch(target_modules, n)}
        if not selected:
            raise ValueError(
                f"target_modules={target_modules!r} matches no Linear/Conv2d layer; available: {list(candidates)}"
            )
    else:
        patterns = list(target_modules)
        for pattern in patterns:
            if not any(n == pattern or n.endswith("." + pattern) for n in candidates):
                raise ValueError(
                    f"target_modules entry {pattern!r} matches no Linear/Conv2d layer; available: {list(candidates)}"
                )
        selected = {n: m for n, m in candidates.items() if any(n == p or n.endswith("." + p) for p in patterns)}
    if not selected:
        raise ValueError(f"no Linear/Conv2d layer to adapt in {type(module).__name__} (excluded: {exclude})")
    return selected


def layer_fan_in(layer: nn.Module) -> int:
    """Input features per output of a Linear/Conv2d layer (``in_features`` or ``C*kh*kw``)."""
    base = layer.base_layer if isinstance(layer, LoraLayer) else layer
    return int(base.weight[0].numel())


def resolve_ranks(module: nn.Module, config: LoraConfig, exclude: Iterable[str] = ()) -> dict[str, tuple[int, float]]:
    """``{layer name: (rank, alpha)}`` for every target layer of ``module`` under ``config`` (rank may be 0).

    :raises ValueError: if a pattern matches nothing or a rank exceeds its layer's width (fan-in).
    """
    resolved = {}
    for name, layer in find_target_layers(module, config.target_modules, exclude).items():
        rank = pattern_value(config.rank_pattern, name, config.r)
        fan_in = layer_fan_in(layer)
        if rank > fan_in:
            raise ValueError(
                f"LoRA rank {rank} for layer {name!r} exceeds its width (fan-in {fan_in}); "
                f"use r <= {fan_in} or set rank_pattern[{name!r}] to at most {fan_in}"
            )
        resolved[name] = (rank, float(pattern_value(config.alpha_pattern, name, config.default_alpha)))
    return resolved


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child_name, new)


def inject_adapters(module: nn.Module, config: LoraConfig, exclude: Iterable[str] = ()) -> dict[str, LoraLayer]:
    """Wrap the target layers of ``module`` in LoRA layers, in place.

    Layers whose rank (``config.rank_pattern`` or ``config.r``) is 0 are left as they are.

    :return: The new LoRA layers by name.
    :raises ValueError: if a pattern matches nothing or a rank exceeds the layer's width.
    """
    wrapped: dict[str, LoraLayer] = {}
    for name, (rank, alpha) in resolve_ranks(module, config, exclude).items():
        layer = module.get_submodule(name)
        if isinstance(layer, LoraLayer):
            raise ValueError(f"layer {name!r} already has a LoRA adapter; remove_adapters() first")
        if rank == 0:
            continue
        lora = LORA_LAYER_TYPES[type(layer)](layer, rank, alpha, config.dropout, config.use_dora)
        _set_submodule(module, name, lora)
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
        _set_submodule(module, name, layer.base_layer)
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
