"""Configuration dataclasses for LoRA adapters and EVA initialization.

Both are validated on construction (``__post_init__``), the way PEFT validates its tuner configs: a bad value
raises :class:`~eva_rl.errors.ConfigError` (a ``ValueError``) naming the field, the value and what would be
accepted. Types are checked before values, so ``rho="high"`` is reported as such, not as a failed comparison.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from eva_rl.errors import ConfigError

try:  # the regex parser is public as sre_parse up to Python 3.10, re._parser since
    from re import _parser as _regex_parser
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _regex_parser

_REPEATS = tuple(
    getattr(_regex_parser, name)
    for name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")
    if hasattr(_regex_parser, name)
)
_ON_MAX_BATCHES = ("raise", "warn")
_SVD_SOLVERS = ("lowrank", "full")
DATA_SOURCES = ("auto", "rollouts", "ppo")
"""Where EVA's observations may come from (:attr:`EvaConfig.data_source`)."""

CONVERGENCE_TESTS = ("components", "subspace")
"""How EVA decides that a layer's directions stopped moving (:attr:`EvaConfig.convergence`)."""


def _bad(cls_name: str, field_name: str, value: Any, accepted: str) -> ConfigError:
    return ConfigError(f"{cls_name}.{field_name}={value!r} is invalid: expected {accepted}")


def check_regex(pattern: str, where: str, literal_ok: bool = False) -> None:
    """Reject a layer-name regex that does not compile, or whose matching can backtrack exponentially.

    A repeated group that itself contains a repetition (``(a*)*``, ``(.*.*)*X``) can take exponential time on a
    name it fails to match, so it would hang adapter injection or ``load_adapter``; no layer name needs one.

    :param literal_ok: A pattern that is not a regex is a plain layer name (the keys of ``rank_pattern``).
    :raises ConfigError: naming the pattern and what would be accepted.
    """
    try:
        parsed = _regex_parser.parse(pattern)
    except re.error as error:
        if literal_ok:
            return
        raise ConfigError(f"{where}={pattern!r} is invalid: not a regex ({error})") from error
    depth, count = _repetitions(parsed)
    if depth > 1:
        raise ConfigError(
            f"{where}={pattern!r} is invalid: a repetition inside a repeated group (such as '(a*)*') can take "
            "exponential time to match; expected a regex without nested repetition, or a list of layer names"
        )
    if len(pattern) > MAX_PATTERN_LENGTH or count > MAX_REPEATS:
        raise ConfigError(
            f"{where}={pattern!r:.80} is invalid: longer than {MAX_PATTERN_LENGTH} characters or with more than "
            f"{MAX_REPEATS} repetitions ('.*' ...), which can take a time of high polynomial degree to match; expected "
            "a shorter regex, or a list of layer names"
        )


MAX_PATTERN_LENGTH, MAX_REPEATS = 500, 4
"""A layer-name regex's limits: ``.*`` repeated k times in a row backtracks like a k-th power of the name's length
(14 of them took over 90 s on one name); no layer name needs more than a few."""


def _repetitions(node: Any) -> tuple[int, int]:
    """How deeply repetitions nest in a parsed regex (its star height, an alternation counted as one: ``(a|aa)*``
    backtracks like ``(a*)*``), and how many it holds (``*``, ``+``, ``{m,n}`` with ``n > 1``)."""
    if isinstance(node, _regex_parser.SubPattern):
        node = list(node)
    if not isinstance(node, (list, tuple)):
        return 0, 0
    if len(node) == 2 and node[0] in _REPEATS:
        _, maximum, body = node[1]
        depth, count = _repetitions(body)
        repeated = 1 if maximum > 1 else 0
        return depth + _has_branch(body) + repeated, count + repeated
    children = [_repetitions(child) for child in node]
    return max((depth for depth, _ in children), default=0), sum(count for _, count in children)


