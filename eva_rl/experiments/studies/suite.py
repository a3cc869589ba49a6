"""The suite study (``compare.py --suite NAME``): every method x seed x task of a suite, aggregated into typed
statistics (``results.json``), tables (``results.md``) and figures (``sample_efficiency.png``, ``final_return.png``,
``eva_ranks.png``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eva_rl.eva_report import EvaReport
from eva_rl.experiments.contrasts import (
    AUC,
    FINAL,
    ContrastStats,
    after_key,
    contrast_stats,
    contrasts_markdown,
    on_one_task,
)
from eva_rl.experiments.execute import Executor
from eva_rl.experiments.machine import platform_line
from eva_rl.experiments.markdown import table, table_row
from eva_rl.experiments.plots import (
    method_color,
    method_label,
    method_linestyle,
    new_figure,
    save_figure,
    value_label,
)
from eva_rl.experiments.published import PublishedScores, published_notes
from eva_rl.experiments.run_folder import UPDATES_REPORTED, RunFolder, RunResult, values_after_updates
from eva_rl.experiments.stats import (
    Interval,
    curve_at,
    iqm,
    median_steps_to_threshold,
    normalized_auc,
    probability_of_improvement,
    score_format,
    steps_to_threshold,
    stratified_iqm,
    stratified_mean,
)
from eva_rl.experiments.studies.base import Planned, Study
from eva_rl.experiments.suites import Suite, SuiteTask
from eva_rl.experiments.tasks import check_seeds
from eva_rl.files import atomic_write_json, atomic_write_text
from eva_rl.methods import get_method


@dataclass
class MethodTaskStats:
    """One method on one task, over its seeds.

    :ivar final: IQM final eval return with its 95% stratified-bootstrap CI.
    :ivar auc: IQM normalized area under the eval curve (x-axis: env steps, EVA's own included).
    :ivar steps_to_threshold_median: Median env steps to the task's threshold (``None``: most seeds never reach it).
    :ivar reached_threshold: Seeds that reached the threshold.
    :ivar source_retention: IQM return back on the source env (``None`` when the task has no other source env).
    :ivar source_retention_ci: The same with its 95% CI (``None`` in reports written before it was recorded).
    :ivar after_updates: ``{k: IQM eval return after k updates}`` for k in :data:`UPDATES_REPORTED` where every seed
        was evaluated exactly there (an on-policy run whose eval frequency is a multiple of its rollout); empty
        otherwise.
    :ivar p_reference_better: Probability that a run of the report's reference method (EVA) scores a higher final
        return on this task than a run of this one (``None`` for the reference itself, or where it did not run here).
    :ivar p_reference_better_auc: The same on the normalized AUC.
    :ivar learning_rates: The distinct learning rates its runs were made at (empty where no run recorded one).
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
    after_updates: dict[int, Interval] = field(default_factory=dict)
    source_retention_ci: Interval | None = None
    p_reference_better: Interval | None = None
    p_reference_better_auc: Interval | None = None
    learning_rates: list[Any] = field(default_factory=list)

    _OPTIONAL_INTERVALS = ("source_retention_ci", "p_reference_better", "p_reference_better_auc")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        # written only where there are any, so a report written before them reads back unchanged
        data.pop("after_updates")
        if not self.learning_rates:
            data.pop("learning_rates")
        if self.after_updates:
            data["after_updates"] = {str(k): dataclasses.asdict(v) for k, v in self.after_updates.items()}
        for name in self._OPTIONAL_INTERVALS:
            if getattr(self, name) is None:
                data.pop(name)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MethodTaskStats:
        after = {int(k): Interval(**v) for k, v in data.get("after_updates", {}).items()}
        fields = {**data, "final": Interval(**data["final"]), "auc": Interval(**data["auc"]), "after_updates": after}
        for name in cls._OPTIONAL_INTERVALS:
            if data.get(name) is not None:
                fields[name] = Interval(**data[name])
        return cls(**fields)


def run_learning_rates(results: Sequence[RunResult]) -> list[Any]:
    """The distinct learning rates ``results`` were made at, as each recorded it (a number, or a schedule's name),
    numbers first and ascending; runs that recorded none are left out."""
    return distinct_rates(result.hyperparameters.get("learning_rate") for result in results)


def distinct_rates(values: Iterable[Any]) -> list[Any]:
    """The distinct learning rates among ``values``, numbers first and ascending, then schedules' names; ``None``
    (a run that recorded none) left out."""
    rates = set(values)
    rates.discard(None)
    numbers = sorted(rate for rate in rates if isinstance(rate, int | float))
    return numbers + sorted(str(rate) for rate in rates if not isinstance(rate, int | float))


def rate_cell(rates: Sequence[Any]) -> str:
    """A page's rate cell: the one rate, ``1e-4 / 2.5e-4`` where runs differ, ``-`` where none recorded it."""
    return " / ".join(value_label(rate) if isinstance(rate, int | float) else str(rate) for rate in rates) or "-"


@dataclass
class TaskReport:
    """Every method on one task."""

    threshold: float
    methods: dict[str, MethodTaskStats]
    score: str = "return"
    rewardless: bool = False
    """Whether every evaluation of every run returned exactly 0, whatever the page scores: the env's reward never
    left 0 there (Meta-World v3's shelf-place pays nothing until the gripper cages the block)."""

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "threshold": self.threshold,
            "methods": {m: s.to_dict() for m, s in self.methods.items()},
        }
        # written where they differ from the default, so reports written before them read back unchanged
        if self.score != "return":
            data["score"] = self.score
        if self.rewardless:
            data["rewardless"] = True
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskReport:
        methods = {m: MethodTaskStats.from_dict(s) for m, s in data["methods"].items()}
        return cls(data["threshold"], methods, data.get("score", "return"), data.get("rewardless", False))


