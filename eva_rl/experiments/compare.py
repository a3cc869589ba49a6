"""The comparison harness: methods x seeds x tasks of a suite, run as idempotent units, then aggregated.

Every run is one :class:`~eva_rl.experiments.runs.RunSpec`: the same spec writes the same ``result.json``, and a
completed run is skipped, so a crashed sweep resumes where it stopped. Runs go to a local process pool or to Ray.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import closing
from pathlib import Path

from eva_rl.errors import ConfigError
from eva_rl.experiments.environments import agent_env, import_packages
from eva_rl.experiments.ranks import RankStudyReport, plot_rank_study, rank_markdown, rank_report, rank_settings
from eva_rl.experiments.report import SuiteReport, aggregate, plot_suite, results_markdown
from eva_rl.experiments.runs import RunDirError, RunResult, RunSpec, completed_result, run
from eva_rl.experiments.stats import normalized_auc, stratified_iqm
from eva_rl.experiments.suites import Suite, SuiteTask, method_task
from eva_rl.experiments.tasks import find_task
from eva_rl.experiments.training import STATS, evaluate, one_line_warnings
from eva_rl.files import atomic_write_json, atomic_write_text, check_writable
from eva_rl.loading import load_agent, load_pretrained


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
            for method in suite.task_methods(suite_task, methods):
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


def run_one(spec: RunSpec, overwrite: bool = False) -> RunResult:
    """One run (skipped if complete, resumed if interrupted), plus its return on the source env (retention).

    :param overwrite: Start over a run whose folder holds one made with other settings (see :func:`run`).
    """
    import torch

    torch.set_num_threads(1)
    one_line_warnings()
    import_packages(spec.task.env_packages)
    result = run(spec, progress=False, resume=True, overwrite=overwrite)
    if result.source_return is None:
        result.source_return = source_return(spec)
        if result.source_return is not None:
            atomic_write_json(spec.run_dir / "result.json", result.to_dict())
    return result


def source_return(spec: RunSpec) -> float | None:
    """The fine-tuned model's return back on the task's source env, with the task's eval seeds."""
    task = spec.task
    if task.source_env is None or task.source_env == task.target_env:
        return None
    model = load_agent(spec.run_dir / "model.zip", device="cpu")
    agent = load_pretrained(spec.agent_path, device="cpu")
    stats = spec.run_dir / STATS if (spec.run_dir / STATS).is_file() else None
    env = agent_env(
        task, agent, task.eval.env_count, task.eval.seed, env_id=task.source_env, evaluation=True, stats=stats
    )
    with closing(env):
        mean, _ = evaluate(model, env, task.eval.episodes, task.eval.seed, task.eval.deterministic)
    return mean


def _progress_line(done: int, total: int, spec: RunSpec, result: RunResult) -> str:
    return f"[{done}/{total}] {spec.task.name} {spec.method} seed{spec.seed}: final {result.final_return:.3f}"


def run_local(
    specs: Sequence[RunSpec], workers: int, echo: Callable[[str], None] = print, overwrite: bool = False
) -> list[RunResult]:
    """Run specs in a process pool (``workers`` processes; 1 runs in this process)."""
    if workers <= 1:
        results = []
        for i, spec in enumerate(specs, 1):
            results.append(run_one(spec, overwrite))
            echo(_progress_line(i, len(specs), spec, results[-1]))
        return results
    results: dict[int, RunResult] = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(run_one, spec, overwrite): i for i, spec in enumerate(specs)}
        for done, future in enumerate(as_completed(futures), 1):
            i = futures[future]
            results[i] = future.result()
            spec = specs[i]
            echo(_progress_line(done, len(specs), spec, results[i]))
    return [results[i] for i in range(len(specs))]


