"""The tuning sweep (``compare.py --suite NAME --tune``): the same small grid for every method (and a method's own
values beyond it) on the suite's tuning seeds and tasks; each method keeps the grid point with the best IQM
normalized AUC (sample efficiency).

Its page is ``<log_dir>/<suite>-tuning/tuning.json``; the choices are printed ready to paste into the suite's
``method_settings``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eva_rl.errors import ConfigError
from eva_rl.experiments.machine import platform_line
from eva_rl.experiments.plots import method_color, method_linestyle, new_figure, save_figure, value_label
from eva_rl.experiments.run_folder import RunResult
from eva_rl.experiments.stats import normalized_auc, stratified_iqm
from eva_rl.experiments.studies.base import Planned, Study
from eva_rl.experiments.suites import Suite, SuiteTask
from eva_rl.files import atomic_write_json

TuningReport = dict[str, Any]
"""``{"auc_iqm": {method: {point: IQM}}, "final_iqm": {...}, "chosen": {method: settings}, "seeds": [...],
"platform": line}``."""


def tuning_points(grid: Mapping[str, Sequence[float]]) -> list[dict[str, float]]:
    """Every combination of a tuning grid, e.g. ``[{"learning_rate": 1e-4}, {"learning_rate": 1e-3}]``."""
    points: list[dict[str, float]] = [{}]
    for key, values in grid.items():
        points = [{**point, key: value} for point in points for value in values]
    return points


def at_the_edge(
    grid: Mapping[str, Sequence[float]], chosen: Mapping[str, Mapping[str, float]], where: str = "tuning_grid"
) -> list[str]:
    """A note for every choice that is the smallest or largest value of a grid of three or more: the best may lie
    beyond it, and a fair protocol extends the grid there.

    :param grid: The grid tuned over.
    :param where: The grid's key in the suite file, named in the note.
    :param chosen: ``{who: point}``, e.g. ``{"eva": {"learning_rate": 0.004}}`` or ``{"eva at r = 1": ...}``.
    """
    notes = []
    for who, point in chosen.items():
        for key, value in point.items():
            values = sorted(grid.get(key, []))
            if len(values) >= 3 and value in (values[0], values[-1]):
                side = "smallest" if value == values[0] else "largest"
                notes.append(
                    f"note: the best {key} of {who}, {value:g}, is the grid's {side}: the best may lie beyond it "
                    f"(extend {where}.{key} past it and tune again; the runs made are kept)"
                )
    return notes


def edge_notes(suite: Suite, chosen: Mapping[str, Mapping[str, float]]) -> list[str]:
    """:func:`at_the_edge` for each method's choice against the grid it tried: a method with values of its own
    (``method_tuning_grid``) is told to extend those, the other methods' grid left as it is."""
    return [
        note
        for method, point in chosen.items()
        for where in [f"method_tuning_grid.{method}" if method in suite.method_tuning_grid else "tuning_grid"]
        for note in at_the_edge(suite.tuning_grid_of(method), {method: point}, where)
    ]


def point_name(point: dict[str, float]) -> str:
    """A grid point as a folder name: ``learning_rate0.001``."""
    return "-".join(f"{key}{value:g}" for key, value in point.items()) or "default"