@dataclass
class MethodAggregate:
    """One method over every task it ran on.

    :ivar p_reference_better: Probability that the reference method's final return beats this one's, over the
        tasks both ran (``None`` for the reference itself); in JSON ``p_<reference>_better_final``.
    :ivar final_normalized: IQM over seeds and tasks of the final return normalized per task,
        ``(s - zero-shot) / (full's IQM - zero-shot)`` (:func:`task_normalizers`); ``None`` without such a task.
    :ivar auc_normalized: The same for the normalized AUC.
    """

    tasks: list[str]
    final: Interval
    auc: Interval
    p_reference_better: Interval | None = None
    final_normalized: Interval | None = None
    auc_normalized: Interval | None = None


NORMALIZER = "full"
"""The method whose IQM per task is 1 on the normalized scale (rliable's min-max normalization, with the pretrained
agent's zero-shot return as the minimum and tuned full fine-tuning at the same budget as the maximum)."""


def task_normalizers(report: SuiteReport) -> dict[str, tuple[float, float, float]]:
    """``{task: (zero-shot return, full's IQM final return, full's IQM AUC)}`` for the tasks where full fine-tuning
    ran and ended above the zero-shot return (elsewhere the scale has no width, and the task is left out)."""
    normalizers = {}
    for name, task in report.tasks.items():
        full = task.methods.get(NORMALIZER)
        if full is not None and full.final.estimate > full.jumpstart and full.auc.estimate > full.jumpstart:
            normalizers[name] = (full.jumpstart, full.final.estimate, full.auc.estimate)
    return normalizers


@dataclass
class PublishedComparison:
    """The page's figures beside a paper's (the suite's ``published:``).

    :ivar published: The paper's figures, what they are and how its setting differs.
    :ivar means: ``{method: mean over its tasks of the mean final score over seeds}`` with a stratified-bootstrap CI:
        the statistic a paper's "mean success over the tasks" is.
    :ivar tasks: ``{method: number of tasks behind its mean}``.
    :ivar common_seeds: The seeds that every method run on every task has on every task, where some runs lie outside
        them (a suite under way, or tasks with more seeds): the balanced design a paper's table reports.
    :ivar common_means: Each such method's mean over those seeds alone, as :attr:`means` (empty with no
        :attr:`common_seeds`).
    """

    published: PublishedScores
    means: dict[str, Interval]
    tasks: dict[str, int]
    common_seeds: list[int] = field(default_factory=list)
    common_means: dict[str, Interval] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = {
            **dataclasses.asdict(self.published),
            "means": {method: dataclasses.asdict(mean) for method, mean in self.means.items()},
            "tasks": self.tasks,
        }
        if self.common_seeds:  # written where there are some, so the pages made before read back unchanged
            data["common_seeds"] = self.common_seeds
            data["common_means"] = {method: dataclasses.asdict(mean) for method, mean in self.common_means.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PublishedComparison:
        fields = {key: data[key] for key in ("source", "statistic", "setting", "scores")}
        means = {method: Interval(**mean) for method, mean in data["means"].items()}
        common = {method: Interval(**mean) for method, mean in data.get("common_means", {}).items()}
        return cls(PublishedScores(**fields), means, dict(data["tasks"]), list(data.get("common_seeds", [])), common)


def published_comparison(
    published: PublishedScores,
    by_task: Mapping[str, Mapping[str, Sequence[RunResult]]],
    methods: Sequence[str],
    resamples: int,
) -> PublishedComparison:
    """Each method's mean over tasks of its mean final score over seeds, beside ``published``; and, where some runs
    lie outside the seeds every method run on every task has there, the same over those seeds alone.

    :param by_task: ``{task: {method: its runs there}}``.
    """

    def finals(method: str, seeds: Sequence[int] | None = None) -> list[list[float]]:
        """The method's final scores per task it ran, of ``seeds`` only where given."""
        return [
            [r.budget_return for r in runs[method] if seeds is None or r.seed in seeds]
            for runs in by_task.values()
            if runs.get(method)
        ]

    ran = {m: values for m in methods if (values := finals(m))}
    means = {m: stratified_mean(values, n_resamples=resamples) for m, values in ran.items()}
    tasks = {m: len(values) for m, values in ran.items()}
    everywhere = [m for m in methods if tasks.get(m) == len(by_task)]
    seeds = [{r.seed for r in runs[m]} for runs in by_task.values() for m in everywhere]
    common = sorted(set.intersection(*seeds)) if seeds else []
    if not common or all(found == set(common) for found in seeds):
        return PublishedComparison(published, means, tasks)
    common_means = {m: stratified_mean(finals(m, common), n_resamples=resamples) for m in everywhere}
    return PublishedComparison(published, means, tasks, common, common_means)


@dataclass
class SuiteReport:
    """A suite's statistics, per task and over tasks; ``results.json`` is its :meth:`to_dict`."""

    suite: str
    tasks: dict[str, TaskReport] = field(default_factory=dict)
    aggregate: dict[str, MethodAggregate] = field(default_factory=dict)
    reference: str = "eva"
    platform: str = ""
    """The page's platform line (:func:`~eva_rl.experiments.machine.platform_line`)."""
    resamples: int = 2000
    """Bootstrap resamples behind the CIs (:attr:`~eva_rl.experiments.suites.Suite.resamples`)."""
    contrasts: list[ContrastStats] = field(default_factory=list)
    """Each method against its control (:func:`~eva_rl.experiments.contrasts.contrast_stats`)."""
    published: PublishedComparison | None = None
    """The page beside a paper's figures, where the suite gives them."""
    sharing: str = ""
    """One line naming the page's runs that are another suite's (:attr:`~eva_rl.experiments.suites.Suite.shares`)."""

    @property
    def methods(self) -> list[str]:
        return list(self.aggregate)

    @property
    def score(self) -> str:
        """What the tasks' pages compare: ``"return"``, ``"success"``, or ``"score"`` where the tasks differ."""
        scores = {task.score for task in self.tasks.values()}
        return scores.pop() if len(scores) == 1 else "score"

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
            for name in ("final_normalized", "auc_normalized"):
                if getattr(entry, name) is not None:
                    row[name] = dataclasses.asdict(getattr(entry, name))
            aggregate[method] = row
        return {
            "suite": self.suite,
            "reference": self.reference,
            "tasks": {name: task.to_dict() for name, task in self.tasks.items()},
            "aggregate": aggregate,
            **({"platform": self.platform} if self.platform else {}),
            **({"resamples": self.resamples} if self.resamples != 2000 else {}),
            **({"contrasts": [c.to_dict() for c in self.contrasts]} if self.contrasts else {}),
            **({"published": self.published.to_dict()} if self.published else {}),
            **({"sharing": self.sharing} if self.sharing else {}),
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
                Interval(**row["final_normalized"]) if "final_normalized" in row else None,
                Interval(**row["auc_normalized"]) if "auc_normalized" in row else None,
            )
            for method, row in data["aggregate"].items()
        }
        tasks = {name: TaskReport.from_dict(task) for name, task in data["tasks"].items()}
        contrasts = [ContrastStats.from_dict(c) for c in data.get("contrasts", [])]
        resamples = data.get("resamples", 2000)
        published = PublishedComparison.from_dict(data["published"]) if "published" in data else None
        platform = data.get("platform", "")
        sharing = data.get("sharing", "")
        return cls(data["suite"], tasks, aggregate, reference, platform, resamples, contrasts, published, sharing)


