"""LoRA layer modules for ``nn.Linear`` and ``nn.Conv2d``.

Output: ``base_layer(x) + scaling * B(A(dropout(x)))`` with ``scaling = alpha / r``; the base layer is frozen.
``lora_A`` and ``lora_B`` are raw ``nn.Parameter`` s rather than ``nn.Linear`` modules, so that SB3's
``ortho_init`` (which re-initializes every Linear/Conv2d module in reach) can never touch them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

LORA_PATHS = ("auto", "merged", "low-rank")
"""How a LoRA layer may compute its output (:meth:`LoraLayer.set_path`)."""

LOW_RANK_PATH_MIN_WEIGHTS = 1 << 16
"""From this many base weights (a 256 x 256 Linear) a LoRA layer takes the low-rank path while it trains: the
crossover measured by ``eva-rl bench --lora-path-only`` (BENCHMARKS.md)."""


def weight_fan_in(weight: torch.Tensor) -> int:
    """Input features one output unit of a Linear/Conv2d weight sees: ``in_features``, or ``C*kh*kw``."""
    return int(weight[0].numel())


class LoraLayer(nn.Module):
    """Common part of the LoRA wrappers: rank, scaling, dropout, merge state.

    :param base_layer: The layer to adapt; its parameters are frozen.
    :param r: Adapter rank (>= 1).
    :param alpha: Scaling numerator; the adapter output is multiplied by ``alpha / r``.
    :param dropout: Dropout probability on the adapter input.
    :param use_dora: DoRA: the adapted weight ``W + s B A`` is renormalized per output unit and scaled by a trainable
        magnitude vector, initialized to the row norms of ``W`` (so the layer starts as its base).
    :param use_rslora: rsLoRA's scaling ``alpha / sqrt(r)``.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_dora: bool = False,
        use_rslora: bool = False,
    ) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r={r} is invalid: expected an integer >= 1 (rank 0 means: do not wrap)")
        if use_dora and dropout > 0:
            raise ValueError(f"DoRA with dropout={dropout} is not supported: use dropout=0")
        self.base_layer = base_layer
        for param in base_layer.parameters():
            param.requires_grad_(False)
        self.r = int(r)
        self.alpha = float(alpha)
        self.use_rslora = use_rslora
        self.scaling = self.alpha / (math.sqrt(self.r) if use_rslora else self.r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.use_dora = use_dora
        self.lora_magnitude: nn.Parameter | None = None
        self.merged = False
        self.disabled = False
        self._merged_norm: torch.Tensor | None = None
        self._cache_weights = False
        self._weight_cache: _WeightCache | None = None
        self.path = "auto"

    @property
    def fan_in(self) -> int:
        """Number of input features one output of the base layer sees (``in_features`` or ``C*kh*kw``)."""
        return weight_fan_in(self.base_layer.weight)

    def reset_lora_parameters(self) -> None:
        """Standard LoRA init: Kaiming-uniform A (as ``nn.Linear``), B = 0, so the layer starts as its base."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.use_dora:
            if self.lora_magnitude is None:
                self.lora_magnitude = nn.Parameter(self.base_layer.weight.new_empty(self.base_layer.weight.shape[0]))
            self.reset_dora_magnitude()

    @torch.no_grad()
    def reset_dora_magnitude(self) -> None:
        """Set the DoRA magnitude to the row norms of ``W + s B A``, so the layer's output does not change.

        Call it after loading new base weights into a DoRA layer.
        """
        self.lora_magnitude.copy_(_row_norms(self.effective_weight()))

    @torch.no_grad()
    def set_lora_A(self, directions: torch.Tensor) -> None:
        """Copy ``directions`` (``r x fan_in``) into A, and zero B so the output is unchanged."""
        if directions.shape != (self.r, self.fan_in):
            raise ValueError(
                f"A of shape {tuple(directions.shape)} does not fit this layer: expected ({self.r}, {self.fan_in})"
            )
        self.lora_A.copy_(directions.reshape(self.lora_A.shape))
        self.lora_B.zero_()

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B A`` in the shape of the base weight."""
        return (self.scaling * (self._b_matrix() @ self._a_matrix())).reshape(self.base_layer.weight.shape)

    def _adapter(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter (and the DoRA magnitude) into the base weight; the forward then skips the adapter."""
        if self.merged:
            return
        if self.use_dora:
            self._merged_norm = _row_norms(self.effective_weight())
        self.base_layer.weight.copy_(self.adapted_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        if self.use_dora:
            weight.copy_(_scale_rows(weight, self._merged_norm / self.lora_magnitude))
        weight -= self.delta_weight().to(weight.dtype)
        self.merged = False

    def effective_weight(self) -> torch.Tensor:
        """``W + scaling * B A``, differentiable in A and B."""
        weight = self.base_layer.weight
        flat = torch.addmm(weight.reshape(weight.shape[0], -1), self._b_matrix(), self._a_matrix(), alpha=self.scaling)
        return flat.reshape(weight.shape)

    def adapted_weight(self) -> torch.Tensor:
        """The weight this layer computes with: ``W + s B A``, with DoRA ``m * (W + s B A) / ||W + s B A||``.

        The DoRA norm is detached from the gradient, as in the DoRA paper (section 4.3) and peft.
        """
        weight = self.effective_weight()
        if self.use_dora:
            weight = _scale_rows(weight, self.lora_magnitude / _row_norms(weight).detach())
        return weight

    def _a_matrix(self) -> torch.Tensor:
        return self.lora_A.reshape(self.r, -1)

    def _b_matrix(self) -> torch.Tensor:
        return self.lora_B.reshape(-1, self.r)

    def _base_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x)
        if isinstance(self.lora_dropout, nn.Identity) and not self._low_rank_pays():
            # Without dropout, one call with W + s*BA is exact and cheaper for small layers than the separate
            # low-rank path: the cost of small networks is the number of ops, not their flops.
            cached = self._cache_weights and not torch.is_grad_enabled()
            return self._base_forward(x, self._cached_weight() if cached else self.adapted_weight())
        return self.base_layer(x) + self.scaling * self._adapter(self.lora_dropout(x))

    def _low_rank_pays(self) -> bool:
        """Whether this call takes the separate low-rank path although ``W + s B A`` would be exact (no dropout).

        With gradients, the one-call path differentiates the whole ``W + s B A``: a full weight gradient (as full
        fine-tuning pays) and the products that build it, before anything reaches A and B. From
        :data:`LOW_RANK_PATH_MIN_WEIGHTS` on, that costs more than the low-rank path's few extra ops.
        """
        if self.path != "auto":
            return self.path == "low-rank"
        # gradients first: acting and rollouts, the calls that come one env step at a time, stop there
        return (
            torch.is_grad_enabled()
            and not self.use_dora
            and self.base_layer.weight.numel() >= LOW_RANK_PATH_MIN_WEIGHTS
        )

    def set_path(self, path: str) -> None:
        """How the layer computes while unmerged and without dropout.

        :param path: ``"auto"`` (the default: the one-call ``W + s B A`` path, and the low-rank path while it trains
            from :data:`LOW_RANK_PATH_MIN_WEIGHTS` base weights on), ``"merged"`` (always one call) or ``"low-rank"``
            (always ``base(x) + s B A x``, as peft computes). Their outputs agree to rounding.
        """
        if path not in LORA_PATHS:
            raise ValueError(f"LoRA path {path!r} is unknown: expected one of {list(LORA_PATHS)}")
        if path == "low-rank" and self.use_dora:
            raise ValueError("the low-rank path does not compute DoRA's weight norm: use path 'auto' or 'merged'")
        self.path = path

    def _cached_weight(self) -> torch.Tensor:
        """:meth:`adapted_weight`, computed once per version of the parameters it is made of (see
        :func:`cached_adapter_weights`)."""
        sources = self._weight_sources()
        cache = self._weight_cache
        if cache is None or not cache.matches(sources, self.scaling):
            cache = self._weight_cache = _WeightCache(sources, self.scaling, self.adapted_weight())
        return cache.weight

    def _weight_sources(self) -> tuple[torch.Tensor, ...]:
        sources = (self.base_layer.weight, self.lora_A, self.lora_B)
        return sources if self.lora_magnitude is None else (*sources, self.lora_magnitude)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        return {**state, "_cache_weights": False, "_weight_cache": None}  # a copy is outside any cache block

    def __setstate__(self, state: dict) -> None:
        super().__setstate__({"path": "auto", **state})  # layers pickled before paths existed

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, dora={self.use_dora}, merged={self.merged}"


@contextmanager
def cached_adapter_weights(module: nn.Module) -> Iterator[None]:
    """Inside the block, each LoRA layer of ``module`` computes ``W + s B A`` under ``torch.no_grad()`` once per
    version of its parameters, instead of once per call.

    A rollout of n steps calls each layer n times with the same parameters, one env step at a time; the cache turns
    n computations into one (1.10x LoRA PPO steps/s on HalfCheetah, BENCHMARKS.md). A change made by an in-place
    op (an optimizer step, ``copy_``, ``load_state_dict``, a merge) or a new tensor (``.to(device)``) is seen, and
    the next call computes the weight again. A write through ``.data`` is not (PyTorch does not count it as a
    version; SB3's Polyak update of target networks writes that way): use the block where the parameters stay
    fixed, as during rollouts and evaluations (:class:`eva_rl.callbacks.CachedAdapterWeights`). Blocks nest;
    leaving the outermost one frees the cached weights. Gradients are never taken from a cached weight.
    """
    layers = [layer for layer in module.modules() if isinstance(layer, LoraLayer)]
    before = [layer._cache_weights for layer in layers]
    for layer in layers:
        layer._cache_weights = True
    try:
        yield
    finally:
        for layer, enabled in zip(layers, before, strict=True):
            layer._cache_weights = enabled
            if not enabled:
                layer._weight_cache = None


def keep_adapted_weights(layers: Iterable[LoraLayer], keep: bool = True) -> None:
    """Whether each of ``layers`` keeps its adapted weight ``W + s B A`` between calls without gradients, outside
    any :func:`cached_adapter_weights` block too (eva-rl's policies do so for their online networks); ``False``
    frees the kept weights, and every call computes the weight again."""
    for layer in layers:
        layer._cache_weights = keep
        if not keep:
            layer._weight_cache = None


class _WeightCache:
    """An adapted weight and what it was computed from: each source's storage, shape and in-place version.

    The cache keeps detached views of the sources, which share their version counters and keep their storage
    alive, so a new tensor can never take over a cached address.
    """

    def __init__(self, sources: tuple[torch.Tensor, ...], scaling: float, weight: torch.Tensor) -> None:
        self.sources = tuple(source.detach() for source in sources)
        self.versions = tuple(source._version for source in sources)
        self.scaling = scaling
        self.weight = weight.detach()

    def matches(self, sources: tuple[torch.Tensor, ...], scaling: float) -> bool:
        return (
            len(sources) == len(self.sources)
            and scaling == self.scaling
            and all(
                new.data_ptr() == old.data_ptr() and new.shape == old.shape and new._version == version
                for new, old, version in zip(sources, self.sources, self.versions, strict=True)
            )
        )


def _row_norms(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output unit's weights (a Linear row, a Conv2d filter)."""
    return weight.reshape(weight.shape[0], -1).norm(dim=1)


def _scale_rows(weight: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return factors.reshape(-1, *([1] * (weight.ndim - 1))) * weight


class LoraLinear(LoraLayer):
    """LoRA wrapper of an ``nn.Linear``: ``A`` is ``(r, in_features)``, ``B`` is ``(out_features, r)``."""

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_dora: bool = False,
        use_rslora: bool = False,
    ) -> None:
        super().__init__(base_layer, r, alpha, dropout, use_dora, use_rslora)
        weight = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(r, base_layer.in_features, device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.empty(base_layer.out_features, r, device=weight.device, dtype=weight.dtype))
        self.reset_lora_parameters()

    def _base_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.base_layer.bias)

    def _adapter(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B)


class LoraConv2d(LoraLayer):
    """LoRA wrapper of an ``nn.Conv2d``.

    ``A`` is a convolution with the base kernel size, stride, padding and dilation and ``r`` output channels;
    ``B`` is a 1x1 convolution to the base output channels. ``B A`` is then a single convolution with the base
    geometry, which is what :meth:`merge` adds to the base kernel.
    """

    def __init__(
        self,
        base_layer: nn.Conv2d,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_dora: bool = False,
        use_rslora: bool = False,
    ) -> None:
        if base_layer.groups != 1:
            raise ValueError(f"LoRA on Conv2d needs groups=1, got groups={base_layer.groups}")
        if base_layer.padding_mode != "zeros":
            raise ValueError(f"LoRA on Conv2d needs padding_mode='zeros', got {base_layer.padding_mode!r}")
        super().__init__(base_layer, r, alpha, dropout, use_dora, use_rslora)
        weight = base_layer.weight
        kh, kw = base_layer.kernel_size
        factory = dict(device=weight.device, dtype=weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, base_layer.in_channels, kh, kw, **factory))
        self.lora_B = nn.Parameter(torch.empty(base_layer.out_channels, r, 1, 1, **factory))
        self.reset_lora_parameters()

    def _base_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.base_layer._conv_forward(x, weight, self.base_layer.bias)

    def _adapter(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        hidden = F.conv2d(x, self.lora_A, None, base.stride, base.padding, base.dilation)
        return F.conv2d(hidden, self.lora_B)


LORA_LAYER_TYPES: dict[type[nn.Module], type[LoraLayer]] = {nn.Linear: LoraLinear, nn.Conv2d: LoraConv2d}
"""Which LoRA wrapper adapts which base layer type."""


def lora_layer_type(layer: nn.Module) -> type[LoraLayer]:
    """The LoRA wrapper for ``layer``, subclasses included (attention's ``out_proj`` is an ``nn.Linear`` subclass).

    :raises TypeError: for a layer that is neither a Linear nor a Conv2d.
    """
    for base, wrapper in LORA_LAYER_TYPES.items():
        if isinstance(layer, base):
            return wrapper
    raise TypeError(f"no LoRA wrapper for {type(layer).__name__}: expected an nn.Linear or nn.Conv2d")
