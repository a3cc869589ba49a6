"""Aggregation of a suite's runs into typed statistics (written as ``results.json``), tables and plots."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eva_rl.eva_report import EvaReport
from eva_rl.experiments.runs import RunResult
from eva_rl.experiments.stats import (
    Interval,
    curve_at,
    iqm,
    normalized_auc,
    probability_of_improvement,
    score_format,
    steps_to_threshold,
    stratified_iqm,
)
from eva_rl.experiments.suites import Suite, SuiteTask
from eva_rl.methods import get_method


@dataclass
class MethodTaskStats:
    """One method on one task, over its seeds.

    :ivar final: IQM final eval return with its 95% stratified-bootstrap CI.
    :ivar auc: IQM normalized area under the eval curve (x-axis: env steps, EVA's own included).
    :ivar steps_to_threshold_median: Median env steps to the task's threshold (``None``: most seeds never reach it).
    :ivar reached_threshold: Seeds that reached the threshold.
    :ivar source_retention: IQM return back on the source env (``None`` when the task has no other source env).
    """

    seeds: int
    final: Interval
    jumpstart: float
    auc: Interval
    steps_to_threshold_median: float | None
    reached_threshold: int
    source_retention: float | None
    trainable_params: int
    wall_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MethodTaskStats:
        return cls(**{**data, "final": Interval(**data["final"]), "auc": Interval(**data["auc"])})


@dataclass
class TaskReport:
    """Every method on one task."""

    threshold: float
    methods: dict[str, MethodTaskStats]

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "methods": {m: s.to_dict() for m, s in self.methods.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskReport:
        methods = {m: MethodTaskStats.from_dict(s) for m, s in data["methods"].items()}
        return cls(data["threshold"], methods)


@dataclass
class MethodAggregate:
    """One method over every task it ran on.

    :ivar p_reference_better: Probability that the reference method's final return beats this one's, over the
        tasks both ran (``None`` for the reference itself); in JSON ``p_<reference>_better_final``.
    """

    tasks: list[str]
    final: Interval
    auc: Interval
    p_reference_better: Interval | None = None


@dataclass
class SuiteReport:
    """A suite's statistics, per task and over tasks; ``results.json`` is its :meth:`to_dict`."""

    suite: str
    tasks: dict[str, TaskReport] = field(default_factory=dict)
    aggregate: dict[str, MethodAggregate] = field(default_factory=dict)
    reference: str = "eva"

    @property
    def methods(self) -> list[str]:
        return list(self.aggregate)

    def to_dict(self) -> dict[str, Any]:
        aggregate = {}
        for method, entry in self.aggregate.items():
            row: dict[str, Any] = {
                "tasks": entry.tasks,
                "final": dataclasses.asdict(entry.final),
                "auc": dataclasses.asdict(entry.auc),
            }
            if entry.p_reference_better is not None:
                row[f"p_{self.reference}_better_final"] = dataclasses.asdict(entry.p_reference_better)
            aggregate[method] = row
        return {
            "suite": self.suite,
            "reference": self.reference,
            "tasks": {name: task.to_dict() for name, task in self.tasks.items()},
            "aggregate": aggregate,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SuiteReport:
        reference = data.get("reference", "eva")
        key = f"p_{reference}_better_final"
        aggregate = {
            method: MethodAggregate(
                row["tasks"],
                Interval(**row["final"]),
                Interval(**row["auc"]),
                Interval(**row[key]) if key in row else None,
            )
            for method, row in data["aggregate"].items()
        }
        tasks = {name: TaskReport.from_dict(task) for name, task in data["tasks"].items()}
        return cls(data["suite"], tasks, aggregate, reference)


def aggregate(suite: Suite, runs: Sequence[tuple[SuiteTask, RunResult]], reference: str = "eva") -> SuiteReport:
    """Per-task and suite-level statistics of every method."""
    by_task: dict[str, dict[str, list[RunResult]]] = {}
    thresholds = {}
    for suite_task, result in runs:
        by_task.setdefault(suite_task.task, {}).setdefault(result.method, []).append(result)
        thresholds[suite_task.task] = suite_task.threshold
    seen = {result.method for _, result in runs}
    methods = [m for m in suite.methods if m in seen] + sorted(seen - set(suite.methods))
    report = SuiteReport(suite.name, reference=reference)
    scores: dict[str, dict[str, dict[str, list[float]]]] = {m: {"final": {}, "auc": {}} for m in methods}
    for task_name, per_method in by_task.items():
        threshold = thresholds[task_name]
        horizon = max(r.sample_curve()[0][-1] for rs in per_method.values() for r in rs)
        task_report = TaskReport(threshold, {})
        for method in methods:
            results = per_method.get(method, [])
            if not results:
                continue
            finals = [r.final_return for r in results]
            aucs = [normalized_auc(*r.sample_curve(), horizon=horizon) for r in results]
            reached = [steps_to_threshold(*r.sample_curve(), threshold) for r in results]
            steps = [s if s is not None else np.inf for s in reached]
            sources = [r.source_return for r in results if r.source_return is not None]
            task_report.methods[method] = MethodTaskStats(
                seeds=len(results),
                final=stratified_iqm([finals]),
                jumpstart=float(iqm([r.jumpstart for r in results])),
                auc=stratified_iqm([aucs]),
                steps_to_threshold_median=None if np.isinf(np.median(steps)) else float(np.median(steps)),
                reached_threshold=sum(s is not None for s in reached),
                source_retention=float(iqm(sources)) if sources else None,
                trainable_params=int(np.mean([r.trainable_params for r in results])),
                wall_seconds=float(np.mean([r.wall_seconds for r in results])),
            )
            scores[method]["final"][task_name] = finals
            scores[method]["auc"][task_name] = aucs
        report.tasks[task_name] = task_report
    for method in methods:
        entry = MethodAggregate(
            sorted(scores[method]["final"]),
            stratified_iqm(list(scores[method]["final"].values())),
            stratified_iqm(list(scores[method]["auc"].values())),
        )
        # Over the tasks both ran, so a method run on fewer tasks is compared on its own tasks only.
        common = [t for t in scores[method]["final"] if t in scores.get(reference, {}).get("final", {})]
        if method != reference and common:
            entry.p_reference_better = probability_of_improvement(
                [scores[reference]["final"][t] for t in common], [scores[method]["final"][t] for t in common]
            )
        report.aggregate[method] = entry
    return report


def results_markdown(report: SuiteReport) -> str:
    """``results.md``: a table per task and one for the suite."""
    lines = [
        f"# Suite `{report.suite}`",
        "",
        "IQM over seeds with 95% stratified-bootstrap CIs. Steps include EVA's own environment steps. "
        "wall s: mean wall-clock seconds of a run (evaluations included).",
        "",
    ]
    for task_name, task in report.tasks.items():
        lines += [
            f"## {task_name} (threshold {task.threshold})",
            "",
            "| method | seeds | jumpstart | final return | normalized AUC | steps to threshold (median) | reached | "
            "source retention | trainable params | wall s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        spec = score_format(row.final for row in task.methods.values())
        for method, row in task.methods.items():
            retention = "n/a" if row.source_retention is None else f"{row.source_retention:{spec}}"
            median = row.steps_to_threshold_median
            steps = "never" if median is None else f"{median:,.0f}"
            lines.append(
                f"| {method} | {row.seeds} | {row.jumpstart:{spec}} | {row.final.format(spec)} | "
                f"{row.auc.format(spec)} | {steps} | {row.reached_threshold}/{row.seeds} | {retention} | "
                f"{row.trainable_params:,} | {row.wall_seconds:.0f} |"
            )
        lines.append("")
    lines += [
        "## All tasks",
        "",
        f"IQM over seeds and the tasks each method ran on; P({report.reference} better) compares on those tasks.",
        "",
        f"| method | tasks | final return | normalized AUC | P({report.reference} better), final |",
        "|---|---|---|---|---|",
    ]
    spec = score_format(row.final for row in report.aggregate.values())
    for method, row in report.aggregate.items():
        poi = row.p_reference_better
        lines.append(
            f"| {method} | {len(row.tasks)} | {row.final.format(spec)} | {row.auc.format(spec)} | "
            f"{poi if poi else '-'} |"
        )
    return "\n".join(lines) + "\n"


def _iqm_curve(task_runs: Sequence[RunResult], method: str, grid: np.ndarray) -> tuple[np.ndarray, ...] | None:
    """``(x, IQM, CI low, CI high)`` of a method's eval curves on ``grid``, or ``None`` if it has no run here."""
    curves = np.array([curve_at(*r.sample_curve(), grid) for r in task_runs if r.method == method])
    if not len(curves):
        return None
    started = ~np.isnan(curves).any(axis=0)
    intervals = [stratified_iqm([curves[:, j]], n_resamples=500) for j in np.flatnonzero(started)]
    return (
        grid[started],
        np.array([i.estimate for i in intervals]),
        np.array([i.low for i in intervals]),
        np.array([i.high for i in intervals]),
    )


_OVERLAID_METHODS = 4
"""Up to this many methods share one panel per task; more get one small panel each (a legend of ten overlapping
curves is unreadable)."""


def _plot_sample_efficiency(
    plt: Any,
    report: SuiteReport,
    runs: Sequence[tuple[SuiteTask, RunResult]],
    tasks: list[str],
    methods: list[str],
    colors: dict[str, str],
    seeds: dict[str, int],
    path: Path,
) -> Path:
    """IQM eval curves with CI bands per task: overlaid for a few methods, else small multiples (a row per task, a
    panel per method, the reference method's curve in grey dashes in each for comparison)."""
    grids = {}
    for task_name in tasks:
        task_runs = [r for t, r in runs if t.task == task_name]
        grids[task_name] = (task_runs, np.linspace(0, max(r.sample_curve()[0][-1] for r in task_runs), 40))
    overlaid = len(methods) <= _OVERLAID_METHODS
    columns = 1 if overlaid else len(methods)
    figure, axes = plt.subplots(
        len(tasks) if not overlaid else 1,
        len(tasks) if overlaid else columns,
        figsize=(5.5 * len(tasks), 4.0) if overlaid else (2.3 * columns, 2.3 * len(tasks) + 0.6),
        dpi=120,
        squeeze=False,
        sharey="row",
    )
    # Full fine-tuning (every weight from the pretrained ones) is the curve each method is held against.
    reference = next(
        (m for m in methods if get_method(m).trains == "all" and get_method(m).pretrained), report.reference
    )
    for row, task_name in enumerate(tasks):
        task_runs, grid = grids[task_name]
        if overlaid:
            axis = axes[0][row]
            for method in methods:
                curve = _iqm_curve(task_runs, method, grid)
                if curve is None:
                    continue
                x, estimate, low, high = curve
                axis.plot(x, estimate, color=colors[method], label=f"{method} ({seeds[method]} seeds)")
                axis.fill_between(x, low, high, color=colors[method], alpha=0.2)
            axis.set_title(task_name)
            axis.set_xlabel("environment steps (EVA's included)")
            axis.set_ylabel("eval return (IQM, 95% CI)")
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8, loc="lower right")
            continue
        base = _iqm_curve(task_runs, reference, grid)
        for column, method in enumerate(methods):
            axis = axes[row][column]
            curve = _iqm_curve(task_runs, method, grid)
            axis.grid(alpha=0.3)
            axis.tick_params(labelsize=6)
            if row == 0:
                axis.set_title(method, fontsize=9)
            if column == 0:
                axis.set_ylabel(task_name, fontsize=8)
            if curve is None:
                axis.text(0.5, 0.5, "not run", ha="center", va="center", transform=axis.transAxes, fontsize=8)
                continue
            if base is not None and method != reference:
                axis.plot(base[0], base[1], color="grey", linestyle="--", linewidth=1)
            x, estimate, low, high = curve
            axis.plot(x, estimate, color=colors[method])
            axis.fill_between(x, low, high, color=colors[method], alpha=0.25)
            runs_here = len({r.seed for r in task_runs if r.method == method})
            axis.text(0.97, 0.05, f"{runs_here} seeds", ha="right", transform=axis.transAxes, fontsize=7)
    if not overlaid:
        figure.suptitle(f"eval return (IQM, 95% CI) against environment steps; grey dashes: {reference}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_suite(
    report: SuiteReport, runs: Sequence[tuple[SuiteTask, RunResult]], out_dir: Path, log_dir: Path
) -> list[Path]:
    """``sample_efficiency.png`` (IQM curves with CI bands), ``final_return.png``, ``eva_ranks.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(report.tasks)
    methods = report.methods
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {method: palette[i % len(palette)] for i, method in enumerate(methods)}
    seeds = {method: len({r.seed for _, r in runs if r.method == method}) for method in methods}
    paths = [
        _plot_sample_efficiency(plt, report, runs, tasks, methods, colors, seeds, out_dir / "sample_efficiency.png")
    ]

    def where(method: str) -> str:
        ran = report.aggregate[method].tasks
        return "every task" if len(ran) == len(tasks) else ", ".join(ran)

    figure, axis = plt.subplots(figsize=(7.5, 0.5 * len(methods) + 1.7), dpi=120)
    for row, method in enumerate(methods):
        final = report.aggregate[method].final
        axis.errorbar(
            final.estimate,
            row,
            xerr=[[final.estimate - final.low], [final.high - final.estimate]],
            fmt="o",
            color=colors[method],
            capsize=4,
        )
    labels = [f"{method}\n{where(method)}, {seeds[method]} seeds" for method in methods]
    axis.set_yticks(range(len(methods)), labels, fontsize=8)
    axis.invert_yaxis()
    axis.set_xlabel("final eval return, IQM over the seeds and tasks each ran (95% CI)")
    axis.set_title("each method pools the tasks and seeds its label names", fontsize=9)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    paths.append(out_dir / "final_return.png")
    figure.savefig(paths[-1])
    plt.close(figure)

    rank_sums: dict[str, list[float]] = {}
    for task_name in tasks:
        for eva_json in sorted((log_dir / task_name / "eva").glob("seed*/eva.json")):
            for layer, rank in EvaReport.from_dict(json.loads(eva_json.read_text())).ranks.items():
                rank_sums.setdefault(f"{task_name}: {layer}" if len(tasks) > 1 else layer, []).append(rank)
    if rank_sums:
        names = list(rank_sums)
        figure, axis = plt.subplots(figsize=(6.5, 0.3 * len(names) + 1.2), dpi=120)
        axis.barh(
            range(len(names)),
            [np.mean(rank_sums[n]) for n in names],
            xerr=[np.std(rank_sums[n]) for n in names],
            color="#4c72b0",
        )
        axis.set_yticks(range(len(names)), names, fontsize=7)
        axis.invert_yaxis()
        axis.set_xlabel("EVA rank (mean ± std over seeds)")
        figure.tight_layout()
        paths.append(out_dir / "eva_ranks.png")
        figure.savefig(paths[-1])
        plt.close(figure)
    return paths