def aggregate(suite: Suite, runs: Sequence[tuple[SuiteTask, RunResult]], reference: str = "eva") -> SuiteReport:
    """Per-task and suite-level statistics of every method (CIs from ``suite.resamples`` bootstrap resamples)."""
    resamples = suite.resamples
    by_task: dict[str, dict[str, list[RunResult]]] = {}
    thresholds, scores_of = {}, {}
    for suite_task, result in runs:
        by_task.setdefault(suite_task.task, {}).setdefault(result.method, []).append(result)
        thresholds[suite_task.task] = suite_task.threshold
        scores_of[suite_task.task] = suite_task.score
    seen = {result.method for _, result in runs}
    methods = [m for m in suite.methods if m in seen] + sorted(seen - set(suite.methods))
    platform = platform_line(r.platform for _, r in runs)
    report = SuiteReport(suite.name, reference=reference, platform=platform, resamples=resamples)
    scores: dict[str, dict[str, dict[str, list[float]]]] = {m: {FINAL: {}, AUC: {}} for m in methods}
    for task_name, per_method in by_task.items():
        threshold = thresholds[task_name]
        horizon = max(r.budget for rs in per_method.values() for r in rs)
        rewardless = all(value == 0 for rs in per_method.values() for r in rs for value in r.eval_returns)
        task_report = TaskReport(threshold, {}, scores_of[task_name], rewardless)
        for method in methods:
            results = per_method.get(method, [])
            if not results:
                continue
            finals = [r.budget_return for r in results]
            aucs = [normalized_auc(*r.sample_curve(), horizon=horizon) for r in results]
            reached = [steps_to_threshold(*r.sample_curve(), threshold, r.budget) for r in results]
            sources = [r.source_return for r in results if r.source_return is not None]
            after = values_after_updates(results)
            task_report.methods[method] = MethodTaskStats(
                seeds=len(results),
                final=stratified_iqm([finals], n_resamples=resamples),
                jumpstart=float(iqm([r.jumpstart for r in results])),
                auc=stratified_iqm([aucs], n_resamples=resamples),
                steps_to_threshold_median=median_steps_to_threshold(reached),
                reached_threshold=sum(s is not None for s in reached),
                source_retention=float(iqm(sources)) if sources else None,
                trainable_params=int(np.mean([r.trainable_params for r in results])),
                wall_seconds=float(np.mean([r.wall_seconds for r in results])),
                after_updates={k: stratified_iqm([v], n_resamples=resamples) for k, v in after.items()},
                source_retention_ci=stratified_iqm([sources], n_resamples=resamples) if sources else None,
                learning_rates=run_learning_rates(results),
            )
            scores[method][FINAL][task_name] = finals
            scores[method][AUC][task_name] = aucs
            for k, values in after.items():
                scores[method].setdefault(after_key(k), {})[task_name] = values
        _compare_with_reference(task_report, scores, task_name, reference, resamples)
        report.tasks[task_name] = task_report
    for method in methods:
        entry = MethodAggregate(
            sorted(scores[method][FINAL]),
            stratified_iqm(list(scores[method][FINAL].values()), n_resamples=resamples),
            stratified_iqm(list(scores[method][AUC].values()), n_resamples=resamples),
        )
        # Over the tasks both ran, so a method run on fewer tasks is compared on its own tasks only.
        common = [t for t in scores[method][FINAL] if t in scores.get(reference, {}).get(FINAL, {})]
        if method != reference and common:
            entry.p_reference_better = probability_of_improvement(
                [scores[reference][FINAL][t] for t in common],
                [scores[method][FINAL][t] for t in common],
                n_resamples=resamples,
            )
        report.aggregate[method] = entry
    _normalize_aggregates(report, scores, resamples)
    report.contrasts = contrast_stats(scores, UPDATES_REPORTED, resamples, reference=reference)
    if suite.published is not None:
        report.published = published_comparison(suite.published, by_task, methods, resamples)
    return report


