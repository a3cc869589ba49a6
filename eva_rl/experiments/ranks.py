"""Rank studies: adapter methods at several LoRA ranks on one task of a suite, IQM final return and normalized AUC
against the rank.

The paper behind EVA reports its largest RL gain at low rank; a rank study asks whether that holds here. A suite
file declares one (``rank_study:``) and ``compare.py --suite <name> --rank-study`` runs it: every method at every
``r`` (``alpha = r``, so the scaling stays 1) on the study's seeds, each run an ordinary resumable run. A run at
the rank the suite itself uses is the suite's own run folder, so it is not run twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eva_rl.errors import ConfigError
from eva_rl.experiments.runs import RunResult
from eva_rl.experiments.stats import (
    Interval,
    normalized_auc,
    probability_of_improvement,
    score_format,
    stratified_iqm,
)
from eva_rl.experiments.tasks import check_seeds
from eva_rl.methods import get_method, method_names


@dataclass
class RankStudy:
    """A suite's rank study.

    :param task: The suite task it runs on.
    :param ranks: The ranks ``r`` (every adapted layer's; EVA methods redistribute that budget).
    :param methods: Methods whose rank means something (``lora``, ``eva``, ``lora-redist`` ...).
    :param seeds: Number of seeds (0..n-1) or an explicit list.
    """

    task: str
    ranks: list[int]
    methods: list[str] = field(default_factory=lambda: ["lora", "eva", "lora-redist"])
    seeds: int | list[int] = 5

    def __post_init__(self) -> None:
        if not isinstance(self.task, str) or not self.task:
            raise ConfigError(f"rank_study.task={self.task!r} is invalid: expected a task of the suite")
        ranks = self.ranks
        if (
            not isinstance(ranks, list)
            or not ranks
            or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks)
            or len(set(ranks)) != len(ranks)
        ):
            raise ConfigError(f"rank_study.ranks={ranks!r} is invalid: expected a list of distinct integers >= 1")
        ranked = [m for m in method_names() if get_method(m).uses_rank]
        if not isinstance(self.methods, list) or not self.methods or set(self.methods) - set(ranked):
            raise ConfigError(
                f"rank_study.methods={self.methods!r} is invalid: expected a non-empty list out of the methods "
                f"with a rank {ranked}"
            )
        check_seeds(self.seeds, "rank_study.seeds")

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)


def rank_settings(method_settings: Mapping[str, Mapping[str, float]], method: str, r: int) -> dict[str, float]:
    """``method``'s settings with the rank set to ``r`` and ``alpha = r`` (scaling 1 at every rank)."""
    return {**method_settings.get(method, {}), "r": r, "alpha": r}


@dataclass
class RankPoint:
    """One method at one rank, over its seeds: IQM with 95% stratified-bootstrap CIs."""

    seeds: int
    final: Interval
    auc: Interval
    trainable_params: int


@dataclass
class RankStudyReport:
    """A rank study's statistics: ``points[method][r]``, and per r the probability that the reference method's
    final return beats each other method's (``p_reference_better[method][r]``)."""

    suite: str
    task: str
    ranks: list[int]
    points: dict[str, dict[int, RankPoint]]
    p_reference_better: dict[str, dict[int, Interval]]
    reference: str = "eva"

    def to_dict(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "task": self.task,
            "ranks": self.ranks,
            "methods": {
                method: {str(r): dataclasses.asdict(point) for r, point in by_rank.items()}
                for method, by_rank in self.points.items()
            },
            "reference": self.reference,
            f"p_{self.reference}_better_final": {
                method: {str(r): dataclasses.asdict(p) for r, p in by_rank.items()}
                for method, by_rank in self.p_reference_better.items()
            },
        }


def rank_report(
    suite: str, study: RankStudy, runs: Sequence[tuple[int, RunResult]], reference: str = "eva"
) -> RankStudyReport:
    """Aggregate ``(r, result)`` pairs; the AUC's horizon is the longest curve, as in the suite's report.

    :param reference: The method the others are compared with, rank by rank.
    """
    horizon = max(result.sample_curve()[0][-1] for _, result in runs)
    finals: dict[str, dict[int, list[float]]] = {}
    aucs: dict[str, dict[int, list[float]]] = {}
    params: dict[str, dict[int, list[int]]] = {}
    for r, result in runs:
        finals.setdefault(result.method, {}).setdefault(r, []).append(result.final_return)
        aucs.setdefault(result.method, {}).setdefault(r, []).append(normalized_auc(*result.sample_curve(), horizon))
        params.setdefault(result.method, {}).setdefault(r, []).append(result.trainable_params)
    points = {
        method: {
            r: RankPoint(
                len(finals[method][r]),
                stratified_iqm([finals[method][r]]),
                stratified_iqm([aucs[method][r]]),
                int(np.mean(params[method][r])),
            )
            for r in study.ranks
            if r in finals[method]
        }
        for method in study.methods
        if method in finals
    }
    others = [m for m in finals if m != reference] if reference in finals else []
    p_reference_better = {
        method: {
            r: probability_of_improvement([finals[reference][r]], [finals[method][r]])
            for r in study.ranks
            if r in finals[reference] and r in finals[method]
        }
        for method in others
    }
    return RankStudyReport(suite, study.task, list(study.ranks), points, p_reference_better, reference)


def rank_markdown(report: RankStudyReport) -> str:
    """``rank_study.md``: final return and AUC per method and rank, and P(reference better) per rank."""
    spec = score_format(point.final for by_rank in report.points.values() for point in by_rank.values())
    lines = [
        f"# Rank study of suite `{report.suite}` on {report.task}",
        "",
        "IQM over seeds with 95% stratified-bootstrap CIs; alpha = r at every rank. Normalized AUC: mean eval "
        "return over the budget (EVA's own env steps on its x-axis).",
        "",
        "| method | r | seeds | trainable params | final return | normalized AUC |",
        "|---|---|---|---|---|---|",
    ]
    for method, by_rank in report.points.items():
        for r, point in by_rank.items():
            lines.append(
                f"| {method} | {r} | {point.seeds} | {point.trainable_params:,} | {point.final.format(spec)} | "
                f"{point.auc.format(spec)} |"
            )
    if report.p_reference_better:
        lines += [
            "",
            f"P({report.reference}'s final return beats the method's), per rank:",
            "",
            "| method | " + " | ".join(f"r = {r}" for r in report.ranks) + " |",
            "|---|" + "---|" * len(report.ranks),
        ]
        for method, by_rank in report.p_reference_better.items():
            cells = [str(by_rank[r]) if r in by_rank else "-" for r in report.ranks]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_rank_study(report: RankStudyReport, path: Path) -> Path:
    """``rank_study.png``: IQM normalized AUC and final return against r (log scale), CI bars, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    offsets = np.linspace(-0.06, 0.06, max(len(report.points), 1))
    for offset, (method, by_rank) in zip(offsets, report.points.items()):
        ranks = np.array(list(by_rank), float)
        for axis, key in zip(axes, ("auc", "final")):
            values = [getattr(point, key) for point in by_rank.values()]
            estimate = np.array([v.estimate for v in values])
            # Methods side by side around each r (x is log2 r), so their CI bars do not hide each other.
            x = ranks * 2**offset
            axis.errorbar(
                x,
                estimate,
                yerr=[estimate - [v.low for v in values], [v.high for v in values] - estimate],
                marker="o",
                capsize=3,
                label=f"{method} ({max(p.seeds for p in by_rank.values())} seeds)",
            )
    for axis, label in zip(axes, ("normalized AUC (mean eval return over the budget)", "final eval return")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(report.ranks, [str(r) for r in report.ranks])
        axis.set_xlabel("LoRA rank r per layer (alpha = r)")
        axis.set_title(label, fontsize=9)
        axis.set_ylabel("IQM over seeds (95% CI)")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"rank study on {report.task} (suite {report.suite})", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
