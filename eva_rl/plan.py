"""The adapter plan: which layers get adapters, and each one's rank, alpha, fan-in and EVA components.

A :class:`~eva_rl.config.LoraConfig` says what the user wants in patterns (``target_modules``, ``rank_pattern``,
``alpha_pattern``); :meth:`AdapterPlan.resolve` turns it into one entry per layer of a concrete module, once. Every
later step (EVA, injection, the adapted policy, checkpoints) reads the plan instead of matching patterns again, and
the plan travels with the policy (``policy_kwargs["lora_plan"]``) so that ``PPO.load`` rebuilds the same adapters.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from eva_rl.config import EvaConfig, LoraConfig, _is_int, _is_number
from eva_rl.errors import ConfigError
from eva_rl.layers import LORA_LAYER_TYPES, LoraLayer, weight_fan_in

T = TypeVar("T")

ADAPTABLE_TYPES: tuple[type[nn.Module], ...] = tuple(LORA_LAYER_TYPES)


def weight_only_layers(module: nn.Module) -> list[str]:
    """Linear layers of ``module`` whose parent reads their weights instead of calling them: a LoRA wrapper there
    would never run (``nn.MultiheadAttention`` passes ``out_proj.weight`` to its functional forward)."""
    return [
        f"{name}.{child_name}" if name else child_name
        for name, parent in module.named_modules()
        if isinstance(parent, nn.MultiheadAttention)
        for child_name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]


def adaptable_layers(module: nn.Module) -> dict[str, nn.Module]:
    """Every Linear/Conv2d layer (or existing LoRA wrapper) of ``module``, by qualified name; not the
    :func:`weight_only_layers`.

    Layers inside a LoRA wrapper (its ``base_layer``) are reported under the wrapper's name.
    """
    found: dict[str, nn.Module] = {}
    weight_only = set(weight_only_layers(module))
    for name, child in module.named_modules():
        if any(name.startswith(wrapped + ".") for wrapped in found if isinstance(found[wrapped], LoraLayer)):
            continue
        if isinstance(child, (LoraLayer, *ADAPTABLE_TYPES)) and name not in weight_only:
            found[name] = child
    return found


def _unmatched(pattern: str, module: nn.Module, candidates: Iterable[str], regex: bool = False) -> ConfigError:
    """The error for a ``target_modules`` entry (or ``regex``) that names no adaptable layer, saying so when it names
    a layer whose weights its parent reads directly."""
    names = weight_only_layers(module)
    weight_only = [n for n in names if (re.fullmatch(pattern, n) if regex else _matches(pattern, n))]
    if weight_only:
        return ConfigError(
            f"target_modules entry {pattern!r} names {weight_only}: a MultiheadAttention reads these layers' weights "
            "instead of calling them, so LoRA cannot wrap them; leave them out (the attention's other Linear layers "
            "and the layers around it can be adapted)"
        )
    return ConfigError(
        f"target_modules entry {pattern!r} matches no Linear/Conv2d layer; available: {list(candidates)}"
    )


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
    :raises ConfigError: if a pattern matches no adaptable layer.
    """
    layers = adaptable_layers(module)
    exclude = list(exclude)
    candidates = {n: m for n, m in layers.items() if not any(_matches(e, n) for e in exclude)}
    if target_modules is None:
        selected = candidates
    elif isinstance(target_modules, str):
        selected = {n: m for n, m in candidates.items() if re.fullmatch(target_modules, n)}
        if not selected:
            raise _unmatched(target_modules, module, candidates, regex=True)
    else:
        patterns = list(target_modules)
        for pattern in patterns:
            if not any(n == pattern or n.endswith("." + pattern) for n in candidates):
                raise _unmatched(pattern, module, candidates)
        selected = {n: m for n, m in candidates.items() if any(n == p or n.endswith("." + p) for p in patterns)}
    if not selected:
        raise ConfigError(f"no Linear/Conv2d layer to adapt in {type(module).__name__} (excluded: {exclude})")
    return selected


def base_weight(layer: nn.Module) -> nn.Parameter:
    """The weight of a Linear/Conv2d layer, or of the base layer a LoRA wrapper adapts."""
    return (layer.base_layer if isinstance(layer, LoraLayer) else layer).weight


def layer_fan_in(layer: nn.Module) -> int:
    """Input features per output of a Linear/Conv2d layer (``in_features`` or ``C*kh*kw``)."""
    return weight_fan_in(base_weight(layer))


def _check_supported(name: str, layer: nn.Module) -> None:
    """:raises ConfigError: for a Conv2d LoRA cannot wrap exactly (grouped, or padded other than with zeros), before
    EVA analyses it with the wrong features."""
    base = layer.base_layer if isinstance(layer, LoraLayer) else layer
    if isinstance(base, nn.Conv2d) and (base.groups != 1 or base.padding_mode != "zeros"):
        raise ConfigError(
            f"layer {name!r} is a Conv2d with groups={base.groups}, padding_mode={base.padding_mode!r}: LoRA here "
            "needs groups=1 and zero padding; leave it out with target_modules"
        )