def _compare_with_reference(
    task: TaskReport,
    scores: Mapping[str, Mapping[str, Mapping[str, list[float]]]],
    name: str,
    reference: str,
    resamples: int,
) -> None:
    """Each method's P(a run of ``reference`` scores higher) on task ``name``, on final return and AUC."""
    if reference not in task.methods:
        return
    for method, row in task.methods.items():
        if method != reference:
            versus = on_one_task(scores[reference], scores[method], name, resamples)
            row.p_reference_better, row.p_reference_better_auc = versus[FINAL], versus[AUC]


def _normalize_aggregates(
    report: SuiteReport, scores: dict[str, dict[str, dict[str, list[float]]]], resamples: int
) -> None:
    """Each method's pooled IQMs on the per-task normalized scale (:func:`task_normalizers`), so a task with large
    returns does not outweigh one with small ones."""
    normalizers = task_normalizers(report)
    for method, entry in report.aggregate.items():
        tasks = [t for t in scores[method][FINAL] if t in normalizers]
        if not tasks:
            continue
        finals, aucs = [], []
        for task in tasks:
            zero, full_final, full_auc = normalizers[task]
            finals.append([(s - zero) / (full_final - zero) for s in scores[method][FINAL][task]])
            aucs.append([(s - zero) / (full_auc - zero) for s in scores[method][AUC][task]])
        entry.final_normalized = stratified_iqm(finals, n_resamples=resamples)
        entry.auc_normalized = stratified_iqm(aucs, n_resamples=resamples)


def _after_updates_table(task: TaskReport, spec: str) -> list[str]:
    """The score (return or success rate) after each reported update count, for the methods evaluated there (none: no
    table)."""
    counts = sorted({k for row in task.methods.values() for k in row.after_updates})
    if not counts:
        return []
    lines = [
        f"Eval {task.score} after k updates (IQM [95% CI]; an evaluation at exactly that step, EVA's own env steps "
        "aside):",
        "",
    ]
    rows = [
        [method, *(row.after_updates[k].format(spec) if k in row.after_updates else "-" for k in counts)]
        for method, row in task.methods.items()
    ]
    return [*lines, *table(["method", *(f"after {k}" for k in counts)], rows), ""]


