"""The comparison harness end to end on the seconds-long smoke suite."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from eva_rl.experiments.execute import LocalProcesses, RayCluster
from eva_rl.experiments.run_folder import RunResult
from eva_rl.experiments.studies.base import conduct
from eva_rl.experiments.studies.suite import SuiteReport, SuiteStudy, aggregate, results_markdown
from eva_rl.experiments.studies.tuning import TuningSweep, at_the_edge, edge_notes
from eva_rl.experiments.suites import SUITE_DIR, Suite, SuiteTask, load_suite
from eva_rl.experiments.tasks import ConfigError, find_task

pytestmark = pytest.mark.filterwarnings("ignore:EVA:UserWarning")


def smoke_suite() -> Suite:
    """The smoke suite at a quarter of its budget: these tests check the harness, not what the runs learn."""
    suite = load_suite("smoke")
    suite.tasks = [dataclasses.replace(task, total_timesteps=4096) for task in suite.tasks]
    return suite


def compare(suite, log_dir, methods=None, seeds=None, workers=1, echo=print, backend="local", report_only=False):
    """What ``compare.py --suite`` does: the suite study, carried out by the executor its flags choose."""
    study = SuiteStudy(suite, log_dir, methods, seeds, report_only, echo)
    executor = RayCluster(echo=echo) if backend == "ray" else LocalProcesses(workers, echo=echo)
    return conduct(study, executor, report_only=report_only)


@pytest.mark.parametrize("path", sorted(SUITE_DIR.glob("*.yaml")), ids=lambda path: path.stem)
def test_every_shipped_suite_names_its_own_file_and_tasks_with_agents(path: Path) -> None:
    suite = load_suite(path.stem)
    assert suite.name == path.stem  # results go to <log-dir>/<name>/, so two suites must not share a name
    for suite_task in suite.tasks:
        task = find_task(suite_task.task)
        assert task is not None, suite_task.task
        assert task.agent_path.is_file(), task.agent_path
        for method in suite.task_methods(suite_task):
            suite.run_spec(suite_task, method, 0, path)  # every method's settings apply to the task
    if suite.shares is not None:  # the suite it shares runs with is shipped too, and shares none itself
        assert suite.shared_suite.name == suite.shares
        assert any(spec.log_dir.name == suite.shares for _, spec in suite.run_specs(path))


def test_local_sweep_writes_tables_and_plots_and_a_rerun_skips_completed_runs(tmp_path: Path) -> None:
    suite = smoke_suite()
    lines: list[str] = []
    report = compare(suite, tmp_path, workers=2, echo=lines.append)
    out = tmp_path / "smoke"
    assert len(lines) == 4 and all("final" in line for line in lines)
    for name in ("results.md", "results.json", "sample_efficiency.png", "final_return.png", "eva_ranks.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(report.to_dict()))
    assert SuiteReport.from_dict(saved) == report
    assert "p_eva_better_final" in saved["aggregate"]["full"]
    rows = report.tasks["PointGoal"].methods
    assert set(rows) == {"eva", "full"} and rows["eva"].seeds == 2
    assert rows["eva"].trainable_params < rows["full"].trainable_params
    retention = rows["eva"].source_retention_ci
    assert retention is not None
    assert retention.low <= rows["eva"].source_retention == retention.estimate <= retention.high
    assert retention.format() in (out / "results.md").read_text()
    assert report.aggregate["full"].p_reference_better is not None
    markdown = (out / "results.md").read_text()
    assert "## PointGoal (threshold 0.5)" in markdown and "| eva | 2 | 0.01 |" in markdown  # the rate it ran at
    assert rows["eva"].learning_rates == [pytest.approx(1e-2)]

    results = sorted(out.glob("PointGoal/*/seed*/result.json"))
    assert len(results) == 4
    stamps = {path: path.stat().st_mtime_ns for path in results}
    compare(suite, tmp_path, workers=1, echo=lines.append)
    assert {path: path.stat().st_mtime_ns for path in results} == stamps, "completed runs were not redone"

    results[0].unlink()  # an unfinished run: report-only aggregates the other three and runs nothing
    partial = compare(suite, tmp_path, echo=lines.append, report_only=True)
    assert sum(row.seeds for row in partial.tasks["PointGoal"].methods.values()) == 3
    assert not results[0].exists()


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("side_by_side", [False, True])
def test_a_failing_run_is_named_and_the_others_complete_before_its_error(
    tmp_path: Path, workers: int, side_by_side: bool
) -> None:
    from eva_rl.experiments.execute import SideBySide
    from eva_rl.experiments.run_folder import RunDirError

    suite = smoke_suite()
    (_, broken), *_ = suite.run_specs(tmp_path)
    broken.run_dir.mkdir(parents=True)
    (broken.run_dir / "settings.json").write_text("{damaged")
    lines: list[str] = []
    if side_by_side:  # finetune.py's executor: bars show the runs that end well, lines only the failed ones
        executor = SideBySide(workers, echo=lines.append, progress=False)
    else:
        executor = LocalProcesses(workers, echo=lines.append)
    with pytest.raises(RunDirError, match="settings.json"):
        executor.run([spec for _, spec in suite.run_specs(tmp_path)])
    failed = f"{broken.task.name} {broken.method} seed{broken.seed}: failed (RunDirError: "
    finals = 0 if side_by_side else 3
    assert sum(failed in line for line in lines) == 1 and sum("final" in line for line in lines) == finals, lines
    assert lines[-1] == "1 of 4 runs failed (named above); the first one's error:"
    assert len(list((tmp_path / "smoke").glob("PointGoal/*/seed*/result.json"))) == 3


def test_specs_are_one_per_task_method_seed_with_method_settings(tmp_path: Path) -> None:
    suite = smoke_suite()
    suite.method_settings = {"eva": {"learning_rate": 3e-3, "alpha": 8.0}}
    specs = [spec for _, spec in suite.run_specs(tmp_path)]
    assert [(s.method, s.seed) for s in specs] == [("eva", 0), ("full", 0), ("eva", 1), ("full", 1)]
    eva, full = specs[0], specs[1]
    assert eva.task.ppo["learning_rate"] == 3e-3 and eva.task.lora.alpha == 8.0
    assert full.task.ppo["learning_rate"] == 1e-3
    assert eva.task.total_timesteps == 4096 and eva.run_dir == tmp_path / "smoke" / "PointGoal" / "eva" / "seed0"


def test_a_pages_rate_cell_names_every_rate_its_runs_were_made_at() -> None:
    from eva_rl.experiments.studies.suite import rate_cell, run_learning_rates

    def made_at(rate: object) -> RunResult:
        settings = {"hyperparameters": {"learning_rate": rate}}
        return dataclasses.replace(_flat_run("PointGoal", "eva", 0, 0.5), settings=settings)

    unrecorded = _flat_run("PointGoal", "eva", 1, 0.5)
    runs = [made_at(2.5e-4), made_at(1.25e-4), made_at(2.5e-4), made_at("lin_3e-4"), unrecorded]
    assert run_learning_rates(runs) == [1.25e-4, 2.5e-4, "lin_3e-4"]  # distinct, numbers first; none recorded: left out
    assert rate_cell(run_learning_rates(runs)) == "1.25e-4 / 2.5e-4 / lin_3e-4"
    assert rate_cell(run_learning_rates(runs[:1])) == "2.5e-4" and rate_cell([]) == "-"


def test_bad_suites_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown suite 'nope'; known suites: .*'smoke'"):
        load_suite("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [{task: PointGoal, threshold: 0.5}]\nmethod_settings: {eva: {lr: 1}}\n")
    with pytest.raises(ConfigError, match=r"method_settings\['eva'\]"):
        load_suite(str(bad))


def test_tuning_sweeps_every_method_alike_and_picks_by_auc(tmp_path: Path) -> None:
    suite = smoke_suite()
    report = conduct(TuningSweep(suite, tmp_path, echo=lambda line: None), LocalProcesses(2, echo=lambda line: None))
    chosen = report["chosen"]
    table = json.loads((tmp_path / "smoke-tuning" / "tuning.json").read_text())
    assert set(chosen) == {"eva", "full"}
    for method, point in chosen.items():
        scores = table["auc_iqm"][method]
        assert set(scores) == {"learning_rate0.001", "learning_rate0.003", "learning_rate0.01"}
        assert scores[f"learning_rate{point['learning_rate']:g}"] == max(scores.values())
    # the final-return table, against every run's own final return (one task, one tuning seed: the IQM is the run)
    for point_dir in (tmp_path / "smoke-tuning").glob("learning_rate*"):
        for method in ("eva", "full"):
            (result,) = point_dir.glob(f"smoke/PointGoal/{method}/seed*/result.json")
            final = json.loads(result.read_text())["final_return"]
            assert table["final_iqm"][method][point_dir.name] == pytest.approx(final)
    assert (tmp_path / "smoke-tuning" / "sensitivity.png").stat().st_size > 10_000
    assert sorted(
        p.name for p in (tmp_path / "smoke-tuning" / "learning_rate0.003" / "smoke" / "PointGoal").iterdir()
    ) == [
        "eva",
        "full",
    ]


def _flat_run(task: str, method: str, seed: int, value: float) -> RunResult:
    """A run whose eval return is ``value`` throughout: its normalized AUC and final return are ``value``."""
    curve = [[0, value], [4096, value]]
    return RunResult(
        task, method, seed, 4096, value, value, value, curve, trainable_params=1, total_params=1, wall_seconds=1.0
    )


def test_a_tuning_sweep_under_way_reports_the_points_it_has_and_says_how_many_runs_are_in(tmp_path: Path) -> None:
    suite = smoke_suite()  # grid 1e-3 / 3e-3 / 1e-2, methods eva and full, one tuning seed, one task
    sweep = TuningSweep(suite, tmp_path, echo=lambda line: None)
    planned = sweep.plan()
    # eva has runs at two points, full at one
    returns = {
        ("eva", "learning_rate0.001"): 0.2,
        ("eva", "learning_rate0.003"): 0.7,
        ("full", "learning_rate0.01"): 0.4,
    }
    runs = [
        (key, _flat_run(key[1], spec.method, spec.seed, returns[(spec.method, key[0])]))
        for key, spec in planned
        if (spec.method, key[0]) in returns
    ]
    report = sweep.report(runs)
    assert report["auc_iqm"]["eva"] == pytest.approx({"learning_rate0.001": 0.2, "learning_rate0.003": 0.7})
    assert report["final_iqm"]["full"] == pytest.approx({"learning_rate0.01": 0.4})
    assert report["chosen"] == {"eva": {"learning_rate": 3e-3}, "full": {"learning_rate": 1e-2}}
    assert report["partial"] == {"completed": 3, "planned": 6} and len(planned) == 6
    sweep.write_page(report, runs)  # the sensitivity plot leaves gaps where points have no runs yet
    assert (tmp_path / "smoke-tuning" / "sensitivity.png").stat().st_size > 10_000
    # once every run is in, the report says nothing of a sweep under way
    complete = [(key, _flat_run(key[1], spec.method, spec.seed, 0.5)) for key, spec in planned]
    assert "partial" not in sweep.report(complete)
    # a method the sweep never started (a control run at another's rate) leaves a complete sweep complete
    eva_alone = [(key, run) for key, run in complete if run.method == "eva"]
    assert "partial" not in sweep.report(eva_alone) and "partial" in sweep.report(eva_alone[1:])


def test_a_methods_own_tuning_values_are_tried_for_it_alone_and_can_be_chosen(tmp_path: Path) -> None:
    suite = dataclasses.replace(smoke_suite(), method_tuning_grid={"eva": {"learning_rate": [3e-4, 1e-2]}})
    assert suite.tuning_grid_of("eva") == {"learning_rate": [3e-4, 1e-3, 3e-3, 1e-2]}  # 1e-2 once
    assert suite.tuning_grid_of("full") == suite.tuning_grid
    sweep = TuningSweep(suite, tmp_path, echo=lambda line: None)
    planned = sweep.plan()
    by_method = {m: sorted(key[0] for key, spec in planned if spec.method == m) for m in ("eva", "full")}
    assert by_method["eva"] == ["learning_rate0.0003", "learning_rate0.001", "learning_rate0.003", "learning_rate0.01"]
    assert by_method["full"] == ["learning_rate0.001", "learning_rate0.003", "learning_rate0.01"]
    # eva's own value wins: chosen, and at its grid's edge, the note names where to extend eva's values
    returns = dict(zip(by_method["eva"], (0.9, 0.5, 0.3, 0.1)))  # 3e-4 best, then falling with the rate
    runs = [(key, _flat_run(key[1], spec.method, spec.seed, returns[key[0]])) for key, spec in planned]
    report = sweep.report(runs)
    assert report["chosen"] == {"eva": {"learning_rate": 3e-4}, "full": {"learning_rate": 1e-3}}
    assert "partial" not in report and set(report["auc_iqm"]["full"]) == set(by_method["full"])
    # both at their grid's smallest: eva is told to extend its own values, full the shared grid
    eva_note, full_note = edge_notes(suite, report["chosen"])
    assert "best learning_rate of eva, 0.0003, is the grid's smallest" in eva_note
    assert "extend method_tuning_grid.eva.learning_rate past it" in eva_note
    assert "of full, 0.001, is the grid's smallest" in full_note and "extend tuning_grid.learning_rate" in full_note
    # a sweep of full alone plans, reports and draws full's grid, eva's own values left out (mujoco-2m's page drew
    # lora-orth-fa's two rates past the grid before that method's tuning ran)
    from eva_rl.experiments.plots import new_figure
    from eva_rl.experiments.studies.tuning import draw_sensitivity

    alone = TuningSweep(suite, tmp_path, ["full"], echo=lambda line: None)
    assert suite.tuning_grid_over(["full"]) == suite.tuning_grid
    assert {key[0] for key, _ in alone.plan()} == set(by_method["full"])
    report = alone.report([(key, run) for key, run in runs if run.method == "full"])
    figure, axes = new_figure(1, 2)
    draw_sensitivity(axes, suite, report, suite.tuning_grid_over(["full"]))
    assert [tick.get_text() for tick in axes[0].get_xticklabels()] == ["1e-3", "3e-3", "0.01"]


def test_a_tuning_sweep_scores_a_success_task_by_its_success_rate(tmp_path: Path, monkeypatch) -> None:
    from eva_rl.experiments.studies import base

    suite = smoke_suite()
    suite.tasks = [dataclasses.replace(task, score="success") for task in suite.tasks]
    sweep = TuningSweep(suite, tmp_path, echo=lambda line: None)
    (key, spec), *_ = sweep.plan()
    # the return is 50 throughout while the success rate stays at 0.1: the sweep must read the success rate
    run = dataclasses.replace(_flat_run(key[1], spec.method, spec.seed, 50.0), success_curve=[[0, 0.1], [4096, 0.1]])
    spec.folder.result_file.parent.mkdir(parents=True)
    spec.folder.result_file.write_text("{}")  # the one complete run; its result is the one above
    monkeypatch.setattr(base, "completed_result", lambda spec: run)
    runs = sweep.completed()
    assert [result.final_return for _, result in runs] == [0.1]
    report = sweep.report(runs)
    assert report["score"] == "success" and report["auc_iqm"][spec.method][key[0]] == pytest.approx(0.1)


def test_tune_with_report_only_runs_nothing_and_names_an_empty_sweep(tmp_path: Path, capsys) -> None:
    from eva_rl.experiments import cli

    assert cli.compare_main(["--suite", "smoke", "--tune", "--report-only", "--log-dir", str(tmp_path)]) == 2
    assert "no completed runs of suite smoke's tuning sweep" in capsys.readouterr().err
    assert not (tmp_path / "smoke-tuning").exists()


def test_a_choice_at_the_grids_edge_is_named_with_the_way_to_extend_it() -> None:
    grid = {"learning_rate": [1e-3, 2e-3, 4e-3]}
    notes = at_the_edge(grid, {"eva": {"learning_rate": 4e-3}, "lora": {"learning_rate": 2e-3}})
    assert notes == [
        "note: the best learning_rate of eva, 0.004, is the grid's largest: the best may lie beyond it "
        "(extend tuning_grid.learning_rate past it and tune again; the runs made are kept)"
    ]
    at_rank_one = at_the_edge(grid, {"lora at r = 1": {"learning_rate": 1e-3}}, "rank_study.tuning_grid")
    assert "smallest" in at_rank_one[0] and "extend rank_study.tuning_grid.learning_rate" in at_rank_one[0]
    # a grid of two values has no inside to prefer
    assert at_the_edge({"learning_rate": [1e-3, 2e-3]}, {"eva": {"learning_rate": 2e-3}}) == []


def test_ray_backend_runs_a_tiny_sweep_on_a_local_instance(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    suite = smoke_suite()
    lines: list[str] = []
    report = compare(suite, tmp_path, echo=lines.append, backend="ray")
    assert len(lines) == 4 and lines[-1].startswith("[4/4]")
    assert set(report.tasks["PointGoal"].methods) == {"eva", "full"}
    assert len(sorted((tmp_path / "smoke").glob("PointGoal/*/seed*/result.json"))) == 4


def test_tasks_can_run_a_subset_of_methods_with_their_own_eval_freq(tmp_path: Path) -> None:
    path = tmp_path / "two.yaml"
    path.write_text(
        "tasks:\n"
        "  - {task: PointGoal, threshold: 0.5, eval_freq: 512}\n"
        "  - {task: MiniGrid-DoorKey, threshold: 0.9, total_timesteps: 3000, methods: [eva]}\n"
        "methods: [eva, full]\nseeds: 2\n"
    )
    suite = load_suite(str(path))
    specs = [(t.task, s.method, s.seed) for t, s in suite.run_specs(tmp_path)]
    assert specs == [
        ("PointGoal", "eva", 0),
        ("PointGoal", "full", 0),
        ("PointGoal", "eva", 1),
        ("PointGoal", "full", 1),
        ("MiniGrid-DoorKey", "eva", 0),
        ("MiniGrid-DoorKey", "eva", 1),
    ]
    pairs = suite.run_specs(tmp_path, methods=["full"])
    assert [(t.task, s.method) for t, s in pairs] == [("PointGoal", "full")] * 2
    assert pairs[0][1].task.eval.freq == 512
    doorkey = suite.run_specs(tmp_path, methods=["eva"])[-1][1].task
    assert doorkey.eval.freq == find_task("MiniGrid-DoorKey").eval.freq and doorkey.total_timesteps == 3000

    path.write_text("tasks: [{task: PointGoal, threshold: 0.5, methods: [lora]}]\nmethods: [eva, full]\n")
    with pytest.raises(ConfigError, match=r"methods=\['lora'\] is invalid: .*suite's methods \['eva', 'full'\]"):
        load_suite(str(path))


def _synthetic_run(method: str, final: float) -> RunResult:
    return RunResult(
        task="t",
        method=method,
        seed=0,
        total_timesteps=1000,
        jumpstart=0.0,
        final_return=final,
        best_return=final,
        eval_curve=[[0, 0.0], [1000, final]],
        trainable_params=10,
        total_params=10,
        wall_seconds=1.0,
    )


def test_methods_run_on_fewer_tasks_are_aggregated_and_compared_on_their_own_tasks() -> None:
    first, second = SuiteTask("A", 0.5), SuiteTask("B", 0.5, methods=["eva"])
    suite = Suite("s", [first, second], methods=["eva", "lora"])
    runs = [(first, _synthetic_run("eva", v)) for v in (0.6, 0.7, 0.8)]
    runs += [(first, _synthetic_run("lora", v)) for v in (0.1, 0.2, 0.3)]
    runs += [(second, _synthetic_run("eva", v)) for v in (0.0, 0.0, 0.0)]
    report = aggregate(suite, runs)
    assert report.aggregate["eva"].tasks == ["A", "B"]
    assert report.aggregate["lora"].tasks == ["A"]
    # On task A every eva seed beats every lora seed; task B, where lora did not run, must not dilute that.
    assert report.aggregate["lora"].p_reference_better.estimate == 1.0
    assert report.aggregate["lora"].final.estimate == pytest.approx(0.2)
    assert "| lora | 1 |" in results_markdown(report)


@pytest.mark.parametrize("methods", [["eva", "lora"], ["eva-fa", "lora-orth-fa"]])
def test_a_page_without_its_reference_has_no_columns_comparing_with_it(methods: list[str]) -> None:
    task = SuiteTask("A", 0.5)
    suite = Suite("s", [task], methods=methods)
    report = aggregate(suite, [(task, _synthetic_run(m, v)) for m in methods for v in (0.2, 0.4, 0.6)])
    markdown = results_markdown(report)
    assert ("P(eva better)" in markdown) == ("eva" in methods)
    # every row of the task and suite tables has as many cells as its header
    for table in ("| method | seeds |", "| method | tasks |"):
        rows = markdown[markdown.index(table) :].split("\n\n")[0].splitlines()
        assert len(rows) == 2 + len(methods)
        assert {row.count("|") for row in rows} == {rows[0].count("|")}


def test_each_task_table_gives_p_eva_better_there_as_the_mann_whitney_statistic() -> None:
    from scipy.stats import mannwhitneyu

    first, second = SuiteTask("A", 0.5), SuiteTask("B", 0.5)
    suite = Suite("s", [first, second], methods=["eva", "lora"])
    finals = {("A", "eva"): (0.6, 0.2, 0.9, 0.4), ("A", "lora"): (0.5, 0.5, 0.1), ("B", "eva"): (0.3, 0.3, 0.1)}
    finals[("B", "lora")] = (0.3, 0.8, 0.2, 0.7)
    runs = [
        (first if task == "A" else second, _synthetic_run(method, v))
        for (task, method), values in finals.items()
        for v in values
    ]
    report = aggregate(suite, runs)
    markdown = results_markdown(report)
    for task in ("A", "B"):
        eva, lora = finals[(task, "eva")], finals[(task, "lora")]
        # ties count half, as in the U statistic
        expected = mannwhitneyu(eva, lora).statistic / (len(eva) * len(lora))
        row = report.tasks[task].methods["lora"]
        assert row.p_reference_better.estimate == pytest.approx(expected)
        # a straight-line curve from 0: the AUC is half the final return, so the order of the runs is the same
        assert row.p_reference_better_auc.estimate == pytest.approx(expected)
        assert report.tasks[task].methods["eva"].p_reference_better is None
        assert str(row.p_reference_better) in markdown
    # the page's pooled figure is the mean of the per-task ones
    pooled = report.aggregate["lora"].p_reference_better.estimate
    assert pooled == pytest.approx(np.mean([report.tasks[t].methods["lora"].p_reference_better.estimate for t in "AB"]))
    assert SuiteReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report


def test_env_steps_eva_collected_itself_come_out_of_the_same_budget_and_move_no_other_method() -> None:
    """A run whose EVA took 200 env steps of its own is scored over the same 1000 steps as the others: the pretrained
    policy (return 0) over its first 200, its curve cut at 1000. Adding it must leave the other method's AUC as it
    was."""
    task = SuiteTask("A", 0.5)
    suite = Suite("s", [task], methods=["eva", "lora"])
    lora = [(task, _synthetic_run("lora", v)) for v in (0.2, 0.4, 0.6)]
    own = [(task, dataclasses.replace(_synthetic_run("eva", v), eva_env_steps=200)) for v in (0.2, 0.4, 0.6)]
    alone = aggregate(Suite("s", [task], methods=["lora"]), lora).tasks["A"].methods["lora"].auc.estimate
    both = aggregate(suite, lora + own).tasks["A"].methods
    assert both["lora"].auc.estimate == pytest.approx(alone) == pytest.approx(0.4 / 2)
    # eva: 0 until 200, then linear from 0 to v over 1000 steps, cut at 1000 where it is 0.8 v: 0.8 v * 800 / 2 / 1000
    assert both["eva"].auc.estimate == pytest.approx(0.8 * 0.4 * 800 / 2 / 1000)
    # and its final return is read where the budget ends, not 200 steps later
    assert both["eva"].final.estimate == pytest.approx(0.8 * 0.4) and both["lora"].final.estimate == pytest.approx(0.4)
    assert both["eva"].reached_threshold == 0 and both["lora"].reached_threshold == 1


def test_task_method_settings_apply_per_method_and_the_suite_and_command_line_override_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from eva_rl.experiments import cli

    settings = {"eva": {"learning_rate": 3e-3, "r": 2}, "full": {"learning_rate": 5e-4}}
    task = find_task("PointGoal").with_overrides({"method_settings": settings})
    eva, full, lora = (task.with_overrides(method=m) for m in ("eva", "full", "lora"))
    assert (eva.ppo["learning_rate"], eva.lora.r) == (3e-3, 2)
    assert full.ppo["learning_rate"] == 5e-4 and lora.ppo["learning_rate"] == task.ppo["learning_rate"]

    suite = smoke_suite()
    suite.method_settings = {"eva": {"alpha": 8.0}, "full": {"learning_rate": 1e-4}}
    monkeypatch.setattr(Suite, "task", lambda self, suite_task: task)
    eva = suite.run_spec(suite.tasks[0], "eva", 0, tmp_path).task
    assert (eva.ppo["learning_rate"], eva.lora.r, eva.lora.alpha) == (3e-3, 2, 8.0)
    assert suite.run_spec(suite.tasks[0], "full", 0, tmp_path).task.ppo["learning_rate"] == 1e-4

    args = cli.COMMANDS["finetune"].parser().parse_args(["--env", "PointGoal", "--lr", "7e-4", "--rank", "3"])
    cli_task = cli.apply_flags(task, args)
    assert cli_task.with_overrides(method="eva").ppo["learning_rate"] == 7e-4
    assert cli_task.with_overrides(method="eva").lora.r == 3
    assert cli_task.with_overrides(method="full").ppo["learning_rate"] == 7e-4

    with pytest.raises(ConfigError, match=r"method_settings\['eva'\]=\{'lr': 1\} is invalid"):
        task.with_overrides({"method_settings": {"eva": {"lr": 1}}})


@pytest.mark.parametrize("n_methods", [3, 6])
def test_plots_name_each_methods_tasks_and_seeds_and_stay_readable_with_many_methods(
    n_methods: int, tmp_path: Path
) -> None:
    """The core methods share a panel per task; the others get their own figure, with full fine-tuning beside them;
    final_return.png has a panel per task."""
    from PIL import Image

    methods = ["eva", "full", "lora", "pissa", "olora", "dora"][:n_methods]
    first, second = SuiteTask("A", 0.5), SuiteTask("B", 0.5, methods=["eva", "full"])
    suite = Suite("s", [first, second], methods=methods)
    runs = [(first, dataclasses.replace(_synthetic_run(m, 0.1 * i), seed=i)) for m in methods for i in range(3)]
    runs += [(second, dataclasses.replace(_synthetic_run(m, 0.5), seed=i)) for m in ("eva", "full") for i in range(2)]
    paths = SuiteStudy(suite, tmp_path.parent).write_page(aggregate(suite, runs), runs)
    tmp_path = tmp_path.parent / "s"
    with Image.open(tmp_path / "sample_efficiency.png") as image:
        assert image.size == (2 * 5.0 * 120, 4.6 * 120), "one panel per task"
    zoo = tmp_path / "sample_efficiency_zoo.png"
    assert (zoo in paths) == (n_methods > 3) == zoo.exists(), "pissa, olora, dora have a figure of their own"
    assert tmp_path / "final_return.png" in paths


def test_frozen_a_methods_are_dashed_in_the_colour_family_of_the_method_they_shade() -> None:
    from eva_rl.experiments.plots import method_color, method_linestyle

    assert [method_linestyle(m) for m in ("eva-fa", "lora-fa", "lora-orth-fa")] == ["--"] * 3
    assert [method_linestyle(m) for m in ("eva", "lora", "lora-orth", "a continual approach")] == ["-"] * 4
    assert len({method_color(m) for m in ("eva", "eva-fa", "lora", "lora-orth-fa")}) == 4


@pytest.mark.parametrize(
    ("value", "label"),
    [(1.5625e-5, "1.5625e-5"), (1.25e-4, "1.25e-4"), (1e-3, "1e-3"), (5e-4, "5e-4"), (0.03, "0.03"), (2.5, "2.5"),
     (64, "64"), (0.0, "0"), (-2e-3, "-2e-3"), (3e5, "3e5")],
)  # fmt: skip
def test_a_grid_value_is_labelled_in_one_style_along_a_learning_rate_axis(value: float, label: str) -> None:
    from eva_rl.experiments.plots import value_label

    assert value_label(value) == label and float(label) == value


@pytest.mark.parametrize(("seeds", "label"), [(1, "eva (1 seed)"), (10, "eva (10 seeds)")])
def test_a_legend_entry_counts_its_seeds_in_the_right_number(seeds: int, label: str) -> None:
    from eva_rl.experiments.plots import method_label

    assert method_label("eva", seeds) == label


def test_a_rerun_of_some_methods_keeps_the_others_on_the_page_and_names_stale_runs(tmp_path: Path) -> None:
    suite = smoke_suite()
    lines: list[str] = []
    compare(suite, tmp_path, methods=["eva"], workers=2, echo=lines.append)
    assert set(json.loads((tmp_path / "smoke" / "results.json").read_text())["tasks"]["PointGoal"]["methods"]) == {
        "eva"
    }
    report = compare(suite, tmp_path, methods=["full"], seeds=[0], workers=1, echo=lines.append)
    rows = report.tasks["PointGoal"].methods
    assert (rows["eva"].seeds, rows["full"].seeds) == (2, 1)  # eva's runs stay on the page after a rerun of full

    retuned = dataclasses.replace(suite, method_settings={**suite.method_settings, "eva": {"learning_rate": 5e-3}})
    lines.clear()
    report = compare(retuned, tmp_path, report_only=True, echo=lines.append)
    assert set(report.tasks["PointGoal"].methods) == {"full"}
    assert len(lines) == 1 and "leave out 2 run(s) made with other settings" in lines[0]
    assert "learning_rate" in lines[0] and "--overwrite" in lines[0]
    with pytest.raises(ConfigError, match="no completed runs"):
        compare(retuned, tmp_path, methods=["eva"], report_only=True, echo=lines.append)


@pytest.mark.parametrize(("untuned", "noted"), [([], None), (["eva"], "eva"), (["eva", "full"], "eva, full")])
def test_a_suite_run_names_the_methods_it_runs_at_a_rate_no_tuning_chose(
    tmp_path: Path, untuned: list[str], noted: str | None
) -> None:
    """mujoco-2m listed scratch and full before their tuning: their runs would take the task's rate unremarked."""

    class Planner:
        """An executor that runs nothing, keeping the runs it was given."""

        def run(self, specs, overwrite=False):
            self.specs = specs

    suite = smoke_suite()
    suite.method_settings = {m: s for m, s in suite.method_settings.items() if m not in untuned}
    lines: list[str] = []
    executor = Planner()
    SuiteStudy(suite, tmp_path, echo=lines.append).carry_out(executor)
    assert len(executor.specs) == 4  # the note holds no run back
    notes = [line for line in lines if line.startswith("note:")]
    if noted is None:
        assert notes == []
    else:
        assert len(notes) == 1 and notes[0].startswith(f"note: {noted} run at a learning_rate no tuning chose")
        assert f"--tune --methods {noted.replace(', ', ',')}" in notes[0]


