"""Rank studies: adapter methods at several LoRA ranks on one task of a suite, IQM final return and normalized AUC
against the rank.

The paper behind EVA reports its largest RL gain at low rank; a rank study asks whether that holds here. A suite
file declares one (``rank_study:``) and ``compare.py --suite <name> --rank-study`` runs it: every method at every
``r`` (``alpha = r``, so the scaling stays 1) on the study's seeds, each run an ordinary resumable run. A run at
the rank the suite itself uses is the suite's own run folder, so it is not run twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eva_rl.errors import ConfigError
from eva_rl.experiments.machine import platform_line
from eva_rl.experiments.markdown import table, table_row
from eva_rl.experiments.plots import method_color, method_label, method_linestyle, new_figure, save_figure
from eva_rl.experiments.run_folder import UPDATES_REPORTED, RunResult, values_after_updates
from eva_rl.experiments.stats import (
    Interval,
    median_steps_to_threshold,
    normalized_auc,
    probability_of_improvement,
    score_format,
    steps_to_threshold,
    stratified_iqm,
)
from eva_rl.experiments.studies.base import Planned, Study
from eva_rl.experiments.suites import RankStudy, Suite
from eva_rl.files import atomic_write_json, atomic_write_text


@dataclass
class RankPoint:
    """One method at one rank, over its seeds: IQM with 95% stratified-bootstrap CIs.

    :ivar after_updates: ``{k: IQM score after k updates}`` for the k of
        :data:`~eva_rl.experiments.run_folder.UPDATES_REPORTED` at which every seed was evaluated.
    :ivar steps_to_threshold_median: Median env steps (EVA's own included) to the task's threshold; ``None`` where
        most seeds never reach it, or the study was given no threshold.
    :ivar reached_threshold: Seeds that reached it (``None``: no threshold given).
    """

    seeds: int
    final: Interval
    auc: Interval
    trainable_params: int
    after_updates: dict[int, Interval] = dataclasses.field(default_factory=dict)
    steps_to_threshold_median: float | None = None
    reached_threshold: int | None = None


@dataclass
class RankStudyReport:
    """A rank study's statistics: ``points[method][r]``, and per r the probability that the reference method's
    final return beats each other method's (``p_reference_better[method][r]``), and its normalized AUC
    (``p_reference_better_auc[method][r]``); and for every method but those two, the probability that it beats the
    baseline (``p_better_than_baseline[_auc][method][r]``: a control against plain LoRA)."""

    suite: str
    task: str
    ranks: list[int]
    points: dict[str, dict[int, RankPoint]]
    p_reference_better: dict[str, dict[int, Interval]]
    p_reference_better_auc: dict[str, dict[int, Interval]] = dataclasses.field(default_factory=dict)
    reference: str = "eva"
    platform: str = ""
    """The page's platform line (:func:`~eva_rl.experiments.machine.platform_line`)."""
    baseline: str = "lora"
    p_better_than_baseline: dict[str, dict[int, Interval]] = dataclasses.field(default_factory=dict)
    p_better_than_baseline_auc: dict[str, dict[int, Interval]] = dataclasses.field(default_factory=dict)
    threshold: float | None = None
    resamples: int = 2000
    p_reference_better_after: dict[int, dict[str, dict[int, Interval]]] = dataclasses.field(default_factory=dict)
    """``[k][method][r]``: the probability that the reference's score after k updates beats the method's."""

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "suite": self.suite,
            "task": self.task,
            "ranks": self.ranks,
            "methods": _by_method_and_rank(self.points),
            "reference": self.reference,
            f"p_{self.reference}_better_final": _by_method_and_rank(self.p_reference_better),
            f"p_{self.reference}_better_auc": _by_method_and_rank(self.p_reference_better_auc),
        }
        # the fields added later, written where they hold something, so that older pages read back unchanged
        if self.platform:
            data["platform"] = self.platform
        if self.threshold is not None:
            data["threshold"] = self.threshold
        data["resamples"] = self.resamples
        if self.p_reference_better_after:
            data[f"p_{self.reference}_better_after_updates"] = {
                str(k): _by_method_and_rank(p) for k, p in self.p_reference_better_after.items()
            }
        for score, p in (("final", self.p_better_than_baseline), ("auc", self.p_better_than_baseline_auc)):
            if p:
                data[f"p_better_than_{self.baseline}_{score}"] = _by_method_and_rank(p)
        return data


def _by_method_and_rank(table: dict[str, dict[int, Any]]) -> dict[str, dict[str, Any]]:
    """``{method: {r: dataclass}}`` as JSON: ranks as strings, each entry as a dict."""
    return {
        method: {str(r): dataclasses.asdict(entry) for r, entry in by_rank.items()} for method, by_rank in table.items()
    }