def results_markdown(report: SuiteReport, sensitivity: str | None = None) -> str:
    """``results.md``: a table per task and one for the suite.

    :param sensitivity: The tuning sweep's sensitivity plot, relative to the page, shown under the opening.
    """
    lines = [
        f"# Suite `{report.suite}`",
        "",
        f"IQM over seeds with 95% stratified-bootstrap CIs ({report.resamples:,} resamples). Steps include EVA's own "
        "environment steps, and they come out of the training budget: the final return is the eval return where the "
        "budget ends (interpolated between two evaluations where EVA's steps moved them), the normalized AUC the mean "
        "eval return over the budget (the pretrained policy's while EVA collects). "
        "rate: the learning rate its runs were made at. wall s: mean wall-clock seconds of a run (evaluations "
        "included).",
        "",
        report.platform,
        "",
        *([report.sharing, ""] if report.sharing else []),
    ]
    if sensitivity is not None:
        lines += [
            "Each method's rate is the best of the suite's tuning sweep (on its tuning seeds, apart from the result "
            "seeds) where the suite file took that choice; a method the sweep did not tune runs at the rate the suite "
            "file names. The sweep's final score and normalized AUC against the learning rate, one line per method "
            f"([tuning.json]({Path(sensitivity).parent.as_posix()}/tuning.json)):",
            "",
            f"![learning-rate sensitivity of the suite's tuning sweep]({sensitivity})",
            "",
        ]
    # A page without its reference method (a page of two controls) has nothing for its P(... better) columns.
    compared = report.reference in report.aggregate
    versus = [f"P({report.reference} better), final", f"P({report.reference} better), AUC"] if compared else []
    for task_name, task in report.tasks.items():
        columns = ["method", "seeds", "rate", "jumpstart", f"final {task.score}", "normalized AUC", *versus]
        columns += ["steps to threshold (median)", "reached", "source retention", "trainable params", "wall s"]
        lines += [f"## {task_name} (threshold {task.threshold})", "", *table(columns)]
        spec = score_format(row.final for row in task.methods.values())
        for method, row in task.methods.items():
            retention = "n/a" if row.source_retention is None else f"{row.source_retention:{spec}}"
            if row.source_retention_ci is not None:
                retention = row.source_retention_ci.format(spec)
            median = row.steps_to_threshold_median
            steps = "never" if median is None else f"{median:,.0f}"
            p_cells = [str(p) if p is not None else "-" for p in (row.p_reference_better, row.p_reference_better_auc)]
            cells = [method, str(row.seeds), rate_cell(row.learning_rates), f"{row.jumpstart:{spec}}"]
            cells += [row.final.format(spec), row.auc.format(spec), *(p_cells if compared else [])]
            cells += [steps, f"{row.reached_threshold}/{row.seeds}", retention, f"{row.trainable_params:,}"]
            lines.append(table_row([*cells, f"{row.wall_seconds:.0f}"]))
        lines.append("")
        if task.rewardless:
            lines += [
                "Every evaluation of every run on this task returned exactly 0: the policies never reached the part "
                "of the task the env rewards, so its scores cannot tell the methods apart.",
                "",
            ]
        lines += _after_updates_table(task, spec)
    # Then every method over the tasks it ran.
    columns = ["method", "tasks", f"final {report.score}", "normalized AUC", *versus[:1]]
    columns += ["final, task-normalized", "AUC, task-normalized"]
    lines += [
        "## All tasks",
        "",
        "IQM over seeds and the tasks each method ran on"
        + (f"; P({report.reference} better) compares on those tasks." if compared else "."),
        "",
        *table(columns),
    ]
    spec = score_format(row.final for row in report.aggregate.values())
    for method, row in report.aggregate.items():
        poi = row.p_reference_better
        normalized = [
            "-" if interval is None else interval.format(".3f")
            for interval in (row.final_normalized, row.auc_normalized)
        ]
        versus_cells = [str(poi) if poi else "-"] if compared else []
        cells = [method, str(len(row.tasks)), row.final.format(spec), row.auc.format(spec), *versus_cells]
        lines.append(table_row([*cells, *normalized]))
    normalizers = task_normalizers(report)
    scale = "; ".join(f"{task} {zero:{spec}} -> {final:{spec}}" for task, (zero, final, _) in normalizers.items())
    lines += [
        "",
        "Task-normalized: each run's score as (score - zero-shot) / (full fine-tuning's IQM - zero-shot) on its task,"
        " then the IQM over seeds and tasks: 0 is the pretrained agent, 1 is full fine-tuning. Zero-shot -> full's"
        f" final {report.score}: {scale or 'no task (full fine-tuning did not run, or did not beat zero-shot)'}.",
        "",
        *_published_markdown(report),
        *contrasts_markdown(report.contrasts, _rate_cells(report)),
    ]
    return "\n".join(lines).rstrip("\n") + "\n"


def _rate_cells(report: SuiteReport) -> dict[str, str]:
    """Each method's learning-rate cell over the tasks it ran (its distinct rates, as a task table shows them)."""
    rates: dict[str, list[Any]] = {}
    for task in report.tasks.values():
        for method, row in task.methods.items():
            rates.setdefault(method, []).extend(row.learning_rates)
    return {method: rate_cell(distinct_rates(values)) for method, values in rates.items()}


def _published_markdown(report: SuiteReport) -> list[str]:
    """The page's mean final score over tasks beside the paper's figures (none: no section)."""
    comparison = report.published
    if comparison is None:
        return []
    spec = score_format(comparison.means.values())
    # the balanced column only where some runs lie outside the seeds every method has everywhere
    seeds = seeds_label(comparison.common_seeds)
    balanced = (
        f" The seeds {seeds} column takes only the seeds every method run on every task has there, as many on each "
        "task, the design a paper's table reports."
        if comparison.common_seeds
        else ""
    )
    lines = [
        "## Beside the published figures",
        "",
        f"Mean over the tasks of each task's mean final {report.score} over seeds (each task weighs the same), "
        f"95% stratified-bootstrap CI ({report.resamples:,} resamples), beside the paper's figure.{balanced}",
        "",
        *table(["method", "tasks", f"mean final {report.score}", *([f"seeds {seeds}"] if seeds else []), "published"]),
    ]
    # a row per method, a dash where the paper (or the balanced column) has no figure for it
    for method, mean in comparison.means.items():
        figure = comparison.published.scores.get(method)
        cells = [method, str(comparison.tasks[method]), mean.format(spec)]
        if seeds:
            common = comparison.common_means.get(method)
            cells.append("-" if common is None else common.format(spec))
        cells.append("-" if figure is None else f"{figure:{spec}}")
        lines.append(table_row(cells))
    return [*lines, "", *published_notes(comparison.published), ""]


def seeds_label(seeds: Sequence[int]) -> str:
    """``"0-2"`` for a run of consecutive seeds, ``"0, 2, 5"`` otherwise, ``""`` for none."""
    if len(seeds) > 1 and list(seeds) == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


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