@pytest.mark.parametrize(
    ("plateau", "spread", "zoomed"),
    [([-150.0, -152.0], 1.0, True), ([-500.0, -150.0], 1.0, False), ([-150.0, -150.0], 0.0, False)],
)
def test_a_panel_whose_curves_end_on_a_plateau_gets_a_zoomed_inset(
    plateau: list[float], spread: float, zoomed: bool
) -> None:
    """Pendulum's methods end within 40 of each other on an axis that starts at -900: an inset shows them apart.
    Curves on one value throughout (a success rate stuck at 0) leave a zoom nothing to show."""
    from eva_rl.experiments.plots import new_figure
    from eva_rl.experiments.studies.suite import draw_sample_efficiency, sample_efficiency_figure

    task = SuiteTask("A", 0.5)
    suite = Suite("s", [task], methods=["eva", "lora"])
    runs = []
    for i, method in enumerate(["eva", "lora"]):
        curve = [[0, -900.0], [500, -700.0], [1000, plateau[0] - i * spread], [2000, plateau[1] - i * spread]]
        runs.append((task, dataclasses.replace(_synthetic_run(method, curve[-1][1]), eval_curve=curve)))
    figure, axes = new_figure(**sample_efficiency_figure(1))
    draw_sample_efficiency(axes, aggregate(suite, runs), runs, ["eva", "lora"], ["A"])
    assert bool(axes[0][0].child_axes) == zoomed
    if zoomed:
        low, high = axes[0][0].child_axes[0].get_ylim()
        assert -160 < low < high < -145
    figure.tight_layout()
    renderer = figure.canvas.get_renderer()
    legend, panel = axes[0][0].get_legend().get_window_extent(renderer), axes[0][0].get_window_extent(renderer)
    assert legend.y1 < panel.y0, "the legend lies below the panel, where it hides no curve"


