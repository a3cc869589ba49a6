"""The comparison harness: methods x seeds x tasks of a suite, run as idempotent units, then aggregated.

A suite (``configs/suites/<name>.yaml``) lists transfer tasks from ``configs/``, each with the return threshold
for steps-to-threshold, and the methods, seeds, budget and per-method hyperparameters. Every run is one
:class:`~eva_rl.finetune.RunSpec`: the same spec writes the same ``result.json``, and a completed run is skipped,
so a crashed sweep resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from eva_rl.environments import env_factory, import_packages, make_vec
from eva_rl.finetune import RunSpec, load_agent, run
from eva_rl.stats import (
    Interval,
    curve_at,
    iqm,
    normalized_auc,
    probability_of_improvement,
    steps_to_threshold,
    stratified_iqm,
)
from eva_rl.tasks import CONFIG_DIR, METHODS, ConfigError, TaskConfig, _build, find_task
from eva_rl.training import atomic_write_json, atomic_write_text, evaluate

SUITE_DIR = CONFIG_DIR / "suites"
_METHOD_SETTINGS = ("learning_rate", "r", "alpha", "rho", "tau")


@dataclass
class SuiteTask:
    """A task of a suite.

    :param task: Task name in ``configs/``.
    :param threshold: Return that counts as solved, for steps-to-threshold.
    :param total_timesteps: Budget per run for this task (defaults to the suite's, then the task's).
    """

    task: str
    threshold: float
    total_timesteps: int | None = None


@dataclass
class Suite:
    """Transfer tasks and the grid to run on them.

    :param name: Suite name; results go to ``<log-dir>/<name>/``.
    :param tasks: The tasks.
    :param methods: Methods out of ``eva, lora, full, scratch``.
    :param seeds: Number of seeds (0..n-1) or an explicit list.
    :param total_timesteps: Budget per run unless a task sets its own.
    :param method_settings: Per-method ``learning_rate``, ``r``, ``alpha``, ``rho``, ``tau`` (chosen by a tuning
        sweep on separate seeds; see the suite file's comments).
    :param eval_episodes: Episodes per evaluation, overriding the tasks'.
    :param tuning_seeds: Seeds of the tuning sweep (kept apart from ``seeds``, which report results).
    :param tuning_grid: ``{setting: [values]}`` tried for every method alike, e.g. ``{learning_rate: [...]}``.
    """

    name: str
    tasks: list[SuiteTask]
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: int | list[int] = 5
    total_timesteps: int | None = None
    method_settings: dict[str, dict[str, float]] = field(default_factory=dict)
    eval_episodes: int | None = None
    tuning_seeds: list[int] = field(default_factory=lambda: [100, 101])
    tuning_grid: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tasks = [
            t if isinstance(t, SuiteTask) else _build(SuiteTask, t, f"suite {self.name} task") for t in self.tasks
        ]
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ConfigError(f"suite methods={self.methods!r} is invalid: expected a list out of {METHODS}")
        for method, settings in self.method_settings.items():
            unknown = sorted(set(settings) - set(_METHOD_SETTINGS))
            if method not in METHODS or unknown:
                raise ConfigError(
                    f"method_settings[{method!r}]={settings!r} is invalid: expected a method out of {METHODS} "
                    f"with keys out of {_METHOD_SETTINGS}"
                )

        unknown = sorted(set(self.tuning_grid) - set(_METHOD_SETTINGS))
        if unknown:
            raise ConfigError(f"tuning_grid keys {unknown} are invalid: expected keys out of {_METHOD_SETTINGS}")
        if set(self.tuning_seeds) & set(self.seed_list):
            raise ConfigError(f"tuning_seeds {self.tuning_seeds} overlap the result seeds {self.seed_list}")

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)


def load_suite(name_or_path: str) -> Suite:
    """A suite by name (``configs/suites/<name>.yaml``) or path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SUITE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in SUITE_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown suite {name_or_path!r}; known suites: {known}")
    data = yaml.safe_load(path.read_text()) or {}
    data.setdefault("name", path.stem)
    return _build(Suite, data, str(path))


def method_task(task: TaskConfig, method: str, suite: Suite, suite_task: SuiteTask) -> TaskConfig:
    """``task`` with the suite's budget and the method's own hyperparameters applied."""
    settings = suite.method_settings.get(method, {})
    ppo = dict(task.ppo)
    if "learning_rate" in settings:
        ppo["learning_rate"] = float(settings["learning_rate"])
    lora = dataclasses.replace(task.lora, **{k: settings[k] for k in ("r", "alpha") if k in settings})
    eva = dataclasses.replace(task.eva, **{k: settings[k] for k in ("rho", "tau") if k in settings})
    eval_settings = (
        task.eval if suite.eval_episodes is None else dataclasses.replace(task.eval, episodes=suite.eval_episodes)
    )
    return task.override(
        total_timesteps=suite_task.total_timesteps or suite.total_timesteps,
        ppo=ppo,
        lora=lora,
        eva=eva,
        eval=eval_settings,
    )


def run_specs(
    suite: Suite,
    log_dir: Path,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    device: str = "cpu",
) -> list[tuple[SuiteTask, RunSpec]]:
    """Every (task, method, seed) run of the suite, as specs writing under ``<log_dir>/<suite>/``."""
    specs = []
    for suite_task in suite.tasks:
        task = find_task(suite_task.task)
        if task is None:
            raise ConfigError(f"suite {suite.name}: task {suite_task.task!r} is not in configs/")
        for seed in seeds or suite.seed_list:
            for method in methods or suite.methods:
                spec = RunSpec(
                    method_task(task, method, suite, suite_task),
                    method,
                    seed,
                    log_dir / suite.name,
                    task.agent_path,
                    device,
                )
                specs.append((suite_task, spec))
    return specs


def run_one(spec: RunSpec) -> dict[str, Any]:
    """One run (skipped if complete, resumed if interrupted), plus its return on the source env (retention)."""
    import torch

    torch.set_num_threads(1)
    import_packages(spec.task.env_packages)
    result = run(spec, progress=False, resume=True)
    if "source_return" not in result:
        result["source_return"] = source_return(spec)
        atomic_write_json(spec.run_dir / "result.json", result)
    return result


def source_return(spec: RunSpec) -> float | None:
    """The fine-tuned model's return back on the task's source env, with the task's eval seeds."""
    task = spec.task
    if task.source_env is None or task.source_env == task.target_env:
        return None
    env = make_vec(env_factory(task.source_env, task.wrappers, task.env_kwargs), task.eval.env_count, task.eval.seed)
    model = load_agent(spec.run_dir / "model.zip", device="cpu")
    mean, _ = evaluate(model, env, task.eval.episodes, task.eval.seed, task.eval.deterministic)
    env.close()
    return mean


def _progress_line(done: int, total: int, spec: RunSpec, result: dict[str, Any]) -> str:
    return f"[{done}/{total}] {spec.task.name} {spec.method} seed{spec.seed}: final {result['final_return']:.3f}"


def run_local(specs: Sequence[RunSpec], workers: int, echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run specs in a process pool (``workers`` processes; 1 runs in this process)."""
    if workers <= 1:
        results = []
        for i, spec in enumerate(specs, 1):
            results.append(run_one(spec))
            echo(_progress_line(i, len(specs), spec, results[-1]))
        return results
    results: dict[int, dict[str, Any]] = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(run_one, spec): i for i, spec in enumerate(specs)}
        for done, future in enumerate(as_completed(futures), 1):
            i = futures[future]
            results[i] = future.result()
            spec = specs[i]
            echo(_progress_line(done, len(specs), spec, results[i]))
    return [results[i] for i in range(len(specs))]


def _curve(result: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Eval curve with EVA's own env steps added to the x-axis, so methods compare in samples."""
    curve = np.asarray(result["eval_curve"], float)
    return curve[:, 0] + result.get("eva_env_steps", 0), curve[:, 1]


def aggregate(suite: Suite, runs: Sequence[tuple[SuiteTask, dict[str, Any]]], reference: str = "eva") -> dict[str, Any]:
    """Per-task and suite-level statistics of every method."""
    by_task: dict[str, dict[str, list[dict[str, Any]]]] = {}
    thresholds = {}
    for suite_task, result in runs:
        by_task.setdefault(suite_task.task, {}).setdefault(result["method"], []).append(result)
        thresholds[suite_task.task] = suite_task.threshold
    methods = [m for m in suite.methods if any(m in per_method for per_method in by_task.values())]
    report: dict[str, Any] = {"suite": suite.name, "tasks": {}, "aggregate": {}}
    scores: dict[str, dict[str, list[list[float]]]] = {m: {"final": [], "auc": []} for m in methods}
    for task_name, per_method in by_task.items():
        threshold = thresholds[task_name]
        horizon = max(_curve(r)[0][-1] for rs in per_method.values() for r in rs)
        task_report = {}
        for method in methods:
            results = per_method.get(method, [])
            if not results:
                continue
            finals = [r["final_return"] for r in results]
            aucs = [normalized_auc(*_curve(r), horizon=horizon) for r in results]
            reached = [steps_to_threshold(*_curve(r), threshold) for r in results]
            steps = [s if s is not None else np.inf for s in reached]
            sources = [r["source_return"] for r in results if r.get("source_return") is not None]
            task_report[method] = {
                "seeds": len(results),
                "final": dataclasses.asdict(stratified_iqm([finals])),
                "jumpstart": float(iqm([r["jumpstart"] for r in results])),
                "auc": dataclasses.asdict(stratified_iqm([aucs])),
                "steps_to_threshold_median": None if np.isinf(np.median(steps)) else float(np.median(steps)),
                "reached_threshold": sum(s is not None for s in reached),
                "source_retention": float(iqm(sources)) if sources else None,
                "trainable_params": int(np.mean([r["trainable_params"] for r in results])),
                "wall_seconds": float(np.mean([r["wall_seconds"] for r in results])),
            }
            scores[method]["final"].append(finals)
            scores[method]["auc"].append(aucs)
        report["tasks"][task_name] = {"threshold": threshold, "methods": task_report}
    for method in methods:
        entry = {
            "final": dataclasses.asdict(stratified_iqm(scores[method]["final"])),
            "auc": dataclasses.asdict(stratified_iqm(scores[method]["auc"])),
        }
        if (
            method != reference
            and reference in scores
            and len(scores[reference]["final"]) == len(scores[method]["final"])
        ):
            entry[f"p_{reference}_better_final"] = dataclasses.asdict(
                probability_of_improvement(scores[reference]["final"], scores[method]["final"])
            )
        report["aggregate"][method] = entry
    return report


def _interval(data: dict[str, float]) -> str:
    return str(Interval(**data))


def results_markdown(report: dict[str, Any]) -> str:
    """``results.md``: a table per task and one for the suite."""
    lines = [
        f"# Suite `{report['suite']}`",
        "",
        "IQM over seeds with 95% stratified-bootstrap CIs. Steps include EVA's own environment steps.",
        "",
    ]
    for task_name, task in report["tasks"].items():
        lines += [
            f"## {task_name} (threshold {task['threshold']})",
            "",
            "| method | seeds | jumpstart | final return | normalized AUC | steps to threshold (median) | reached | "
            "source retention | trainable params |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for method, row in task["methods"].items():
            retention = "n/a" if row["source_retention"] is None else f"{row['source_retention']:.3f}"
            median = row["steps_to_threshold_median"]
            steps = "never" if median is None else f"{median:,.0f}"
            lines.append(
                f"| {method} | {row['seeds']} | {row['jumpstart']:.3f} | {_interval(row['final'])} | "
                f"{_interval(row['auc'])} | {steps} | {row['reached_threshold']}/{row['seeds']} | {retention} | "
                f"{row['trainable_params']:,} |"
            )
        lines.append("")
    lines += [
        "## All tasks",
        "",
        "| method | final return | normalized AUC | P(eva better), final |",
        "|---|---|---|---|",
    ]
    for method, row in report["aggregate"].items():
        poi = row.get("p_eva_better_final")
        lines.append(
            f"| {method} | {_interval(row['final'])} | {_interval(row['auc'])} | {_interval(poi) if poi else '-'} |"
        )
    return "\n".join(lines) + "\n"


def plot_suite(
    report: dict[str, Any], runs: Sequence[tuple[SuiteTask, dict[str, Any]]], out_dir: Path, log_dir: Path
) -> list[Path]:
    """``sample_efficiency.png`` (IQM curves with CI bands), ``final_return.png``, ``eva_ranks.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(report["tasks"])
    methods = list(report["aggregate"])
    colors = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    paths = []

    figure, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.8), dpi=120, squeeze=False)
    for axis, task_name in zip(axes[0], tasks):
        task_runs = [r for t, r in runs if t.task == task_name]
        horizon = max(_curve(r)[0][-1] for r in task_runs)
        grid = np.linspace(0, horizon, 40)
        for method in methods:
            curves = np.array([curve_at(*_curve(r), grid) for r in task_runs if r["method"] == method])
            if not len(curves):
                continue
            started = ~np.isnan(curves).any(axis=0)
            intervals = [stratified_iqm([curves[:, j]], n_resamples=500) for j in np.flatnonzero(started)]
            x = grid[started]
            axis.plot(x, [i.estimate for i in intervals], color=colors[method], label=f"{method} ({len(curves)})")
            axis.fill_between(
                x, [i.low for i in intervals], [i.high for i in intervals], color=colors[method], alpha=0.2
            )
        axis.set_title(task_name)
        axis.set_xlabel("environment steps (EVA's included)")
        axis.set_ylabel("eval return (IQM)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    paths.append(out_dir / "sample_efficiency.png")
    figure.savefig(paths[-1])
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(6, 0.5 * len(methods) + 1.5), dpi=120)
    for row, method in enumerate(methods):
        final = report["aggregate"][method]["final"]
        axis.errorbar(
            final["estimate"],
            row,
            xerr=[[final["estimate"] - final["low"]], [final["high"] - final["estimate"]]],
            fmt="o",
            color=colors[method],
            capsize=4,
        )
    axis.set_yticks(range(len(methods)), methods)
    axis.set_xlabel("final eval return, IQM over seeds and tasks (95% CI)")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    paths.append(out_dir / "final_return.png")
    figure.savefig(paths[-1])
    plt.close(figure)

    rank_sums: dict[str, list[float]] = {}
    for task_name in tasks:
        for eva_json in sorted((log_dir / task_name / "eva").glob("seed*/eva.json")):
            for layer, rank in json.loads(eva_json.read_text())["ranks"].items():
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


def compare(
    suite: Suite,
    log_dir: Path,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    workers: int = 1,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or resume) the suite's grid locally, then write ``results.json``, ``results.md`` and the plots."""
    for suite_task in suite.tasks:
        task = find_task(suite_task.task)
        if task is not None:
            import_packages(task.env_packages)
    pairs = run_specs(suite, log_dir, methods, seeds)
    results = run_local([spec for _, spec in pairs], workers, echo)
    runs = [(suite_task, result) for (suite_task, _), result in zip(pairs, results)]
    out_dir = log_dir / suite.name
    report = aggregate(dataclasses.replace(suite, methods=list(methods or suite.methods)), runs)
    atomic_write_json(out_dir / "results.json", report)
    atomic_write_text(out_dir / "results.md", results_markdown(report))
    plot_suite(report, runs, out_dir, out_dir)
    return report


def tuning_points(suite: Suite) -> list[dict[str, float]]:
    """Every combination of the tuning grid, e.g. ``[{"learning_rate": 1e-4}, {"learning_rate": 1e-3}]``."""
    points: list[dict[str, float]] = [{}]
    for key, values in suite.tuning_grid.items():
        points = [{**point, key: value} for point in points for value in values]
    return points


def _point_name(point: dict[str, float]) -> str:
    return "-".join(f"{key}{value:g}" for key, value in point.items()) or "default"


def tune(
    suite: Suite,
    log_dir: Path,
    methods: Sequence[str] | None = None,
    workers: int = 1,
    echo: Callable[[str], None] = print,
) -> dict[str, dict[str, float]]:
    """The same small sweep for every method on the tuning seeds; each method keeps the grid point with the best
    IQM normalized AUC (sample efficiency) over tuning seeds and tasks.

    Writes ``<log_dir>/<suite>-tuning/tuning.json`` and returns ``{method: chosen settings}``, ready to paste into the
    suite's ``method_settings``.
    """
    if not suite.tuning_grid:
        raise ConfigError(f"suite {suite.name} has no tuning_grid to sweep")
    methods = list(methods or suite.methods)
    base = log_dir / f"{suite.name}-tuning"
    jobs: list[tuple[dict[str, float], SuiteTask, RunSpec]] = []
    for point in tuning_points(suite):
        trial = dataclasses.replace(
            suite, method_settings={m: dict(point) for m in methods}, seeds=suite.tuning_seeds, tuning_seeds=[]
        )
        for suite_task, spec in run_specs(trial, base / _point_name(point), methods):
            jobs.append((point, suite_task, spec))
    results = run_local([spec for _, _, spec in jobs], workers, echo)
    table: dict[str, dict[str, float]] = {}
    for point in tuning_points(suite):
        for method in methods:
            per_task: dict[str, list[float]] = {}
            for (job_point, suite_task, spec), result in zip(jobs, results):
                if job_point == point and spec.method == method:
                    per_task.setdefault(suite_task.task, []).append(normalized_auc(*_curve(result)))
            table.setdefault(method, {})[_point_name(point)] = float(stratified_iqm(list(per_task.values())).estimate)
    chosen = {}
    for method in methods:
        best = max(tuning_points(suite), key=lambda point: table[method][_point_name(point)])
        chosen[method] = best
    atomic_write_json(base / "tuning.json", {"auc_iqm": table, "chosen": chosen, "seeds": suite.tuning_seeds})
    return chosen
