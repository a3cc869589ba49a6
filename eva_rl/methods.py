"""The registry of fine-tuning methods: one entry per method says what it trains and how it starts.

Every module asks this registry (:func:`get_method`) what a method does; none compares method names. Adding a method
is one :func:`register_method` call with a :class:`Method`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from eva_rl.config import CONVERGENCE_TESTS, LoraConfig
from eva_rl.errors import ConfigError

if TYPE_CHECKING:
    from eva_rl.layers import LoraLayer


@dataclass(frozen=True)
class Method:
    """One way to fine-tune a pretrained policy.

    :param name: The name users pass (``--methods``, ``adapt(method=...)``).
    :param summary: One line for help texts and tables.
    :param trains: ``"adapters"`` (LoRA factors, DoRA magnitudes, ``log_std`` and whatever the LoRA config
        unfreezes), ``"heads"`` (the action and value heads, no adapters) or ``"all"`` (every weight).
    :param pretrained: Starts from the pretrained weights (every method but training from scratch); such a method
        acts exactly as the pretrained agent at step 0.
    :param runs_eva: Runs EVA on target-env data before fine-tuning (for its directions, its ranks, or both).
    :param eva_directions: Sets A to EVA's principal directions (with ``runs_eva``); otherwise EVA only allocates
        the ranks and ``init`` (or Kaiming-uniform) sets A.
    :param init: Initializes an adapter from its layer's weight (PiSSA, OLoRA); ``None``: Kaiming-uniform A, B = 0.
    :param rewrites_base: ``init`` rewrites the frozen base weight as a residual ``W - s B A``: the rank is capped at
        ``min(out, fan_in)``, and adapter checkpoints keep the rewritten base weights.
    :param use_dora: DoRA's trainable magnitude per output unit on every adapter.
    :param rescale: Runs on each adapter after its A is set (EVA's directions, ``init`` or Kaiming-uniform), e.g. to
        change A's row norms; B stays 0.
    :param match_signal: Scales each of EVA's directions (with ``eva_directions``) so that its output on the inputs EVA
        read varies as much as a Kaiming-uniform row's (:func:`~eva_rl.inits.kaiming_signal`).
    :param train_A: A trains; ``False`` freezes it at its init (LoRA-FA): only the subspace the init chose adapts.
    :param eva_ranks: Takes EVA's rank allocation (with ``runs_eva``); ``False`` keeps the configured ranks, so that
        EVA, run without ``eva_directions`` either, only sets when the first update comes (on PPO's rollouts) or
        what env steps go before it (on its own).
    :param eva_data: Pins where EVA reads (:attr:`~eva_rl.config.EvaConfig.data_source`) whatever the EVA config
        says; ``None`` keeps the config's.
    :param eva_convergence: Pins EVA's convergence test (:attr:`~eva_rl.config.EvaConfig.convergence`) whatever the
        EVA config says; ``None`` keeps the config's.
    """

    name: str
    summary: str
    trains: Literal["adapters", "heads", "all"] = "adapters"
    pretrained: bool = True
    runs_eva: bool = False
    eva_directions: bool = False
    init: Callable[[LoraLayer], None] | None = None
    rewrites_base: bool = False
    use_dora: bool = False
    rescale: Callable[[LoraLayer], None] | None = None
    match_signal: bool = False
    train_A: bool = True
    eva_ranks: bool = True
    eva_data: Literal["rollouts", "ppo"] | None = None
    eva_convergence: Literal["components", "subspace"] | None = None

    @property
    def adapters(self) -> bool:
        """Builds an eva-rl LoRA policy (with adapters, or with heads trained and none); ``False`` for a plain
        SB3 policy whose every weight trains."""
        return self.trains != "all"

    @property
    def uses_rank(self) -> bool:
        """The LoRA rank (``r``) means something for this method."""
        return self.trains == "adapters"

    @property
    def low_rank_update(self) -> bool:
        """Its update of each adapted layer is ``scaling * B A`` on frozen weights (DoRA's also rescales them): what
        ``compare --anatomy`` and ``--first-update`` measure."""
        return self.trains == "adapters" and not self.use_dora

    def lora_config(self, lora: LoraConfig) -> LoraConfig:
        """``lora`` as this method uses it (DoRA switched on; no adapters and trainable heads for head-only)."""
        if self.trains == "heads":
            return dataclasses.replace(lora, train_heads=True, rank_pattern={".*": 0})
        if self.use_dora:
            lora = dataclasses.replace(lora, use_dora=True)
        if not self.train_A:
            lora = dataclasses.replace(lora, train_A=False)
        return lora


METHODS: dict[str, Method] = {}
"""Every registered method by name, in registration order (the order of tables and help texts)."""


def register_method(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS`.

    :raises ConfigError: if the name is taken.
    """
    if method.name in METHODS:
        raise ConfigError(f"a method named {method.name!r} is already registered")
    if method.eva_directions and not method.runs_eva:
        raise ConfigError(f"method {method.name!r}: eva_directions needs runs_eva")
    if method.match_signal and not method.eva_directions:
        raise ConfigError(f"method {method.name!r}: match_signal scales EVA's directions: it needs eva_directions")
    if method.eva_data is not None and (not method.runs_eva or method.eva_data not in ("rollouts", "ppo")):
        wanted = "runs_eva and 'rollouts' or 'ppo'"
        raise ConfigError(f"method {method.name!r}: eva_data={method.eva_data!r} needs {wanted}")
    if method.eva_convergence is not None and (not method.runs_eva or method.eva_convergence not in CONVERGENCE_TESTS):
        wanted = f"runs_eva and one of {CONVERGENCE_TESTS}"
        raise ConfigError(f"method {method.name!r}: eva_convergence={method.eva_convergence!r} needs {wanted}")
    if method.eva_directions and not method.eva_ranks:
        raise ConfigError(f"method {method.name!r}: eva_directions needs eva_ranks (EVA's A has EVA's ranks)")
    METHODS[method.name] = method
    return method


def get_method(name: str | Method) -> Method:
    """The registered method called ``name``.

    :raises ConfigError: naming the method and listing the registered ones.
    """
    if isinstance(name, Method):
        return name
    if name not in METHODS:
        raise ConfigError(f"method={name!r} is invalid: expected one of {method_names()}")
    return METHODS[name]


def method_names(adapters: bool | None = None) -> tuple[str, ...]:
    """Registered method names; ``adapters=True`` / ``False`` keeps those with / without an eva-rl LoRA policy."""
    return tuple(name for name, m in METHODS.items() if adapters is None or m.adapters == adapters)


# The initializers import torch when an adapter is built, not when the registry is read for its names (the command
# line's choices and help).
def _pissa_init(layer: LoraLayer) -> None:
    from eva_rl.inits import pissa_init

    pissa_init(layer)


def _olora_init(layer: LoraLayer) -> None:
    from eva_rl.inits import olora_init

    olora_init(layer)


def _orthonormal_init(layer: LoraLayer) -> None:
    from eva_rl.inits import orthonormal_init

    orthonormal_init(layer)


def _kaiming_row_norm(layer: LoraLayer) -> None:
    from eva_rl.inits import kaiming_row_norm

    kaiming_row_norm(layer)


for _method in (
    Method(
        "eva",
        "LoRA, A = top principal directions of each layer's inputs on target rollouts, ranks by explained variance",
        runs_eva=True,
        eva_directions=True,
    ),
    Method("lora", "LoRA, Kaiming-uniform A, B = 0"),
    Method(
        "pissa",
        "LoRA, A and B from the top-r SVD of W; the residual is the frozen base",
        init=_pissa_init,
        rewrites_base=True,
    ),
    Method(
        "olora",
        "LoRA, A and B from the QR decomposition of W; the residual is frozen",
        init=_olora_init,
        rewrites_base=True,
    ),
    Method("dora", "lora with DoRA's weight decomposition (a trainable magnitude per output unit)", use_dora=True),
    Method("eva+dora", "eva with DoRA's weight decomposition", runs_eva=True, eva_directions=True, use_dora=True),
    Method(
        "lora-redist",
        "EVA's rank allocation with Kaiming-uniform A (EVA's ranks without its directions)",
        runs_eva=True,
    ),
    # Controls (issue 27): each changes one thing about EVA or LoRA, so that what EVA's init does can be told apart:
    # its subspace (from data or not), its row norm (the step size B sees), and whether A moves at all.
    Method("lora-orth", "LoRA, A = random orthonormal rows (unit norm, as EVA's), B = 0", init=_orthonormal_init),
    Method(
        "eva-rescaled",
        "eva with each A row scaled to Kaiming-uniform's norm (1/sqrt(3)): EVA's subspace at LoRA's scale",
        runs_eva=True,
        eva_directions=True,
        rescale=_kaiming_row_norm,
    ),
    Method(
        "eva-signal",
        "eva with each A row scaled so its output on EVA's data varies as a Kaiming-uniform row's: LoRA's signal",
        runs_eva=True,
        eva_directions=True,
        match_signal=True,
    ),
    Method(
        "eva-fa",
        "eva with A frozen (LoRA-FA): only B trains, in EVA's subspace",
        runs_eva=True,
        eva_directions=True,
        train_A=False,
    ),
    Method("lora-fa", "lora with A frozen (LoRA-FA): only B trains, in a random subspace", train_A=False),
    Method(
        "lora-orth-fa",
        "lora-orth with A frozen: only B trains, in a random subspace at EVA's row norm (eva-fa's control)",
        init=_orthonormal_init,
        train_A=False,
    ),
    # EVA on PPO's rollouts holds back the updates until it converges, then makes them in a row on rollouts the
    # pretrained policy collected: lora-deferred runs EVA for that schedule alone, so eva against it is the init alone.
    Method(
        "lora-deferred",
        "lora whose updates wait for EVA as eva's do (EVA runs; its ranks and directions are not used)",
        runs_eva=True,
        eva_ranks=False,
    ),
    Method(
        "eva-own",
        "eva on rollouts of its own before training (their env steps charged), not on PPO's first ones",
        runs_eva=True,
        eva_directions=True,
        eva_data="rollouts",
    ),
    # EVA's wait grows with the rank: per-component convergence holds PPO's updates back while nearly equal
    # components keep turning within a span that has settled; eva-span waits for the span only.
    Method(
        "eva-span",
        "eva whose convergence test is the span of each layer's first r directions, not each direction",
        runs_eva=True,
        eva_directions=True,
        eva_convergence="subspace",
    ),
    Method("head", "the action and value heads train, the rest is frozen", trains="heads"),
    Method("full", "every weight of the pretrained policy trains", trains="all"),
    Method(
        "scratch",
        "every weight of a freshly initialized policy of the same architecture",
        trains="all",
        pretrained=False,
    ),
):
    register_method(_method)