class TuningSweep(Study[TuningReport]):
    """The suite's tuning sweep.

    :param methods: The methods to tune (default: the suite's).
    """

    def __init__(
        self,
        suite: Suite,
        log_dir: Path,
        methods: Sequence[str] | None = None,
        echo: Callable[[str], None] = print,
    ) -> None:
        super().__init__(log_dir, echo)
        if not suite.tuning_grid:
            raise ConfigError(f"suite {suite.name} has no tuning_grid to sweep")
        if methods is not None:
            suite.check_methods(methods)
        self.suite, self.methods = suite, list(methods or suite.methods)
        self.grid = suite.tuning_grid_over(self.methods)  # every value some of its methods try: the page's x-axis
        self.title = f"suite {suite.name}'s tuning sweep"

    @property
    def out_dir(self) -> Path:
        return self.suite.tuning_folder(self.log_dir)

    def plan(self) -> Planned:
        """Every grid point x method x tuning seed x tuning task, a method's own grid points (``method_tuning_grid``)
        for it alone; a point's runs go to ``<point>/<suite>/``."""
        suite = self.suite
        tasks = [t for t in suite.tasks if suite.tuning_tasks is None or t.task in suite.tuning_tasks]
        return [
            ((point_name(point), suite_task.task), suite.run_spec(suite_task, method, seed, folder, settings=point))
            for point in tuning_points(self.grid)
            for folder in [self.out_dir / point_name(point) / suite.name]
            for suite_task in tasks
            for seed in suite.tuning_seeds
            for method in suite.task_methods(suite_task, self.methods)
            if point in tuning_points(suite.tuning_grid_of(method))
        ]

    def score(self, key: tuple[str, str]) -> str:
        """The score the suite's page compares on the run's task: the sweep tunes for it."""
        return self.suite.score_of(key[1])

    def report(self, runs: list[tuple[tuple[str, str], RunResult]]) -> TuningReport:
        """IQM normalized AUC and final return of each method at each grid point, and each method's best point.
        A sweep under way (``--report-only``) reports the points each method has runs at and says how many of the
        planned runs of its methods with a run are in (``"partial"``): a method the sweep never started (a control
        that runs at another method's rate) is not a sweep under way."""
        auc: dict[str, dict[str, float]] = {}
        final: dict[str, dict[str, float]] = {}
        for point in tuning_points(self.grid):
            for method in self.methods:
                aucs: dict[str, list[float]] = {}
                finals: dict[str, list[float]] = {}
                for (name, task), result in runs:
                    if name == point_name(point) and result.method == method:
                        aucs.setdefault(task, []).append(normalized_auc(*result.sample_curve(), result.budget))
                        finals.setdefault(task, []).append(result.budget_return)
                if aucs:
                    auc.setdefault(method, {})[point_name(point)] = float(stratified_iqm(list(aucs.values())).estimate)
                    final.setdefault(method, {})[point_name(point)] = float(
                        stratified_iqm(list(finals.values())).estimate
                    )
        points = {point_name(point): point for point in tuning_points(self.grid)}
        # a copy each: shared dicts would print as YAML anchors and aliases
        chosen = {method: dict(points[max(by_point, key=by_point.__getitem__)]) for method, by_point in auc.items()}
        platform = platform_line(result.platform for _, result in runs)
        report: TuningReport = {
            "auc_iqm": auc,
            "final_iqm": final,
            "chosen": chosen,
            "seeds": self.suite.tuning_seeds,
            "platform": platform,
        }
        scores = {self.suite.score_of(task) for (_, task), _ in runs}
        if scores != {"return"}:  # written where it differs, so the pages tuned on returns read back unchanged
            report["score"] = "/".join(sorted(scores))
        started = {result.method for _, result in runs}
        planned = sum(spec.method in started for _, spec in self.plan())
        if len(runs) < planned:
            report["partial"] = {"completed": len(runs), "planned": planned}
        return report

    def write_page(self, report: TuningReport, runs: list[tuple[Any, RunResult]]) -> list[Path]:
        """``tuning.json``, and ``sensitivity.png`` where the grid varies one setting (the learning rate)."""
        atomic_write_json(self.out_dir / "tuning.json", report)
        written = [self.out_dir / "tuning.json"]
        if len(self.suite.tuning_grid) == 1:
            figure, axes = new_figure(1, 2, figsize=(10, 4), dpi=120)
            draw_sensitivity(axes, self.suite, report, self.grid)
            written.append(save_figure(figure, self.out_dir / "sensitivity.png"))
        return written


def draw_sensitivity(axes: Any, suite: Suite, report: TuningReport, grid: dict[str, list[float]]) -> None:
    """Normalized AUC and final return (IQM over the tuning seeds and tasks) against the one tuned setting, one line
    per method, each method's chosen value ringed: how sharply each method depends on it.

    :param grid: The x-axis: every value the sweep's methods try (:meth:`Suite.tuning_grid_over`).
    """
    ((key, values),) = grid.items()
    points = tuning_points(grid)
    final = "final success rate" if report.get("score") == "success" else "final return"
    for axis, (table, label) in zip(axes, ((report["auc_iqm"], "normalized AUC"), (report["final_iqm"], final))):
        for method, by_point in table.items():
            # a point without runs yet (a sweep under way) is a gap in the line
            ys = [by_point.get(point_name(point), np.nan) for point in points]
            color = method_color(method)
            style = method_linestyle(method)
            axis.plot(values, ys, marker="o", markersize=3, color=color, linestyle=style, label=method)
            chosen = values.index(report["chosen"][method][key])
            axis.plot(values[chosen], ys[chosen], "o", markersize=9, markerfacecolor="none", color=color)
        axis.set_xscale("log")
        labels = [value_label(value) for value in values]  # the grid's own values, not log decades
        slanted = max(map(len, labels)) > 6  # 3.125e-5 beside 6.25e-5 overlap when level
        axis.set_xticks(values, labels, rotation=30 if slanted else 0, ha="right" if slanted else "center")
        axis.tick_params(axis="x", which="minor", labelbottom=False)
        axis.set_xlabel(key)
        axis.set_ylabel(f"{label} (IQM)")
        axis.grid(alpha=0.3)
    seeds = ", ".join(str(seed) for seed in suite.tuning_seeds)
    partial = report.get("partial")
    progress = f", {partial['completed']} of {partial['planned']} runs in" if partial else ""
    # over both panels: over the first alone, a sweep's progress made it run off the figure's left edge
    axes[0].figure.suptitle(f"{suite.name}: tuning seeds {seeds} (ring: chosen{progress})", fontsize=11)
    axes[1].legend(fontsize=7, ncol=2)