def _has_branch(node: Any) -> bool:
    if isinstance(node, _regex_parser.SubPattern):
        node = list(node)
    if not isinstance(node, (list, tuple)):
        return False
    if len(node) == 2 and node[0] == _regex_parser.BRANCH:
        return True
    return any(_has_branch(child) for child in node)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite int or float, not a bool: an inf or nan setting would only fail later, inside torch."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class LoraConfig:
    """LoRA adapters on the Linear/Conv2d layers of a policy: ``W x + (alpha / r) * B A x``, ``W`` frozen.

    :param r: Default rank of every adapted layer (>= 1). EVA may redistribute it across layers.
    :param alpha: Scaling numerator; the adapter output is multiplied by ``alpha / r``.
        ``None`` means ``alpha = r`` (scaling 1).
    :param target_modules: Which layers get adapters. ``None``: every ``nn.Linear`` and ``nn.Conv2d``
        (excluding the heads when ``train_heads`` is set). A list of names matches a layer whose
        qualified name equals an entry or ends with ``"." + entry``; a single string is a regular
        expression that must match the whole name (PEFT's convention).
    :param dropout: Dropout probability on the adapter input, in ``[0, 1)``. Keep it 0 for PPO:
        rollouts run in eval mode, so dropout makes the PPO ratio differ from 1 before any update.
    :param train_heads: Train ``action_net`` and ``value_net`` fully instead of adapting them.
    :param train_bias: Train the biases of every Linear/Conv2d layer.
    :param rank_pattern: Per-layer rank overrides, ``{name or pattern: rank}``; rank 0 means no adapter.
        EVA writes its allocation here so that ``PPO.load`` rebuilds the same adapters.
    :param alpha_pattern: Per-layer ``alpha`` overrides, ``{name or pattern: alpha}``.
    :param use_dora: DoRA (weight-decomposed LoRA): a trainable magnitude per output unit times the normalized
        adapted weight. Needs ``dropout=0``.
    :param use_rslora: rsLoRA's scaling ``alpha / sqrt(r)`` instead of ``alpha / r`` (peft's ``use_rslora``): the
        adapter's output and gradients keep their size as the rank grows. EVA's redistribution rescales alpha with
        the rank as peft does (``alpha * r_new / r``), which under rsLoRA changes the scaling to
        ``alpha * sqrt(r_new) / r``.
    :param train_A: Train A; ``False`` freezes it where its init put it and only B (and what else trains) learns,
        as LoRA-FA does: the adapter then moves the layer only along the input directions A spans.
    """

    r: int = 4
    alpha: float | None = None
    target_modules: list[str] | str | None = None
    dropout: float = 0.0
    train_heads: bool = False
    train_bias: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False
    use_rslora: bool = False
    train_A: bool = True

    def __post_init__(self) -> None:
        name = type(self).__name__
        if not _is_int(self.r) or self.r < 1:
            raise _bad(name, "r", self.r, "an integer >= 1")
        if self.alpha is not None and not (_is_number(self.alpha) and self.alpha > 0):
            raise _bad(name, "alpha", self.alpha, "a finite number > 0, or None for alpha = r")
        if not (_is_number(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise _bad(name, "dropout", self.dropout, "a probability in [0, 1)")
        for flag in ("train_heads", "train_bias", "use_dora", "use_rslora", "train_A"):
            if not isinstance(getattr(self, flag), bool):
                raise _bad(name, flag, getattr(self, flag), "true or false")
        if self.use_dora and self.dropout > 0:
            raise _bad(name, "dropout", self.dropout, "0 with use_dora=True (DoRA with dropout is not supported)")
        if isinstance(self.target_modules, (list, tuple)):
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise _bad(name, "target_modules", self.target_modules, "a non-empty list of layer names")
            self.target_modules = list(self.target_modules)
        elif self.target_modules is not None and not (isinstance(self.target_modules, str) and self.target_modules):
            raise _bad(name, "target_modules", self.target_modules, "None, a list of layer names or a regex string")
        elif isinstance(self.target_modules, str):
            check_regex(self.target_modules, f"{name}.target_modules")
        for pattern_name in ("rank_pattern", "alpha_pattern"):
            patterns = getattr(self, pattern_name)
            if not isinstance(patterns, dict) or not all(isinstance(key, str) and key for key in patterns):
                raise _bad(name, pattern_name, patterns, "a mapping {layer name or pattern: value}")
            for key in patterns:
                check_regex(key, f"{name}.{pattern_name} key", literal_ok=True)
        for key, rank in self.rank_pattern.items():
            if not _is_int(rank) or rank < 0:
                raise _bad(name, f"rank_pattern[{key!r}]", rank, "an integer >= 0 (0 = no adapter)")
        for key, value in self.alpha_pattern.items():
            if not (_is_number(value) and value > 0):
                raise _bad(name, f"alpha_pattern[{key!r}]", value, "a finite number > 0")

    @property
    def default_alpha(self) -> float:
        """``alpha`` with the ``None`` default resolved to ``r``."""
        return float(self.r) if self.alpha is None else float(self.alpha)

    def to_dict(self) -> dict[str, Any]:
        """Plain-``dict`` form, safe to store in SB3's ``policy_kwargs``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | LoraConfig) -> LoraConfig:
        if isinstance(data, LoraConfig):
            return data
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown LoraConfig key(s) {unknown}")
        return cls(**data)


@dataclass
class EvaConfig:
    """How EVA estimates the adapter directions and redistributes ranks.

    :param rho: Rank redistribution factor (>= 1): a layer may get up to ``round(r * rho)`` rank, and
        that many principal components are tracked per layer. ``rho=1`` keeps uniform ranks.
    :param tau: Convergence threshold in ``[0, 1]``: a component has converged when the cosine between
        two successive estimates is >= ``tau``.
    :param convergence: What must stop moving before a layer's directions are taken: ``"components"`` (peft's test),
        each of its first ``r`` components, by the cosine between successive estimates; ``"subspace"``, the span of
        its first ``r`` components, by the smallest cosine of the principal angles between successive spans.
        Components whose variances are nearly equal keep turning within their span long after the span has
        settled; with ``B = 0`` an adapter whose A rows are turned within their span learns the same updates
        (``B A`` ranges over the same matrices), so the span is what the adapter depends on.
    :param batch_size: Activation rows (environment steps) per incremental SVD update. Must be at least
        the number of tracked components.
    :param max_batches: Stop after this many batches even if some layers have not converged
        (peft loops forever). ``None`` means no cap.
    :param on_max_batches: What to do when the cap is hit: ``"raise"`` an error naming the layers that did
        not converge, or ``"warn"`` and use the current estimates.
    :param whiten: Divide each A row by ``sqrt`` of its singular value, as peft does.
    :param adjust_scaling_factors: Rescale alpha with the rank (``alpha * r_new / r``) so that
        ``alpha / r`` is unchanged by the redistribution.
    :param deterministic: Act greedily during the rollouts. Off by default: PPO trains on the states its
        stochastic policy visits.
    :param svd_solver: ``"lowrank"`` (randomized, peft's choice, seeded by ``seed``) or ``"full"`` (exact).
    :param seed: Seed of the randomized SVD and of the rollout environments.
    :param extra_components: Components tracked beyond ``round(r * rho)`` per layer and dropped at the end. The
        incremental SVD truncates to the tracked components after every batch, which loses what lies beyond them;
        tracking more makes the kept directions closer to an exact SVD of the stream (0, peft's choice: none).
    :param data_source: Where EVA's observations come from: ``"ppo"``, the first rollouts an on-policy algorithm
        (PPO, A2C) collects anyway, on which it then trains (:class:`~eva_rl.eva_ppo.EvaPPO`: no extra env steps,
        no update lost; if the budget ends first, EVA's estimate at its last rollout is used); ``"rollouts"``, EVA's
        own rollouts of the pretrained policy before training starts (extra env steps, as a static-dataset EVA
        would spend; the only source for off-policy algorithms; converges whatever the fine-tuning budget);
        ``"auto"`` (the default), ``"ppo"`` where the algorithm is on-policy and one rollout holds an EVA batch,
        else ``"rollouts"``.
    """

    rho: float = 2.0
    tau: float = 0.99
    convergence: Literal["components", "subspace"] = "components"
    batch_size: int = 256
    max_batches: int | None = 100
    on_max_batches: Literal["raise", "warn"] = "raise"
    whiten: bool = False
    adjust_scaling_factors: bool = True
    deterministic: bool = False
    svd_solver: Literal["lowrank", "full"] = "lowrank"
    seed: int = 0
    extra_components: int = 0
    data_source: Literal["auto", "rollouts", "ppo"] = "auto"

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.data_source not in DATA_SOURCES:
            raise _bad(name, "data_source", self.data_source, f"one of {DATA_SOURCES}")
        if not _is_int(self.extra_components) or self.extra_components < 0:
            raise _bad(name, "extra_components", self.extra_components, "an integer >= 0")
        if not (_is_number(self.rho) and self.rho >= 1.0):
            raise _bad(name, "rho", self.rho, "a number >= 1.0 (1.0 keeps uniform ranks)")
        if not (_is_number(self.tau) and 0.0 <= self.tau <= 1.0):
            raise _bad(name, "tau", self.tau, "a cosine threshold in [0, 1]")
        if self.convergence not in CONVERGENCE_TESTS:
            raise _bad(name, "convergence", self.convergence, f"one of {CONVERGENCE_TESTS}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise _bad(name, "batch_size", self.batch_size, "an integer >= 1")
        if not _is_int(self.seed):
            raise _bad(name, "seed", self.seed, "an integer")
        for flag in ("whiten", "adjust_scaling_factors", "deterministic"):
            if not isinstance(getattr(self, flag), bool):
                raise _bad(name, flag, getattr(self, flag), "true or false")
        if self.max_batches is not None and (not _is_int(self.max_batches) or self.max_batches < 2):
            raise _bad(name, "max_batches", self.max_batches, "None or an integer >= 2 (EVA needs two batches)")
        if self.on_max_batches not in _ON_MAX_BATCHES:
            raise _bad(name, "on_max_batches", self.on_max_batches, f"one of {_ON_MAX_BATCHES}")
        if self.svd_solver not in _SVD_SOLVERS:
            raise _bad(name, "svd_solver", self.svd_solver, f"one of {_SVD_SOLVERS}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