CORE_METHODS = ("eva", "lora", "full", "scratch")
"""The methods ``sample_efficiency.png`` overlays; any others (the method zoo) get ``sample_efficiency_zoo.png``,
full fine-tuning's curve beside them in grey dashes (ten overlapping curves are unreadable)."""


PANELS_PER_ROW = 5
"""Task panels side by side before a figure wraps to another row (CW10's ten tasks: two rows of five)."""


def panel_grid(tasks: int, width: float, height: float) -> dict[str, Any]:
    """``new_figure``'s arguments for a panel per task, :data:`PANELS_PER_ROW` to a row, each ``width`` x
    ``height`` inches."""
    columns = min(tasks, PANELS_PER_ROW)
    rows = -(-tasks // PANELS_PER_ROW)
    return {"nrows": rows, "ncols": columns, "figsize": (width * columns, height * rows), "dpi": 120, "squeeze": False}


def sample_efficiency_figure(tasks: int) -> dict[str, Any]:
    """``new_figure``'s arguments for a sample-efficiency figure: a panel per task."""
    return panel_grid(tasks, 5.0, 4.6)


def hide_unused_panels(axes: Any, used: int) -> None:
    """Blank the panels of a wrapped grid's last row that no task fills."""
    for axis in np.ravel(axes)[used:]:
        axis.set_axis_off()


def draw_sample_efficiency(
    axes: Any,
    report: SuiteReport,
    runs: Sequence[tuple[SuiteTask, RunResult]],
    methods: Sequence[str],
    tasks: Sequence[str],
    reference: str | None = None,
) -> None:
    """A panel per task of ``tasks``: the IQM eval curve of each of ``methods`` that ran it, with its 95% CI band.

    :param reference: A method drawn in grey dashes beside them (full fine-tuning beside the method zoo).

    Where training from scratch starts far below every pretrained method, the axis keeps to the pretrained methods'
    range (the title says scratch is clipped), so their differences stay visible; a success rate's axis is [0, 1].
    """
    hide_unused_panels(axes, len(tasks))
    for axis, task_name in zip(np.ravel(axes), tasks):
        task_runs = [r for t, r in runs if t.task == task_name]
        # over the training budget, the AUC's window: EVA's own env steps come out of it
        grid = np.linspace(0, max(r.budget for r in task_runs), 40)
        curves = {m: c for m in methods if (c := _iqm_curve(task_runs, m, grid)) is not None}
        # the curves, the reference's first so that it lies beneath them
        if reference is not None and (base := _iqm_curve(task_runs, reference, grid)) is not None:
            axis.plot(base[0], base[1], color="grey", linestyle="--", linewidth=1, label=f"{reference}")
        for method, (x, estimate, low, high) in curves.items():
            seeds = len({r.seed for r in task_runs if r.method == method})
            style = method_linestyle(method)
            axis.plot(x, estimate, color=method_color(method), linestyle=style, label=method_label(method, seeds))
            axis.fill_between(x, low, high, color=method_color(method), alpha=0.15)
        # the axis: a success rate's [0, 1]; a return's, the pretrained methods' range where scratch starts far below
        title = task_name
        pretrained = [c for m, c in curves.items() if get_method(m).pretrained]
        if report.tasks[task_name].score == "success":
            axis.set_ylim(-0.05, 1.05)
        elif pretrained and any(not get_method(m).pretrained for m in curves):
            low = min(float(c[2].min()) for c in pretrained)
            high = max(float(c[3].max()) for c in pretrained)
            span = high - low
            # a flat range (every pretrained run at one score, e.g. success 1.0 throughout) has no scale to clip to
            scratch_low = min(float(c[2].min()) for m, c in curves.items() if not get_method(m).pretrained)
            if span > 0 and scratch_low < low - span:
                axis.set_ylim(low - 0.1 * span, high + 0.1 * span)
                title += " (scratch clipped below)"
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("environment steps (EVA's included)")
        axis.set_ylabel(f"eval {report.tasks[task_name].score} (IQM, 95% CI)")
        axis.grid(alpha=0.3)
        # below the panel, where it can hide no curve
        labels = len(axis.get_legend_handles_labels()[1])
        axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(labels, 3), frameon=False)
        _zoom_on_the_plateau(axis, {m: c for m, c in curves.items() if get_method(m).pretrained})


PLATEAU_SHARE = 0.1
"""The pretrained methods' curves over the budget's second half, spanning less than this share of a panel's height,
get a zoomed inset: the differences the results cite (Pendulum's -201 against -205) are invisible on an axis that
reaches down to the jumpstart (-900)."""

INSET_PLACES = ([0.42, 0.3, 0.54, 0.4], [0.08, 0.3, 0.54, 0.4], [0.42, 0.08, 0.54, 0.4], [0.08, 0.08, 0.54, 0.4])
"""Where an inset may go, in the panel's axes fraction (``[x, y, width, height]``)."""