class RankTuningSweep(Study[TuningReport]):
    """The tuning grid (the rank study's own, else the suite's) at every rank of the suite's rank study
    (``compare.py --suite NAME --rank-study --tune``): each rank-study method but the controls at each rank r and grid
    point, on the suite's tuning seeds, on the rank
    study's task; each (method, r) keeps the point with the best IQM normalized AUC, printed for the rank study's
    ``method_settings``.

    Its page is ``<log_dir>/<suite>-rank-tuning/rank_tuning.json``; the runs go to
    ``<log_dir>/<suite>-rank-tuning/r<r>/<point>/<suite>/``, except those the suite's own tuning sweep makes (at the
    suite's rank and alpha, on one of its tuning tasks, with no setting of the method's besides the grid's), which
    are that sweep's runs, as the rank study reuses the suite's.
    """

    def __init__(self, suite: Suite, log_dir: Path, echo: Callable[[str], None] = print) -> None:
        super().__init__(log_dir, echo)
        if suite.rank_study is None or not (suite.rank_study.tuning_grid or suite.tuning_grid):
            raise ConfigError(f"suite {suite.name} needs a rank_study and a tuning_grid to tune at every rank")
        self.suite, self.study = suite, suite.rank_study
        own = bool(self.study.tuning_grid)
        self.grid = self.study.tuning_grid if own else suite.tuning_grid
        self.grid_key = "rank_study.tuning_grid" if own else "tuning_grid"  # where the suite file keeps it
        self.title = f"suite {suite.name}'s tuning at every rank"

    @property
    def out_dir(self) -> Path:
        return self.log_dir / f"{self.suite.name}-rank-tuning"

    def plan(self) -> Planned:
        suite, study = self.suite, self.study
        suite_task = next(t for t in suite.tasks if t.task == study.task)
        suite_tuning = TuningSweep(suite, self.log_dir).out_dir
        planned = []
        for r in study.ranks:
            for point in tuning_points(self.grid):
                folder = self.out_dir / f"r{r}" / point_name(point) / suite.name
                shared_runs = {m: self._in_suite_tuning(suite_task, m, r, point) for m in study.tuned_methods}
                for seed in suite.tuning_seeds:
                    for method in study.tuned_methods:
                        if shared_runs[method]:
                            shared = suite_tuning / point_name(point) / suite.name
                            spec = suite.run_spec(suite_task, method, seed, shared, settings=point)
                        else:
                            settings = {**suite.method_settings.get(method, {}), **study.rank_overrides(r), **point}
                            spec = suite.run_spec(suite_task, method, seed, folder, settings=settings)
                        planned.append(((r, point_name(point)), spec))
        return planned

    def _in_suite_tuning(self, suite_task: SuiteTask, method: str, r: int, point: dict[str, float]) -> bool:
        """Whether the suite's tuning sweep makes the run of ``method`` at rank ``r`` and ``point``: the same run."""
        suite = self.suite
        lora = suite.run_spec(suite_task, method, suite.tuning_seeds[0], self.out_dir, settings=point).task.lora
        return (
            point in tuning_points(suite.tuning_grid_of(method))
            and (suite.tuning_tasks is None or suite_task.task in suite.tuning_tasks)
            and method in suite.task_methods(suite_task, suite.methods)
            and lora.r == r
            and lora.default_alpha == r
            and set(suite.method_settings.get(method, {})) <= set(point)
        )

    def score(self, key: tuple[int, str]) -> str:
        return self.suite.score_of(self.study.task)

    def report(self, runs: list[tuple[tuple[int, str], RunResult]]) -> TuningReport:
        aucs: dict[str, dict[int, dict[str, list[float]]]] = {}
        for (r, name), result in runs:
            by_point = aucs.setdefault(result.method, {}).setdefault(r, {})
            by_point.setdefault(name, []).append(normalized_auc(*result.sample_curve(), result.budget))
        table = {
            method: {
                r: {name: float(stratified_iqm([scores]).estimate) for name, scores in by_point.items()}
                for r, by_point in by_rank.items()
            }
            for method, by_rank in aucs.items()
        }
        points = {point_name(point): point for point in tuning_points(self.grid)}
        chosen = {
            method: {r: points[max(by_point, key=by_point.__getitem__)] for r, by_point in by_rank.items()}
            for method, by_rank in table.items()
        }
        platform = platform_line(result.platform for _, result in runs)
        return {"auc_iqm": table, "chosen": chosen, "seeds": self.suite.tuning_seeds, "platform": platform}

    def write_page(self, report: TuningReport, runs: list[tuple[Any, RunResult]]) -> list[Path]:
        atomic_write_json(self.out_dir / "rank_tuning.json", report)
        return [self.out_dir / "rank_tuning.json"]