def _rank_point(
    results: Sequence[RunResult],
    finals: list[float],
    aucs: list[float],
    after: dict[int, list[float]],
    threshold: float | None,
    resamples: int,
) -> RankPoint:
    """One method at one rank from its seeds' results (and their final scores, AUCs and scores after k updates)."""
    point = RankPoint(
        len(results),
        stratified_iqm([finals], n_resamples=resamples),
        stratified_iqm([aucs], n_resamples=resamples),
        int(np.mean([result.trainable_params for result in results])),
        {k: stratified_iqm([values], n_resamples=resamples) for k, values in after.items()},
    )
    if threshold is not None:
        reached = [steps_to_threshold(*result.sample_curve(), threshold, result.budget) for result in results]
        point.steps_to_threshold_median = median_steps_to_threshold(reached)
        point.reached_threshold = sum(steps is not None for steps in reached)
    return point


def rank_report(
    suite: str,
    study: RankStudy,
    runs: Sequence[tuple[int, RunResult]],
    reference: str = "eva",
    baseline: str = "lora",
    threshold: float | None = None,
    resamples: int = 2000,
) -> RankStudyReport:
    """Aggregate ``(r, result)`` pairs; the AUC's horizon is the training budget, as in the suite's report.

    :param reference: The method the others are compared with, rank by rank.
    :param baseline: The method every method but the reference is compared with too.
    :param threshold: The task's threshold, for the env steps each point takes to reach it.
    :param resamples: Bootstrap resamples behind each CI (the suite's).
    """
    horizon = max(result.budget for _, result in runs)
    # Per method and rank: every seed's result, final return and AUC.
    results: dict[str, dict[int, list[RunResult]]] = {}
    finals: dict[str, dict[int, list[float]]] = {}
    aucs: dict[str, dict[int, list[float]]] = {}
    for r, result in runs:
        results.setdefault(result.method, {}).setdefault(r, []).append(result)
        finals.setdefault(result.method, {}).setdefault(r, []).append(result.budget_return)
        aucs.setdefault(result.method, {}).setdefault(r, []).append(normalized_auc(*result.sample_curve(), horizon))
    # and each seed's score after k updates (``[method][r][k]``), where every seed of the point was evaluated there
    after = {method: {r: values_after_updates(rs) for r, rs in by_rank.items()} for method, by_rank in results.items()}
    points = {
        method: {
            r: _rank_point(
                results[method][r], finals[method][r], aucs[method][r], after[method][r], threshold, resamples
            )
            for r in study.ranks
            if r in finals[method]
        }
        for method in study.methods
        if method in finals
    }

    # Rank by rank, the reference method against each other one, and each of the rest against the baseline.
    def better(scores: dict[str, dict[int, list[float]]], first: str, second: str) -> dict[int, Interval]:
        return {
            r: probability_of_improvement([scores[first][r]], [scores[second][r]], n_resamples=resamples)
            for r in study.ranks
            if r in scores[first] and r in scores[second]
        }

    others = [m for m in finals if m != reference] if reference in finals else []
    # the same after k updates: [k][method][r], for the counts the reference and every other method were evaluated at
    by_count = {
        k: {m: {r: counts[k] for r, counts in after[m].items() if k in counts} for m in [reference, *others]}
        for k in UPDATES_REPORTED
        if any(k in counts for counts in after.get(reference, {}).values())
    }
    controls = [m for m in finals if m not in (reference, baseline)] if baseline in finals else []
    return RankStudyReport(
        suite,
        study.task,
        list(study.ranks),
        points,
        {method: better(finals, reference, method) for method in others},
        {method: better(aucs, reference, method) for method in others},
        reference,
        platform_line(result.platform for _, result in runs),
        baseline,
        {method: better(finals, method, baseline) for method in controls},
        {method: better(aucs, method, baseline) for method in controls},
        threshold,
        resamples,
        {k: {method: better(scores, reference, method) for method in others} for k, scores in by_count.items()},
    )


def rank_markdown(report: RankStudyReport) -> str:
    """``rank_study.md``: final return, AUC, the score after k updates and the steps to the threshold per method and
    rank, and P(reference better) per rank."""
    spec = score_format(point.final for by_rank in report.points.values() for point in by_rank.values())
    lines = [
        f"# Rank study of suite `{report.suite}` on {report.task}",
        "",
        f"IQM over seeds with 95% stratified-bootstrap CIs ({report.resamples:,} resamples); alpha = r at every rank. "
        "EVA's own env steps come out of the training budget: final return where the budget ends, normalized AUC the "
        "mean eval return over it, steps to the threshold counting them. After k updates: the evaluation made after "
        "exactly k updates (EVA's own env steps make none)."
        + (f" Threshold: {report.threshold:g}." if report.threshold is not None else ""),
        "",
        report.platform,
        "",
    ]
    # one row per method and rank; the score after k updates where every seed was evaluated there, and the steps to
    # the threshold where the study was given one
    points = [point for by_rank in report.points.values() for point in by_rank.values()]
    counts = sorted({k for point in points for k in point.after_updates})
    threshold = any(point.reached_threshold is not None for point in points)
    columns = ["method", "r", "seeds", "trainable params", "final return", "normalized AUC"]
    columns += [f"after {k} updates" for k in counts]
    columns += ["steps to threshold (median)", "reached"] if threshold else []
    lines += table(columns)
    for method, by_rank in report.points.items():
        for r, point in by_rank.items():
            cells = [method, str(r), str(point.seeds), f"{point.trainable_params:,}"]
            cells += [point.final.format(spec), point.auc.format(spec)]
            cells += [point.after_updates[k].format(spec) if k in point.after_updates else "-" for k in counts]
            if threshold:
                median = point.steps_to_threshold_median
                cells.append(f"{median:,.0f}" if median is not None else "never")
                cells.append(f"{point.reached_threshold}/{point.seeds}")
            lines.append(table_row(cells))
    # then how often the reference beats each method, and each other method the baseline, one column per rank
    tables = {
        f"P({report.reference}'s final return beats the method's)": report.p_reference_better,
        f"P({report.reference}'s normalized AUC beats the method's)": report.p_reference_better_auc,
        **{
            f"P({report.reference}'s score after {k} updates beats the method's)": table
            for k, table in report.p_reference_better_after.items()
        },
        f"P(the method's final return beats {report.baseline}'s)": report.p_better_than_baseline,
        f"P(the method's normalized AUC beats {report.baseline}'s)": report.p_better_than_baseline_auc,
    }
    for title, p in tables.items():
        if not p:
            continue
        rows = [
            [method, *(str(by_rank[r]) if r in by_rank else "-" for r in report.ranks)] for method, by_rank in p.items()
        ]
        lines += ["", f"{title}, per rank:", "", *table(["method", *(f"r = {r}" for r in report.ranks)], rows)]
    return "\n".join(lines) + "\n"