@dataclass(frozen=True)
class LayerPlan:
    """One target layer's adapter.

    :param rank: Adapter rank; 0 means the layer keeps no adapter.
    :param alpha: Scaling numerator (the adapter output is multiplied by ``alpha / rank``).
    :param fan_in: Input features per output unit (``in_features``, or ``C*kh*kw`` for a Conv2d).
    :param out_features: Output units (``out_features`` or ``out_channels``).
    :param eva_cap: The most rank EVA may give this layer: ``round(rank * rho)``, at most the fan-in (0 without EVA).
    :param eva_components: Principal components EVA tracks here: ``eva_cap`` plus ``extra_components``, at most
        the fan-in (0 without EVA).
    """

    rank: int
    alpha: float
    fan_in: int
    out_features: int
    eva_cap: int = 0
    eva_components: int = 0

    def __post_init__(self) -> None:
        # A plan read from a file is what allocates the adapters: a rank of 1e9 would try to allocate it.
        for name in ("fan_in", "out_features"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: expected an integer >= 1")
        for name in ("rank", "eva_cap", "eva_components"):
            value = getattr(self, name)
            if not _is_int(value) or not 0 <= value <= self.fan_in:
                raise ConfigError(
                    f"{name}={value!r} is invalid: expected an integer in [0, fan_in={self.fan_in}] (the layer's width)"
                )
        if not _is_number(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"alpha={self.alpha!r} is invalid: expected a finite number > 0")

    @property
    def weight_rank(self) -> int:
        """The largest rank a factorization of the weight has: ``min(out_features, fan_in)``."""
        return min(self.out_features, self.fan_in)


@dataclass(frozen=True)
class AdapterPlan:
    """Every target layer's :class:`LayerPlan`, plus what applies to all of them.

    :param layers: ``{qualified layer name: plan}`` in module order, rank-0 layers included.
    :param exclude: Layer names that were never targets (heads trained fully).
    :param dropout: Dropout on the adapter input.
    :param use_dora: DoRA's magnitude on every adapter.
    :param method: The fine-tuning method the plan was made for (see :mod:`eva_rl.methods`), if any.
    :param use_rslora: rsLoRA's scaling ``alpha / sqrt(r)`` on every adapter.
    """

    layers: dict[str, LayerPlan]
    exclude: tuple[str, ...] = ()
    dropout: float = 0.0
    use_dora: bool = False
    method: str | None = None
    use_rslora: bool = False

    @classmethod
    def resolve(
        cls,
        module: nn.Module,
        lora: LoraConfig,
        eva: EvaConfig | None = None,
        exclude: Iterable[str] = (),
        method: str | None = None,
        cap_at_weight_rank: bool = False,
    ) -> AdapterPlan:
        """Match ``lora``'s patterns against ``module`` once and fix every target layer's rank and alpha.

        :param module: The model to adapt (its layers may already be LoRA wrappers; their base layers count).
        :param lora: Targets, ranks and alphas.
        :param eva: EVA's settings, for the components it tracks per layer; ``None`` when EVA does not run.
        :param exclude: Layer names (or suffixes) never targeted.
        :param method: Recorded in the plan.
        :param cap_at_weight_rank: The method factors ``W`` itself (PiSSA, OLoRA): a layer can use at most
            ``min(out, fan_in)`` rank instead of its fan-in.
        :raises ConfigError: if a pattern matches nothing.

        A rank larger than a layer can use (its fan-in, or ``min(out, fan_in)`` with ``cap_at_weight_rank``) is
        capped there, keeping ``alpha / r``, with one warning that names every capped layer; so the default rank
        works on narrow inputs (Pendulum's 3 observation features).
        """
        layers: dict[str, LayerPlan] = {}
        capped, eva_clipped = [], []
        for name, layer in find_target_layers(module, lora.target_modules, exclude).items():
            _check_supported(name, layer)
            weight = base_weight(layer)
            fan_in, out_features = layer_fan_in(layer), int(weight.shape[0])
            rank = pattern_value(lora.rank_pattern, name, lora.r)
            alpha = float(pattern_value(lora.alpha_pattern, name, lora.default_alpha))
            limit = min(out_features, fan_in) if cap_at_weight_rank else fan_in
            if rank > limit:
                capped.append(f"{name} ({rank} -> {limit})")
                rank, alpha = limit, alpha * limit / rank
            eva_cap = eva_components = 0
            if eva is not None and rank > 0:
                eva_cap = round(rank * eva.rho)
                if eva_cap > fan_in:
                    if rank < fan_in:  # a layer already at its width was named above; EVA cannot give it more
                        eva_clipped.append(f"{name} ({eva_cap} -> {fan_in})")
                    eva_cap = fan_in
                eva_components = min(eva_cap + eva.extra_components, fan_in)
            layers[name] = LayerPlan(rank, alpha, fan_in, out_features, eva_cap, eva_components)
        if capped:
            width = "min(out, fan_in)" if cap_at_weight_rank else "the layer's width (fan-in)"
            warnings.warn(f"{method or 'LoRA'}: rank capped at {width} for {', '.join(capped)}", stacklevel=2)
        if eva_clipped:
            warnings.warn(
                f"EVA: round(r*rho) exceeds the fan-in of {', '.join(eva_clipped)}; tracking the fan-in there",
                stacklevel=2,
            )
        return cls(layers, tuple(exclude), lora.dropout, lora.use_dora, method, lora.use_rslora)

    @property
    def ranks(self) -> dict[str, int]:
        """``{layer: rank}``, rank-0 layers included."""
        return {name: layer.rank for name, layer in self.layers.items()}

    @property
    def adapted(self) -> dict[str, LayerPlan]:
        """The layers that get an adapter (rank > 0)."""
        return {name: layer for name, layer in self.layers.items() if layer.rank > 0}

    @property
    def budget(self) -> int:
        """The rank budget EVA redistributes: the sum of the adapted layers' ranks."""
        return sum(layer.rank for layer in self.layers.values())

    @property
    def eva_components(self) -> int:
        """The most components EVA tracks at any layer (a batch must have at least that many rows)."""
        return max((layer.eva_components for layer in self.layers.values()), default=0)

    def with_ranks(self, ranks: Mapping[str, int], keep_scaling: bool = True) -> AdapterPlan:
        """The plan with new ranks (EVA's allocation); the rest of each layer's entry is kept.

        :param keep_scaling: Rescale alpha with the rank (``alpha * new / old``) so ``alpha / r`` is unchanged.
        """
        layers = {}
        for name, layer in self.layers.items():
            rank = ranks.get(name, layer.rank)
            alpha = layer.alpha * rank / layer.rank if keep_scaling and rank > 0 and layer.rank > 0 else layer.alpha
            layers[name] = dataclasses.replace(layer, rank=rank, alpha=alpha)
        return dataclasses.replace(self, layers=layers)

    def lora_config(self, base: LoraConfig) -> LoraConfig:
        """``base`` with every planned layer's rank and alpha written out by exact name, so that resolving it gives
        this plan's ranks again (and a reader of the config sees them)."""
        rank_pattern = {**base.rank_pattern, **self.ranks}
        alpha_pattern = {**base.alpha_pattern, **{name: layer.alpha for name, layer in self.layers.items()}}
        return dataclasses.replace(base, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)

    def check_fits(self, module: nn.Module) -> None:
        """:raises ConfigError: if a planned layer is missing from ``module`` or has another fan-in."""
        layers = adaptable_layers(module)
        problems = [
            f"{name} (missing)"
            if name not in layers
            else f"{name} (fan-in {layer_fan_in(layers[name])}, planned {planned.fan_in})"
            for name, planned in self.layers.items()
            if name not in layers or layer_fan_in(layers[name]) != planned.fan_in
        ]
        if problems:
            raise ConfigError(f"the adapter plan does not fit {type(module).__name__}: {', '.join(problems)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (it travels in SB3's ``policy_kwargs`` and in adapter checkpoints)."""
        return {
            "method": self.method,
            "exclude": list(self.exclude),
            "dropout": self.dropout,
            "use_dora": self.use_dora,
            "use_rslora": self.use_rslora,
            "layers": {name: dataclasses.asdict(layer) for name, layer in self.layers.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | AdapterPlan) -> AdapterPlan:
        if isinstance(data, AdapterPlan):
            return data
        try:
            layers = {name: LayerPlan(**layer) for name, layer in data["layers"].items()}
            dropout = data.get("dropout", 0.0)
            use_dora, use_rslora = data.get("use_dora", False), data.get("use_rslora", False)
            if not _is_number(dropout) or not 0 <= dropout < 1:
                raise ConfigError(f"dropout={dropout!r} is invalid: expected a number in [0, 1)")
            for flag, value in (("use_dora", use_dora), ("use_rslora", use_rslora)):
                if not isinstance(value, bool):
                    raise ConfigError(f"{flag}={value!r} is invalid: expected true or false")
            exclude = tuple(data.get("exclude", ()))
            return cls(layers, exclude, float(dropout), use_dora, data.get("method"), use_rslora)
        except (KeyError, TypeError, AttributeError) as error:
            raise ConfigError(f"not an adapter plan ({type(error).__name__}: {error}): {data!r:.200}") from error