def run_ray(
    specs: Sequence[RunSpec], address: str | None, echo: Callable[[str], None] = print, overwrite: bool = False
) -> list[RunResult]:
    """Run specs as Ray tasks (one CPU each) on the cluster at ``address`` (``None``: a new local instance).

    Results are written by the workers to the shared ``--log-dir``; progress is reported as runs finish. The
    driver's working directory goes on the workers' ``PYTHONPATH``, so env packages like ``envs/`` import there.
    """
    try:
        import ray
    except ImportError as error:
        raise ConfigError('the Ray backend needs Ray: pip install -e ".[ray]"') from error

    started_here = not ray.is_initialized()
    if started_here:
        python_path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": python_path}},
        )
    try:
        task = ray.remote(num_cpus=1)(run_one)
        pending = {task.remote(spec, overwrite): i for i, spec in enumerate(specs)}
        results: dict[int, RunResult] = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done[0])
            results[i] = ray.get(done[0])
            echo(_progress_line(len(results), len(specs), specs[i], results[i]))
        return [results[i] for i in range(len(specs))]
    finally:
        if started_here:
            ray.shutdown()


def compare(
    suite: Suite,
    log_dir: Path,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    workers: int = 1,
    echo: Callable[[str], None] = print,
    backend: str = "local",
    ray_address: str | None = None,
    report_only: bool = False,
    overwrite: bool = False,
) -> SuiteReport:
    """Run (or resume) the suite's grid, then write ``results.json``, ``results.md`` and the plots.

    The page covers every completed run of the whole suite made with today's settings, not only the ``methods`` and
    ``seeds`` just run (a rerun of one method must not redraw the page without the others); runs made with other
    settings are left out and named in one line.

    :param backend: ``"local"`` (a process pool of ``workers``) or ``"ray"`` (Ray tasks on ``ray_address``).
    :param report_only: Run nothing; aggregate the completed runs of the grid (``methods`` and ``seeds`` restrict
        it).
    :param overwrite: Start over the runs whose folders hold runs made with other settings.
    """
    for suite_task in suite.tasks:
        task = find_task(suite_task.task)
        if task is not None:
            import_packages(task.env_packages)
    check_writable(log_dir / suite.name)
    if not report_only:
        specs = [spec for _, spec in run_specs(suite, log_dir, methods, seeds)]
        if backend == "ray":
            run_ray(specs, ray_address, echo, overwrite)
        elif backend == "local":
            run_local(specs, workers, echo, overwrite)
        else:
            raise ConfigError(f"backend={backend!r} is invalid: expected 'local' or 'ray'")
        methods, seeds = None, None
    runs = page_runs(suite, log_dir, methods, seeds, echo)
    if not runs:
        raise ConfigError(f"no completed runs of suite {suite.name} under {log_dir / suite.name}")
    out_dir = log_dir / suite.name
    report = aggregate(suite, runs)
    atomic_write_json(out_dir / "results.json", report.to_dict())
    atomic_write_text(out_dir / "results.md", results_markdown(report))
    plot_suite(report, runs, out_dir, out_dir)
    return report


def page_runs(
    suite: Suite,
    log_dir: Path,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    echo: Callable[[str], None] = print,
) -> list[tuple[SuiteTask, RunResult]]:
    """The completed runs of the grid made with today's settings; one line names the runs made with other settings,
    which are left out."""
    runs, stale = [], []
    for suite_task, spec in run_specs(suite, log_dir, methods, seeds):
        if (spec.run_dir / "result.json").is_file():
            try:
                runs.append((suite_task, completed_result(spec)))
            except RunDirError as error:
                stale.append(str(error))
    if stale:
        echo(f"results leave out {len(stale)} run(s) made with other settings; the first: {stale[0]}")
    return runs