def _zoom_on_the_plateau(axis: Any, curves: Mapping[str, tuple[np.ndarray, ...]]) -> None:
    """An inset of the budget's second half, its y-axis fitted to ``curves``' IQM there (without their CI bands,
    which would undo the zoom), where those curves are flat on the panel's scale; it goes where it hides the fewest
    of the panel's points."""
    if not curves:
        return
    start = max(float(c[0][-1]) for c in curves.values()) / 2
    late = {m: (x >= start) for m, (x, *_) in curves.items()}
    values = np.concatenate([curves[m][1][mask] for m, mask in late.items()])
    bottom, top = axis.get_ylim()
    if not values.size or values.max() - values.min() >= PLATEAU_SHARE * (top - bottom):
        return
    if values.max() == values.min():
        return  # one value throughout (CW10's success stuck at 0 or 1): nothing for a zoom to tell apart
    # every drawn point (curves and bands) in the panel's axes fraction
    drawn = np.concatenate([np.column_stack([x, y]) for line in axis.get_lines() for x, y in [line.get_data()]])
    drawn = np.concatenate([drawn, *(collection.get_paths()[0].vertices for collection in axis.collections)])
    fractions = axis.transAxes.inverted().transform(axis.transData.transform(drawn))

    def hidden(place: list[float]) -> int:
        x, y, width, height = place
        inside = (fractions[:, 0] >= x) & (fractions[:, 0] <= x + width)
        return int((inside & (fractions[:, 1] >= y) & (fractions[:, 1] <= y + height)).sum())

    span = max(values.max() - values.min(), 1e-3 * (top - bottom))
    inset = axis.inset_axes(min(INSET_PLACES, key=hidden))
    for method, mask in late.items():
        x, estimate = curves[method][0][mask], curves[method][1][mask]
        inset.plot(x, estimate, color=method_color(method), linestyle=method_linestyle(method), linewidth=1.2)
    inset.set_ylim(values.min() - 0.15 * span, values.max() + 0.15 * span)
    inset.set_title("second half, zoomed (IQM)", fontsize=7)
    inset.tick_params(labelsize=6)
    inset.grid(alpha=0.3)


def draw_final_returns(axes: Any, report: SuiteReport) -> None:
    """A panel per task: each method's final return on it (IQM over its seeds, 95% CI), a row each. Tasks are never
    pooled: methods that ran other task sets would not compare on one axis. A success rate's axis is all of [0, 1]."""
    hide_unused_panels(axes, len(report.tasks))
    for axis, (task, task_report) in zip(np.ravel(axes), report.tasks.items()):
        methods = [m for m in report.methods if m in task_report.methods]
        for row, method in enumerate(methods):
            stats = task_report.methods[method]
            final = stats.final
            axis.errorbar(
                final.estimate,
                row,
                xerr=[[final.estimate - final.low], [final.high - final.estimate]],
                fmt="o",
                color=method_color(method),
                capsize=4,
            )
        axis.set_yticks(range(len(methods)), [f"{m} ({task_report.methods[m].seeds})" for m in methods], fontsize=8)
        axis.set_ylim(len(methods) - 0.5, -0.5)
        if task_report.score == "success":  # a rate: the whole of [0, 1], so panels read alike and none goes negative
            axis.set_xlim(-0.05, 1.05)
        axis.set_xlabel(f"final eval {task_report.score}, IQM (95% CI)", fontsize=8)
        axis.set_title(task, fontsize=9)
        axis.grid(alpha=0.3)