@pytest.mark.parametrize(("pretrained", "clipped"), [([0.6, 0.9], True), ([1.0, 1.0], False)])
def test_scratch_far_below_is_clipped_only_where_the_pretrained_curves_span_a_range(
    pretrained: list[float], clipped: bool
) -> None:
    """Scratch starting far below keeps the axis to the pretrained methods' range; where every pretrained run sits
    at one score (CW10's handle-press-side at success 1.0 throughout) that range is a point, and the axis is left
    whole rather than collapsed onto it."""
    import warnings

    from eva_rl.experiments.plots import new_figure
    from eva_rl.experiments.studies.suite import draw_sample_efficiency, sample_efficiency_figure

    task = SuiteTask("A", 0.5)
    suite = Suite("s", [task], methods=["scratch", "lora"])
    curves = {"lora": [[0, pretrained[0]], [1000, pretrained[1]]], "scratch": [[0, -50.0], [1000, -40.0]]}
    runs = [
        (task, dataclasses.replace(_synthetic_run(method, curve[-1][1]), eval_curve=curve, seed=seed))
        for method, curve in curves.items()
        for seed in (0, 1)
    ]
    figure, axes = new_figure(**sample_efficiency_figure(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns of a singular axis, and expands it past every curve
        draw_sample_efficiency(axes, aggregate(suite, runs), runs, ["scratch", "lora"], ["A"])
    panel = axes[0][0]
    low, high = panel.get_ylim()
    assert ("scratch clipped" in panel.get_title()) == clipped
    assert low < high
    assert (low > -40.0) == clipped


@pytest.mark.parametrize(("score", "finals", "whole"), [("success", [0.0, 0.0], True), ("return", [0.9, 1.0], False)])
def test_a_success_rates_panels_span_zero_to_one(score: str, finals: list[float], whole: bool) -> None:
    """CW10's shelf-place ends at success 0 for every method: its panels read -0.04 to 0.04, and window-close's 0.90
    to 1.00 beside it; a rate's panels span [0, 1] (final and curves), a return's keep to its values."""
    from eva_rl.experiments.plots import new_figure
    from eva_rl.experiments.studies.suite import (
        draw_final_returns,
        draw_sample_efficiency,
        panel_grid,
        sample_efficiency_figure,
    )

    task = SuiteTask("A", 0.5, score=score)
    suite = Suite("s", [task], methods=["eva", "lora"])
    runs = [
        (task, dataclasses.replace(_synthetic_run(m, v), task="A", eval_curve=[[0, v], [1000, v]]))
        for m, v in zip(["eva", "lora"], finals)
    ]
    figure, axes = new_figure(**panel_grid(1, 4.2, 2.4))
    draw_final_returns(axes, aggregate(suite, runs))
    figure_, curves = new_figure(**sample_efficiency_figure(1))
    draw_sample_efficiency(curves, aggregate(suite, runs), runs, ["eva", "lora"], ["A"])
    for low, high in (np.ravel(axes)[0].get_xlim(), np.ravel(curves)[0].get_ylim()):
        assert (low <= 0.0 and high >= 1.0) == whole and low < high
        assert low > -0.1  # never a negative rate


def test_a_suite_of_many_tasks_wraps_its_panels_five_to_a_row() -> None:
    """CW10's ten tasks would make a figure 50 inches wide: seven tasks take two rows of five, the last three blank."""
    from eva_rl.experiments.plots import new_figure
    from eva_rl.experiments.studies.suite import draw_final_returns, draw_sample_efficiency, sample_efficiency_figure

    tasks = [SuiteTask(name, 0.5) for name in "ABCDEFG"]
    suite = Suite("s", tasks, methods=["eva"])
    runs = [(task, dataclasses.replace(_synthetic_run("eva", 0.5), task=task.task)) for task in tasks]
    report = aggregate(suite, runs)
    assert sample_efficiency_figure(2)["nrows"] == 1 and sample_efficiency_figure(2)["ncols"] == 2
    for draw in (lambda axes: draw_sample_efficiency(axes, report, runs, ["eva"], list(report.tasks)),
                 lambda axes: draw_final_returns(axes, report)):  # fmt: skip
        figure, axes = new_figure(**sample_efficiency_figure(len(tasks)))
        assert axes.shape == (2, 5)
        draw(axes)
        assert [axis.get_title().split()[0] for axis in axes.flat[:7]] == list("ABCDEFG")
        assert [axis.axison for axis in axes.flat] == [True] * 7 + [False] * 3


def test_a_suites_settings_hold_for_every_run_its_tuning_and_rank_study_included(tmp_path: Path) -> None:
    """The committed suites pin ``eva_data: rollouts``, the data source their runs were made with."""
    from eva_rl.experiments.studies.ranks import RankStudyRuns

    suite = dataclasses.replace(smoke_suite(), settings={"eva_data": "rollouts", "eval_episodes": 3})
    specs = [spec for _, spec in suite.run_specs(tmp_path)]
    specs += [spec for _, spec in TuningSweep(suite, tmp_path).plan()]
    specs += [spec for _, spec in RankStudyRuns(suite, tmp_path).plan()]
    assert {(spec.task.eva.data_source, spec.task.eval.episodes) for spec in specs} == {("rollouts", 8)}
    unpinned = dataclasses.replace(smoke_suite(), settings={"eva_data": "ppo"}).run_specs(tmp_path)
    assert {spec.task.eva.data_source for _, spec in unpinned} == {"ppo"}
    with pytest.raises(ConfigError, match=r"settings\['eva_data'\]='own' is invalid"):
        dataclasses.replace(smoke_suite(), settings={"eva_data": "own"})
    with pytest.raises(ConfigError, match=r"settings=\{'lr': 1\} is invalid"):
        dataclasses.replace(smoke_suite(), settings={"lr": 1})


def _evaluated_run(method: str, curve: list[list[float]], algorithm: str = "ppo") -> RunResult:
    run = _synthetic_run(method, curve[-1][1])
    settings = {"hyperparameters": {"n_steps": 16}, "n_envs": 2}  # a rollout of 32 steps
    return dataclasses.replace(run, eval_curve=curve, algorithm=algorithm, settings=settings)


def test_the_return_after_k_updates_is_read_where_every_seed_was_evaluated_there() -> None:
    task = SuiteTask("A", 0.5)
    suite = Suite("s", [task], methods=["eva", "lora", "full"])
    # every 5 updates (160 steps) for eva: after 5, 10 and 25 updates; lora evaluated off the grid near 10 updates
    every_five = [[0, 0.0], [160, 0.2], [320, 0.4], [480, 0.5], [640, 0.6], [800, 0.9]]
    eva = [_evaluated_run("eva", [[s, v + i / 10] for s, v in every_five]) for i in range(4)]
    lora = [_evaluated_run("lora", [[0, 0.0], [160, 0.1], [330, 0.3], [800, 0.8]]) for _ in range(3)]
    sac = [_evaluated_run("full", every_five, algorithm="sac") for _ in range(3)]  # an off-policy run: no updates
    report = aggregate(suite, [(task, run) for run in eva + lora + sac])
    rows = report.tasks["A"].methods
    # the IQM of 4 seeds is the mean of the middle two: (v + 0.1 + v + 0.2) / 2
    assert {k: round(i.estimate, 6) for k, i in rows["eva"].after_updates.items()} == {5: 0.35, 10: 0.55, 25: 1.05}
    assert set(rows["lora"].after_updates) == {5, 25} and rows["full"].after_updates == {}
    page = results_markdown(report)
    assert (
        "| method | after 5 | after 10 | after 25 |" in page
        and "| lora | 0.100 [0.100, 0.100] | - | 0.800 [0.800, 0.800] |" in page
    )
    assert SuiteReport.from_dict(report.to_dict()).tasks["A"].methods["eva"].after_updates == rows["eva"].after_updates
    assert "Eval return after k updates" in page
    success = SuiteTask("A", 0.5, score="success")  # the table names the score it reads, as the others do
    page = results_markdown(aggregate(Suite("s", [success], methods=["eva"]), [(success, run) for run in eva]))
    assert "Eval success after k updates" in page and "Eval return" not in page


def test_a_task_whose_every_evaluation_returned_zero_is_named_on_the_page() -> None:
    """Meta-World v3's shelf-place pays nothing until the gripper cages the block: a page must say that its zeros
    compare no learning, and only for a task where every evaluation of every run returned exactly 0, whatever the
    page scores (a success-scored task whose success stayed 0 while its returns moved is not such a task)."""
    silent, rewarded, unsolved = (
        SuiteTask("silent", 0.5),
        SuiteTask("rewarded", 0.5),
        SuiteTask("unsolved", 0.5, score="success"),
    )
    suite = Suite("s", [silent, rewarded, unsolved], methods=["eva", "lora"])
    zeros = [[0, 0.0], [500, 0.0], [1000, 0.0]]
    runs = [(silent, _evaluated_run(m, zeros)) for m in ("eva", "lora")]
    # one nonzero evaluation, in the middle of one run, makes a task rewarded
    runs += [
        (rewarded, _evaluated_run("eva", zeros)),
        (rewarded, _evaluated_run("lora", [[0, 0.0], [500, 0.1], [1000, 0.0]])),
    ]
    returns = [[0, 0.0], [500, 2.5], [1000, 3.9]]  # push-back: small returns, no success
    runs += [
        (unsolved, dataclasses.replace(_evaluated_run(m, returns), success_curve=zeros).scored("success"))
        for m in ("eva", "lora")
    ]
    report = aggregate(suite, runs)
    assert [name for name, task in report.tasks.items() if task.rewardless] == ["silent"]
    assert "return_curve" not in runs[-1][1].to_dict(), "result.json keeps the fields it always had"
    page = results_markdown(report)
    assert page.count("returned exactly 0") == 1
    assert page.index("returned exactly 0") < page.index("## rewarded")
    assert SuiteReport.from_dict(report.to_dict()).tasks["silent"].rewardless
    assert "rewardless" not in report.to_dict()["tasks"]["rewarded"]  # reports written before it read back the same


def test_pooled_scores_are_normalized_per_task_between_zero_shot_and_full_fine_tuning() -> None:
    """Two tasks on scales 100x apart: eva halfway from the pretrained agent to full fine-tuning on both is 0.5 on
    the normalized scale, whatever the raw returns."""
    a, b = SuiteTask("A", 0.5), SuiteTask("B", 250.0)
    suite = Suite("s", [a, b], methods=["eva", "full"])

    def run(method: str, zero: float, final: float) -> RunResult:
        return dataclasses.replace(_synthetic_run(method, final), jumpstart=zero, eval_curve=[[0, zero], [1000, final]])

    runs = [(a, run("full", 0.0, 1.0)) for _ in range(3)] + [(a, run("eva", 0.0, 0.5)) for _ in range(3)]
    runs += [(b, run("full", 100.0, 300.0)) for _ in range(3)] + [(b, run("eva", 100.0, 200.0)) for _ in range(3)]
    report = aggregate(suite, runs)
    eva, full = report.aggregate["eva"], report.aggregate["full"]
    assert eva.final_normalized.estimate == pytest.approx(0.5) and full.final_normalized.estimate == pytest.approx(1)
    # AUC of a straight line from zero-shot to the final return is their mean: eva's is halfway to full's too
    assert eva.auc_normalized.estimate == pytest.approx(0.5) and full.auc_normalized.estimate == pytest.approx(1)
    assert eva.final.estimate not in (pytest.approx(0.5),)  # the raw pooled IQM mixes the two scales
    page = results_markdown(report)
    assert "A 0.000 -> 1.000; B 100.000 -> 300.000" in page
    assert SuiteReport.from_dict(report.to_dict()).aggregate["eva"].final_normalized == eva.final_normalized


def test_reading_a_runs_log_keeps_tensorboards_warnings_off_the_console(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from eva_rl.experiments.plots import read_scalars

    def reload(accumulator: EventAccumulator) -> EventAccumulator:  # what it says on a resumed run's log
        logging.getLogger("tensorboard").warning("Detected out of order event.step likely caused by a TF restart")
        return accumulator

    monkeypatch.setattr(EventAccumulator, "Reload", reload)
    level = logging.getLogger("tensorboard").level
    with caplog.at_level(logging.WARNING):
        steps, _ = read_scalars(tmp_path, "train/approx_kl")
    assert steps.size == 0 and "out of order" not in caplog.text
    assert logging.getLogger("tensorboard").level == level


def test_a_suite_sets_the_bootstrap_resamples_of_its_page() -> None:
    task = SuiteTask("A", 0.5)
    runs = [(task, _synthetic_run("eva", v)) for v in (0.1, 0.5, 0.9, 0.3, 0.25, 0.7, 0.65, 0.15, 0.8, 0.45)]
    few, many = (aggregate(Suite("s", [task], methods=["eva"], resamples=n), runs) for n in (2000, 50000))
    assert "(50,000 resamples)" in results_markdown(many) and many.to_dict()["resamples"] == 50000
    assert "resamples" not in few.to_dict()  # the pages made before it existed read back unchanged
    assert few.tasks["A"].methods["eva"].final != many.tasks["A"].methods["eva"].final  # another bootstrap
    with pytest.raises(ConfigError, match="resamples=0 is invalid"):
        Suite("s", [task], methods=["eva"], resamples=0)
    assert Suite("s", [task], methods=["eva"]).resamples == 50000  # rliable's, unless the suite says otherwise


def test_a_suite_page_shows_its_tuning_sweeps_sensitivity_plot_once_the_sweep_drew_one(tmp_path: Path) -> None:
    """Issue 27's protocol puts a learning-rate sensitivity plot on every page: the suite's page embeds its tuning
    page's, by a link that resolves from the page's folder."""
    task = SuiteTask("A", 0.5)
    suite = Suite("s", [task], methods=["eva", "lora"])
    runs = [(task, dataclasses.replace(_synthetic_run(m, v), task="A")) for m, v in (("eva", 0.6), ("lora", 0.4))]
    study = SuiteStudy(suite, tmp_path)
    report = aggregate(suite, runs)
    study.write_page(report, runs)
    assert "sensitivity" not in (study.out_dir / "results.md").read_text()  # no sweep yet: no dead link
    tuning = suite.tuning_folder(tmp_path)
    tuning.mkdir()
    (tuning / "sensitivity.png").write_bytes(b"png")
    study.write_page(report, runs)
    page = (study.out_dir / "results.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", page)
    assert "../s-tuning/sensitivity.png" in links and "../s-tuning/tuning.json" in links
    assert (study.out_dir / "../s-tuning/sensitivity.png").resolve() == (tuning / "sensitivity.png").resolve()
    assert page.index("sensitivity.png") < page.index("## A")  # under the opening, before the tables


def test_a_suite_sets_its_mean_over_tasks_beside_a_papers_figures() -> None:
    """The paper's statistic is the mean over tasks of each task's mean success: two tasks of different seed counts
    weigh the same, unlike the pooled IQM, and a method the paper did not run shows a dash."""
    a, b = SuiteTask("A", 0.5, score="success"), SuiteTask("B", 0.5, score="success")
    published = {"source": "a paper, Tab. 1", "statistic": "mean success", "setting": "offline", "scores": {"eva": 0.9}}
    suite = Suite("s", [a, b], methods=["eva", "lora"], published=published)
    finals = {("A", "eva"): (1.0, 0.8), ("B", "eva"): (0.2, 0.4, 0.3, 0.1), ("A", "lora"): (0.5, 0.7, 0.6)}
    finals[("B", "lora")] = (0.0, 0.2)
    runs = [(a if task == "A" else b, _synthetic_run(m, v)) for (task, m), values in finals.items() for v in values]
    report = aggregate(suite, runs)
    for method in ("eva", "lora"):
        expected = np.mean([np.mean(finals[(task, method)]) for task in "AB"])
        mean = report.published.means[method]
        assert mean.estimate == pytest.approx(expected) and mean.low <= mean.estimate <= mean.high
    assert report.published.means["eva"].estimate != pytest.approx(np.mean(finals[("A", "eva")] + finals[("B", "eva")]))
    page = results_markdown(report)
    assert "| method | tasks | final success |" in page  # the pooled table names the tasks' score
    assert f"| eva | 2 | {report.published.means['eva'].format('.3f')} | 0.900 |" in page
    assert f"| lora | 2 | {report.published.means['lora'].format('.3f')} | - |" in page
    assert "Published: mean success (a paper, Tab. 1)." in page and "The settings differ: offline" in page
    assert SuiteReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report
    assert "published" not in aggregate(Suite("s", [a, b], methods=["eva", "lora"]), runs).to_dict()


def test_the_published_comparison_adds_the_mean_over_the_seeds_every_method_has_on_every_task() -> None:
    """A suite under way (seeds 0-2 everywhere, 3-4 on one task) is set beside a paper's 3 seeds on those seeds
    alone too; a method run on one task only has no such mean, and a balanced suite gets no extra column."""
    a, b = SuiteTask("A", 0.5, score="success"), SuiteTask("B", 0.5, score="success")
    published = {"source": "a paper", "statistic": "mean success", "setting": "offline", "scores": {"eva": 0.9}}
    suite = Suite("s", [a, b], methods=["eva", "lora", "lora-orth"], published=published)
    finals = {("A", "eva"): 5, ("B", "eva"): 3, ("A", "lora"): 4, ("B", "lora"): 3, ("A", "lora-orth"): 2}

    def run(task: SuiteTask, method: str, seed: int) -> tuple[SuiteTask, RunResult]:
        value = round(0.1 * seed + (0.05 if task is a else 0.0) + (0.3 if method == "eva" else 0.0), 2)
        return task, dataclasses.replace(_synthetic_run(method, value), seed=seed, task=task.task)

    runs = [run(a if t == "A" else b, m, seed) for (t, m), seeds in finals.items() for seed in range(seeds)]
    comparison = aggregate(suite, runs).published
    assert comparison.common_seeds == [0, 1, 2] and set(comparison.common_means) == {"eva", "lora"}
    for method in ("eva", "lora"):
        oracle = np.mean([np.mean([r.final_return for t, r in runs if t is task and r.method == method and r.seed < 3])
                          for task in (a, b)])  # fmt: skip
        assert comparison.common_means[method].estimate == pytest.approx(oracle)
        assert comparison.common_means[method].estimate != pytest.approx(comparison.means[method].estimate)
    page = results_markdown(aggregate(suite, runs))
    assert "| method | tasks | mean final success | seeds 0-2 | published |" in page
    assert f"| lora-orth | 1 | {comparison.means['lora-orth'].format('.3f')} | - | - |" in page
    report = aggregate(suite, runs)
    assert SuiteReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report
    balanced = [(t, r) for t, r in runs if r.seed < 3 and r.method != "lora-orth"]
    assert aggregate(suite, balanced).published.common_seeds == []
    assert "| method | tasks | mean final success | published |" in results_markdown(aggregate(suite, balanced))


def test_each_progress_line_says_how_long_the_runs_still_to_make_should_take(tmp_path: Path) -> None:
    from eva_rl.experiments.execute import _Outcomes, duration

    suite = smoke_suite()
    specs = [spec for _, spec in suite.run_specs(tmp_path)]  # 4 runs, the first complete before the call
    specs[0].folder.result_file.parent.mkdir(parents=True)
    specs[0].folder.result_file.write_text("{}")
    lines: list[str] = []
    outcomes = _Outcomes(specs, lines.append, workers=2)

    def made(wall: float, success: float | None = None) -> RunResult:
        run = dataclasses.replace(_flat_run("PointGoal", "eva", 0, 0.5), wall_seconds=wall)
        return run if success is None else dataclasses.replace(run, success_curve=[[0, 0.0], [4096, success]])

    outcomes.record(0, lambda: made(5000.0))  # skipped: its old wall time says nothing of this machine now
    assert lines[-1] == "[1/4] PointGoal eva seed0: final 0.500 (complete before)"
    outcomes.record(1, lambda: made(600.0, success=0.4))
    assert lines[-1].endswith("final 0.500, success 0.40 (about 10 min to go)")  # 2 left, 2 workers: one wall
    outcomes.record(2, lambda: made(1200.0))
    assert lines[-1].endswith("(about 15 min to go)")  # one left: the mean wall, 900 s
    outcomes.record(3, lambda: made(900.0))
    assert lines[-1] == "[4/4] PointGoal full seed1: final 0.500"  # nothing left to make: no estimate
    assert [duration(s) for s in (40, 25 * 60, 3.5 * 3600)] == ["40 s", "25 min", "3.5 h"]


def _shared_suites(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Suite, Suite]:
    """Suite ``made`` (eva at 3e-3, lora at 1e-3, seeds 0-1) in a suite folder of its own, and a suite that reruns
    eva at lora's rate on seeds 0-2 and shares the rest of ``made``'s runs."""
    import yaml

    monkeypatch.setattr("eva_rl.experiments.suites.SUITE_DIR", tmp_path)
    task = {"task": "PointGoal", "threshold": 0.5, "total_timesteps": 2048, "eval_freq": 1024}
    rates = {"eva": {"learning_rate": 3e-3}, "lora": {"learning_rate": 1e-3}}
    made = {"name": "made", "tasks": [task], "methods": ["eva", "lora"], "seeds": [0, 1], "method_settings": rates}
    (tmp_path / "made.yaml").write_text(yaml.safe_dump(made))
    one_rate = {"eva": {"learning_rate": 1e-3}, "lora": {"learning_rate": 1e-3}}
    sharing = {**made, "name": "at-one-rate", "seeds": [0, 1, 2], "method_settings": one_rate, "shares": "made"}
    (tmp_path / "at-one-rate.yaml").write_text(yaml.safe_dump(sharing))
    return load_suite("made"), load_suite("at-one-rate")


def test_a_suite_shares_the_runs_of_the_suite_it_names_where_they_are_the_same_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made, sharing = _shared_suites(tmp_path, monkeypatch)
    runs = tmp_path / "runs"
    where = {(spec.method, spec.seed): spec.log_dir.name for _, spec in sharing.run_specs(runs)}
    # lora's runs of made's seeds are made's; seed 2 is not made's, and eva runs at another rate: their own
    assert where == {
        ("eva", 0): "at-one-rate", ("lora", 0): "made", ("eva", 1): "at-one-rate", ("lora", 1): "made",
        ("eva", 2): "at-one-rate", ("lora", 2): "at-one-rate",
    }  # fmt: skip
    assert made.run_specs(runs)[1][1].folder.path == sharing.run_specs(runs)[1][1].folder.path
    # a shared run missing is made in the shared suite's folder, once: made's page then reads it too
    lines: list[str] = []
    report = compare(sharing, runs, methods=["lora"], seeds=[0], echo=lines.append)
    assert (runs / "made" / "PointGoal" / "lora" / "seed0" / "result.json").is_file()
    assert not (runs / "at-one-rate" / "PointGoal" / "lora").exists()
    note = "1 of the page's 1 runs (lora) are suite `made`'s, the same runs made once for both pages"
    assert report.sharing.startswith(note) and note in (runs / "at-one-rate" / "results.md").read_text()
    assert SuiteReport.from_dict(report.to_dict()) == report
    assert compare(made, runs, report_only=True).tasks["PointGoal"].methods["lora"].seeds == 1
    assert compare(made, runs, report_only=True).sharing == ""


def test_a_suite_shares_runs_only_with_another_suite_that_makes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made, sharing = _shared_suites(tmp_path, monkeypatch)
    with pytest.raises(ConfigError, match="shares='made' is invalid: expected another suite's name than its own"):
        dataclasses.replace(made, shares="made")
    with pytest.raises(ConfigError, match="that suite shares suite 'made''s runs itself; expected the suite that"):
        dataclasses.replace(made, name="chained", shares="at-one-rate")
    with pytest.raises(ConfigError, match="suite other: shares='nope' is invalid: unknown suite 'nope'; known"):
        dataclasses.replace(made, name="other", shares="nope")
    with pytest.raises(ConfigError, match="shares=3 is invalid: expected one folder name"):
        dataclasses.replace(made, name="other", shares=3)