def draw_rank_study(axes: Any, report: RankStudyReport) -> None:
    """IQM normalized AUC (left) and final return (right) against r (log scale), CI bars, one line per method."""
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
                color=method_color(method),
                linestyle=method_linestyle(method),
                label=method_label(method, max(p.seeds for p in by_rank.values())),
            )
    titles = ("normalized AUC (mean eval return over the budget)", "eval return where the budget ends")
    for axis, label in zip(axes, titles):
        axis.set_xscale("log", base=2)
        axis.set_xticks(report.ranks, [str(r) for r in report.ranks])
        axis.set_xlabel("LoRA rank r per layer (alpha = r)")
        axis.set_title(label, fontsize=9)
        axis.set_ylabel("IQM over seeds (95% CI)")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].figure.suptitle(f"rank study on {report.task} (suite {report.suite})", fontsize=10)


class RankStudyRuns(Study[RankStudyReport]):
    """A suite's rank study (``compare.py --suite NAME --rank-study``): ``rank_study.json``, ``rank_study.md`` and
    ``rank_study.png`` in ``<log_dir>/<suite>/``.

    A run at the rank (and alpha) the suite itself uses is the suite's own run (``<log_dir>/<suite>/``); the others
    go to ``<log_dir>/<suite>-ranks/r<r>/``.
    """

    def __init__(self, suite: Suite, log_dir: Path, echo: Callable[[str], None] = print) -> None:
        super().__init__(log_dir, echo)
        if suite.rank_study is None:
            raise ConfigError(f"suite {suite.name} has no rank_study (task, ranks, methods, seeds)")
        self.suite, self.study = suite, suite.rank_study
        self.title = f"suite {suite.name}'s rank study"

    @property
    def out_dir(self) -> Path:
        return self.log_dir / self.suite.name

    def plan(self) -> Planned:
        suite, study = self.suite, self.study
        suite_task = next(t for t in suite.tasks if t.task == study.task)
        planned = []
        for r in study.ranks:
            for seed in study.seed_list:
                for method in study.methods:
                    spec = suite.run_spec(suite_task, method, seed, self.log_dir / suite.name)
                    own = study.settings_at(method, r)  # tuned at this rank: the suite's own run only if it agrees
                    suite_own = suite.method_settings.get(method, {})
                    retuned = any(suite_own.get(key) != value for key, value in own.items())
                    if spec.task.lora.r != r or spec.task.lora.default_alpha != r or retuned:
                        ranked = {**suite.method_settings.get(method, {}), **own, **RankStudy.rank_overrides(r)}
                        base = self.log_dir / f"{suite.name}-ranks" / f"r{r}"
                        spec = suite.run_spec(suite_task, method, seed, base, settings=ranked)
                    planned.append((r, spec))
        return planned

    def score(self, key: int) -> str:
        return self.suite.score_of(self.study.task)

    def report(self, runs: list[tuple[int, RunResult]]) -> RankStudyReport:
        threshold = next(t.threshold for t in self.suite.tasks if t.task == self.study.task)
        return rank_report(self.suite.name, self.study, runs, threshold=threshold, resamples=self.suite.resamples)

    def write_page(self, report: RankStudyReport, runs: list[tuple[int, RunResult]]) -> list[Path]:
        out = self.out_dir
        atomic_write_json(out / "rank_study.json", report.to_dict())
        atomic_write_text(out / "rank_study.md", rank_markdown(report))
        figure, axes = new_figure(1, 2, figsize=(10, 4), dpi=120)
        draw_rank_study(axes, report)
        return [out / "rank_study.json", out / "rank_study.md", save_figure(figure, out / "rank_study.png")]