def rank_study_specs(suite: Suite, log_dir: Path, device: str = "cpu") -> list[tuple[int, RunSpec]]:
    """Every (r, run) of the suite's rank study. A run at the rank (and alpha) the suite itself uses is the suite's
    own run (``<log_dir>/<suite>/``); the others go to ``<log_dir>/<suite>-ranks/r<r>/``.
    """
    study = suite.rank_study
    if study is None:
        raise ConfigError(f"suite {suite.name} has no rank_study (task, ranks, methods, seeds)")
    suite_task = next(t for t in suite.tasks if t.task == study.task)
    task = find_task(study.task)
    if task is None:
        raise ConfigError(f"suite {suite.name}: task {study.task!r} is not in configs/")
    specs = []
    for r in study.ranks:
        for seed in study.seed_list:
            for method in study.methods:
                run_task, base = method_task(task, method, suite, suite_task), log_dir / suite.name
                if run_task.lora.r != r or run_task.lora.default_alpha != r:
                    ranked = dataclasses.replace(
                        suite,
                        method_settings={
                            **suite.method_settings,
                            method: rank_settings(suite.method_settings, method, r),
                        },
                    )
                    run_task = method_task(task, method, ranked, suite_task)
                    base = log_dir / f"{suite.name}-ranks" / f"r{r}"
                specs.append((r, RunSpec(run_task, method, seed, base, task.agent_path, device)))
    return specs


def rank_study(
    suite: Suite,
    log_dir: Path,
    workers: int = 1,
    echo: Callable[[str], None] = print,
    report_only: bool = False,
    overwrite: bool = False,
) -> RankStudyReport:
    """Run (or resume) the suite's rank study, then write ``rank_study.json``, ``rank_study.md`` and
    ``rank_study.png`` to ``<log_dir>/<suite>/``.

    :param report_only: Run nothing; aggregate the study's runs that are complete.
    """
    import_packages(find_task(suite.rank_study.task).env_packages if suite.rank_study else ())
    pairs = rank_study_specs(suite, log_dir)
    check_writable(log_dir / suite.name)
    if report_only:
        pairs = [(r, spec) for r, spec in pairs if (spec.run_dir / "result.json").is_file()]
        if not pairs:
            raise ConfigError(f"no completed runs of suite {suite.name}'s rank study under {log_dir}")
        results = [completed_result(spec) for _, spec in pairs]
    else:
        results = run_local([spec for _, spec in pairs], workers, echo, overwrite)
    report = rank_report(suite.name, suite.rank_study, [(r, result) for (r, _), result in zip(pairs, results)])
    out_dir = log_dir / suite.name
    atomic_write_json(out_dir / "rank_study.json", report.to_dict())
    atomic_write_text(out_dir / "rank_study.md", rank_markdown(report))
    plot_rank_study(report, out_dir / "rank_study.png")
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
    overwrite: bool = False,
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
            suite,
            tasks=[t for t in suite.tasks if suite.tuning_tasks is None or t.task in suite.tuning_tasks],
            method_settings={m: dict(point) for m in methods},
            seeds=suite.tuning_seeds,
            tuning_seeds=[],
            tuning_tasks=None,
        )
        for suite_task, spec in run_specs(trial, base / _point_name(point), methods):
            jobs.append((point, suite_task, spec))
    results = run_local([spec for _, _, spec in jobs], workers, echo, overwrite)
    table: dict[str, dict[str, float]] = {}
    for point in tuning_points(suite):
        for method in methods:
            per_task: dict[str, list[float]] = {}
            for (job_point, suite_task, spec), result in zip(jobs, results):
                if job_point == point and spec.method == method:
                    per_task.setdefault(suite_task.task, []).append(normalized_auc(*result.sample_curve()))
            table.setdefault(method, {})[_point_name(point)] = float(stratified_iqm(list(per_task.values())).estimate)
    chosen = {}
    for method in methods:
        best = max(tuning_points(suite), key=lambda point: table[method][_point_name(point)])
        chosen[method] = best
    atomic_write_json(base / "tuning.json", {"auc_iqm": table, "chosen": chosen, "seeds": suite.tuning_seeds})
    return chosen