def draw_eva_ranks(axis: Any, ranks: Mapping[str, Sequence[float]]) -> None:
    """Each layer's EVA rank, mean and std over runs, a bar each (``ranks``: ``{label: [rank per run]}``)."""
    names = list(ranks)
    axis.barh(
        range(len(names)),
        [np.mean(ranks[n]) for n in names],
        xerr=[np.std(ranks[n]) for n in names],
        color="#4c72b0",
    )
    axis.set_yticks(range(len(names)), names, fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel("EVA rank (mean ± std over seeds)")


def eva_ranks(report: SuiteReport, reports: Sequence[tuple[str, str, EvaReport]]) -> dict[str, list[float]]:
    """``{label: [rank per run]}`` of ``(task, method, EVA report)`` triples, every method that ran EVA included;
    the label names the task when the suite has several, the method when several ran EVA."""
    several_tasks = len(report.tasks) > 1
    several_methods = len({method for _, method, _ in reports}) > 1
    ranks: dict[str, list[float]] = {}
    for task_name, method, eva in reports:
        for layer, rank in eva.ranks.items():
            label = f"{method}: {layer}" if several_methods else layer
            ranks.setdefault(f"{task_name}: {label}" if several_tasks else label, []).append(rank)
    return ranks


class SuiteStudy(Study[SuiteReport]):
    """A suite's grid, its report and page (``results.md``, ``results.json`` and the figures in
    ``<log_dir>/<suite>/``).

    The page covers every completed run of the whole suite made with today's settings, not only the ``methods`` and
    ``seeds`` just run (a rerun of one method must not redraw the page without the others), unless ``report_only``
    restricts it to them.

    :param methods: Run only these of the suite's methods.
    :param seeds: Run only these seeds.
    :param report_only: The page covers only ``methods`` and ``seeds``.
    """

    def __init__(
        self,
        suite: Suite,
        log_dir: Path,
        methods: Sequence[str] | None = None,
        seeds: Sequence[int] | None = None,
        report_only: bool = False,
        echo: Callable[[str], None] = print,
    ) -> None:
        super().__init__(log_dir, echo)
        if methods is not None:
            suite.check_methods(methods)
        if seeds is not None:
            check_seeds(list(seeds), "--seeds")
        self.suite, self.methods, self.seeds, self.report_only = suite, methods, seeds, report_only
        self.title = f"suite {suite.name}"

    @property
    def out_dir(self) -> Path:
        return self.log_dir / self.suite.name

    def plan(self) -> Planned:
        return self.suite.run_specs(self.log_dir, self.methods, self.seeds)

    def page_plan(self) -> Planned:
        return self.plan() if self.report_only else self.suite.run_specs(self.log_dir)

    def carry_out(self, executor: Executor, overwrite: bool = False) -> None:
        """The runs, after a line naming the methods that run at a value no tuning chose (:meth:`Suite.untuned`)."""
        if untuned := self.suite.untuned(self.methods):
            keys = sorted({key for missing in untuned.values() for key in missing})
            self.echo(
                f"note: {', '.join(untuned)} run at a {' and '.join(keys)} no tuning chose: the suite's "
                f"method_settings gives them none (python scripts/compare.py --suite {self.suite.name} --tune "
                f"--methods {','.join(untuned)} tunes them)"
            )
        super().carry_out(executor, overwrite)

    def score(self, key: SuiteTask) -> str:
        return key.score

    def report(self, runs: list[tuple[SuiteTask, RunResult]]) -> SuiteReport:
        report = aggregate(self.suite, runs)
        report.sharing = self.sharing_note()
        return report

    def sharing_note(self) -> str:
        """One line saying how many of the page's completed runs are the shared suite's ("" where none is)."""
        shares = self.suite.shares
        if shares is None:
            return ""
        done = [spec for _, spec in self.page_plan() if spec.folder.is_complete]
        shared = [spec for spec in done if spec.log_dir != self.out_dir]
        if not shared:
            return ""
        methods = ", ".join(dict.fromkeys(spec.method for spec in shared))
        return (
            f"{len(shared)} of the page's {len(done)} runs ({methods}) are suite `{shares}`'s, the same runs made once "
            f"for both pages (folder `{shares}/` of the log dir)."
        )

    def write_page(self, report: SuiteReport, runs: list[tuple[SuiteTask, RunResult]]) -> list[Path]:
        """``results.json``, ``results.md``, ``sample_efficiency.png`` (IQM curves with CI bands),
        ``final_return.png`` and, where a method ran EVA, ``eva_ranks.png``."""
        out = self.out_dir
        atomic_write_json(out / "results.json", report.to_dict())
        tuning = self.suite.tuning_folder(self.log_dir)
        sensitivity = f"../{tuning.name}/sensitivity.png" if (tuning / "sensitivity.png").is_file() else None
        atomic_write_text(out / "results.md", results_markdown(report, sensitivity))
        methods = report.methods
        core = [m for m in methods if m in CORE_METHODS] or methods
        zoo = [m for m in methods if m not in core]
        figure, axes = new_figure(**sample_efficiency_figure(len(report.tasks)))
        draw_sample_efficiency(axes, report, runs, core, list(report.tasks))
        paths = [out / "results.json", out / "results.md", save_figure(figure, out / "sample_efficiency.png")]
        if zoo:
            tasks = [name for name, task in report.tasks.items() if set(zoo) & set(task.methods)]
            figure, axes = new_figure(**sample_efficiency_figure(len(tasks)))
            # full fine-tuning (every weight from the pretrained ones) is what the others are held against
            full = next((m for m in methods if get_method(m).trains == "all" and get_method(m).pretrained), None)
            draw_sample_efficiency(axes, report, runs, zoo, tasks, reference=full)
            paths.append(save_figure(figure, out / "sample_efficiency_zoo.png"))
        tasks = len(report.tasks)
        rows = max(len(task.methods) for task in report.tasks.values())
        figure, axes = new_figure(**panel_grid(tasks, 4.2, 0.4 * rows + 1.6))
        draw_final_returns(axes, report)
        scores = {task.score for task in report.tasks.values()}
        score = scores.pop() if len(scores) == 1 else "score"
        figure.suptitle(f"final {score} per task (method, seeds)", fontsize=10)
        paths.append(save_figure(figure, out / "final_return.png"))
        ranks = eva_ranks(report, self._eva_reports(runs))
        if ranks:
            figure, axis = new_figure(figsize=(6.5, 0.3 * len(ranks) + 1.2), dpi=120)
            draw_eva_ranks(axis, ranks)
            paths.append(save_figure(figure, out / "eva_ranks.png"))
        return paths

    def _eva_reports(self, runs: list[tuple[SuiteTask, RunResult]]) -> list[tuple[str, str, EvaReport]]:
        """``(task, method, EVA report)`` of the runs that ran EVA, in the order the page lists methods and seeds."""
        # a run of the suite this one shares runs with sits in that suite's folder
        planned = self.page_plan() if self.suite.shares else []
        folders = {(spec.task.name, spec.method, spec.seed): spec.folder for _, spec in planned}
        reports = []
        for _, result in runs:
            if get_method(result.method).runs_eva:
                key = (result.task, result.method, result.seed)
                folder = folders.get(key) or RunFolder.of(self.out_dir, *key)
                eva = folder.read_eva()
                if eva is not None:
                    reports.append((result.task, result.method, eva))
        return reports
