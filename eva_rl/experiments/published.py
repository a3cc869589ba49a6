"""Published figures a page sets beside its own: a paper's table, what its numbers measure and how its setting
differs from the page's (a suite's or a sequence's ``published:`` section).

A page compares with a paper only as far as the two measure the same thing, so the figures never stand alone: the
``statistic`` says what they are and ``setting`` what the paper did differently (offline or online training, the
model, the data, the number of tasks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from eva_rl.config import _is_number
from eva_rl.errors import ConfigError

SEQUENCE_METRICS = ("average_success", "forgetting", "forward_transfer")
"""Continual World's three figures, the ones a sequence's published rows may give (Wołczyk et al. 2021, Sec. 3)."""


# The messages name the key within ``published:``; build_config puts the section's name (and the file's) before them.
def _check_text(value: Any, name: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{name}={value!r} is invalid: expected a non-empty string")


def _check_figure(value: Any, name: str) -> None:
    if not _is_number(value):
        raise ConfigError(f"{name}={value!r} is invalid: expected a finite number")


@dataclass
class Published:
    """What every published table says besides its numbers.

    :param source: Where the figures are from (``"arXiv 2410.07170, Tab. 23"``).
    :param statistic: What each figure is (``"mean success over the ten CW10 tasks, 3 seeds"``).
    :param setting: How the paper's setting differs from the page's (training, model, data, tasks).
    """

    source: str
    statistic: str
    setting: str

    def __post_init__(self) -> None:
        for name in ("source", "statistic", "setting"):
            _check_text(getattr(self, name), name)


@dataclass
class PublishedScores(Published):
    """A suite's ``published:``: one figure per method of the suite (``{lora: 0.86, eva: 0.90}``).

    :param scores: ``{method: figure}``; the suite checks that each method is one of its own.
    """

    scores: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.scores, dict) or not self.scores:
            raise ConfigError(f"scores={self.scores!r} is invalid: expected {{method: number}}")
        for method, value in self.scores.items():
            _check_figure(value, f"scores[{method!r}]")


@dataclass
class PublishedApproaches(Published):
    """A sequence's ``published:``: approaches of the paper (PackNet ...) with Continual World's figures.

    :param approaches: ``{name: {metric: figure}}``, metrics out of :data:`SEQUENCE_METRICS`.
    """

    approaches: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.approaches, dict) or not self.approaches:
            raise ConfigError(f"approaches={self.approaches!r} is invalid: expected {{approach: {{metric: number}}}}")
        for name, figures in self.approaches.items():
            where = f"approaches[{name!r}]"
            if not isinstance(figures, dict) or not figures or set(figures) - set(SEQUENCE_METRICS):
                raise ConfigError(
                    f"{where}={figures!r} is invalid: expected {{metric: number}} with metrics out of "
                    f"{list(SEQUENCE_METRICS)}"
                )
            for metric, value in figures.items():
                _check_figure(value, f"{where}: {metric}")


def published_notes(published: Published) -> list[str]:
    """The lines under a page's published table: the source, what the figures are, how the setting differs."""
    return [f"Published: {published.statistic} ({published.source}).", f"The settings differ: {published.setting}"]
