"""Rank studies: the grid of (rank, method, seed) runs, their statistics and plot, and bad study settings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eva_rl.experiments.cli import compare_main
from eva_rl.experiments.run_folder import RunResult
from eva_rl.experiments.runs import run_settings
from eva_rl.experiments.stats import iqm
from eva_rl.experiments.studies.ranks import RankStudyRuns, rank_markdown, rank_report
from eva_rl.experiments.suites import RankStudy, load_suite
from eva_rl.experiments.tasks import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:EVA:UserWarning")


def test_specs_reuse_the_suites_own_runs_at_its_rank_and_set_alpha_to_r_elsewhere(tmp_path: Path) -> None:
    suite = load_suite("smoke")
    suite.method_settings = {"eva": {"learning_rate": 3e-3}}
    pairs = RankStudyRuns(suite, tmp_path).plan()
    assert [(r, s.method, s.seed) for r, s in pairs] == [(2, "lora", 0), (2, "eva", 0), (4, "lora", 0), (4, "eva", 0)]
    for r, spec in pairs:
        assert spec.task.lora.r == r and spec.task.lora.default_alpha == r
        expected = tmp_path / "smoke" if r == 4 else tmp_path / "smoke-ranks" / f"r{r}"
        assert spec.run_dir == expected / "PointGoal" / spec.method / "seed0"
        # the suite's per-method learning rate holds at every rank
        assert spec.task.ppo["learning_rate"] == (3e-3 if spec.method == "eva" else 1e-3)
    # at the suite's rank the spec is exactly the suite's own (same settings: its finished run is reused)
    (_, suite_eva), *_ = suite.run_specs(tmp_path, ["eva"], [0])
    assert pairs[3][1].task == suite_eva.task and pairs[3][1].run_dir == suite_eva.run_dir


@pytest.mark.parametrize(
    ("study", "message"),
    [
        ({"task": "PointGoal", "ranks": [0, 2]}, "rank_study.ranks=[0, 2]"),
        ({"task": "PointGoal", "ranks": [2, 2]}, "rank_study.ranks=[2, 2]"),
        ({"task": "PointGoal", "ranks": "2,4"}, "rank_study.ranks='2,4'"),
        ({"task": "PointGoal", "ranks": [2], "methods": ["full"]}, "rank_study.methods=['full']"),
        ({"task": "Nope", "ranks": [2]}, "rank_study.task='Nope'"),
        ({"task": "PointGoal", "ranks": [2], "seeds": [100]}, "overlap the rank study's seeds"),
        ({"task": "PointGoal", "ranks": [2], "rank": 3}, "rank"),
        ({"task": "PointGoal", "ranks": [2], "methods": ["lora"], "method_settings": {"eva": {}}}, "method_settings="),
        ({"task": "PointGoal", "ranks": [2], "method_settings": {"lora": {8: {}}}}, "with r out of [2]"),
        (
            {"task": "PointGoal", "ranks": [2], "method_settings": {"lora": {2: {"learning_rate": "fast"}}}},
            "rank_study.method_settings['lora'][2]",
        ),
        ("r=2", "rank_study='r=2'"),
        ({"task": "PointGoal", "ranks": [2], "controls": {"eva-span": "eva"}}, "rank_study.controls="),  # not a method
        (
            {
                "task": "PointGoal",
                "ranks": [2],
                "methods": ["eva", "eva-span"],
                "controls": {"eva": "eva-span"},
                "method_settings": {"eva": {2: {"learning_rate": 1e-3}}},
            },
            "the control without method_settings of its own",
        ),
        (
            {"task": "PointGoal", "ranks": [2], "methods": ["eva", "lora"], "controls": "eva"},
            "rank_study.controls='eva'",
        ),
    ],
)
def test_bad_rank_studies_are_one_clear_error(study: object, message: str) -> None:
    suite = load_suite("smoke")
    with pytest.raises(ConfigError) as error:
        dataclasses.replace(suite, rank_study=study)
    assert message in str(error.value) and "\n" not in str(error.value)


def _result(method: str, seed: int, final: float, curve: list[list[float]], params: int = 100) -> RunResult:
    return RunResult(
        task="T",
        method=method,
        seed=seed,
        total_timesteps=int(curve[-1][0]),
        jumpstart=curve[0][1],
        final_return=final,
        best_return=max(v for _, v in curve),
        eval_curve=curve,
        trainable_params=params,
        total_params=1000,
        wall_seconds=1.0,
    )


def test_report_matches_an_independent_computation() -> None:
    rng = np.random.default_rng(0)
    study = RankStudy(task="T", ranks=[1, 4], methods=["lora", "eva", "eva-span"], seeds=4)
    runs, finals, aucs = [], {}, {}
    for r in study.ranks:
        for method in study.methods:
            for seed in range(4):
                values = rng.uniform(0, 1, 3)
                runs.append((r, _result(method, seed, values[-1], [[0, values[0]], [50, values[1]], [100, values[2]]])))
                finals.setdefault((method, r), []).append(values[-1])
                # trapezoid over [0, 100], divided by the horizon
                aucs.setdefault((method, r), []).append((values[0] + 2 * values[1] + values[2]) / 4)
    report = rank_report("s", study, runs)
    for (method, r), values in finals.items():
        point = report.points[method][r]
        assert point.seeds == 4 and point.trainable_params == 100
        assert point.final.estimate == pytest.approx(iqm(values))
        assert point.auc.estimate == pytest.approx(iqm(aucs[(method, r)]))
        assert point.final.low <= point.final.estimate <= point.final.high

    def pairs_won(first: list[float], second: list[float]) -> float:
        return float(np.mean([(a > b) + 0.5 * (a == b) for a in first for b in second]))

    for r in study.ranks:
        for scores, table in ((finals, report.p_reference_better), (aucs, report.p_reference_better_auc)):
            for other in ("lora", "eva-span"):
                assert table[other][r].estimate == pytest.approx(pairs_won(scores[("eva", r)], scores[(other, r)]))
        # the method that is neither the reference nor the baseline, against the baseline
        for scores, table in ((finals, report.p_better_than_baseline), (aucs, report.p_better_than_baseline_auc)):
            assert set(table) == {"eva-span"}
            assert table["eva-span"][r].estimate == pytest.approx(
                pairs_won(scores[("eva-span", r)], scores[("lora", r)])
            )
    markdown = rank_markdown(report)
    assert "| eva | 4 | 4 | 100 |" in markdown and "r = 1" in markdown
    assert "P(eva's final return beats" in markdown and "P(eva's normalized AUC beats" in markdown
    assert f"| lora | {report.p_reference_better_auc['lora'][1]} |" in markdown
    assert "P(the method's normalized AUC beats lora's), per rank:" in markdown
    assert f"| eva-span | {report.p_better_than_baseline_auc['eva-span'][1]} |" in markdown
    assert set(report.to_dict()["p_better_than_lora_auc"]) == {"eva-span"}
    point = report.points["eva"][4]
    assert f"| {point.final} | {point.auc} |" in markdown  # three decimals for returns below 1000
    # MuJoCo-sized returns print as whole numbers
    scaled = [
        (r, _result(x.method, x.seed, 5000 * x.final_return, [[s, 5000 * v] for s, v in x.eval_curve])) for r, x in runs
    ]
    scaled_report = rank_report("s", study, scaled)
    big = scaled_report.points["eva"][4]
    assert f"| {big.final.format(',.0f')} | {big.auc.format(',.0f')} |" in rank_markdown(scaled_report)


def test_rank_study_runs_through_the_command_line_and_writes_table_json_and_plot(tmp_path: Path, capsys) -> None:
    assert compare_main(["--suite", "smoke", "--rank-study", "--workers", "2", "--log-dir", str(tmp_path)]) == 0
    out = tmp_path / "smoke"
    data = json.loads((out / "rank_study.json").read_text())
    assert data["ranks"] == [2, 4] and set(data["methods"]) == {"lora", "eva"}
    assert set(data["methods"]["eva"]) == {"2", "4"}
    # r = 4 is the suite's own rank: those runs sit in the suite's folder, r = 2 beside it
    assert (out / "PointGoal" / "eva" / "seed0" / "result.json").is_file()
    assert (tmp_path / "smoke-ranks" / "r2" / "PointGoal" / "lora" / "seed0" / "result.json").is_file()
    small = json.loads((tmp_path / "smoke-ranks/r2/PointGoal/lora/seed0/result.json").read_text())
    large = json.loads((out / "PointGoal/lora/seed0/result.json").read_text())
    assert small["trainable_params"] < large["trainable_params"]
    with Image.open(out / "rank_study.png") as image:
        assert image.size[0] >= 800
    assert "Rank study:" in capsys.readouterr().out
    assert compare_main(["--suite", "smoke", "--rank-study", "--seeds", "2", "--log-dir", str(tmp_path)]) == 2
    assert "drop --methods, --seeds" in capsys.readouterr().err


def test_settings_tuned_at_a_rank_apply_there_and_leave_the_suites_own_run_where_they_differ(tmp_path: Path) -> None:
    suite = load_suite("smoke")
    suite.method_settings = {"eva": {"learning_rate": 3e-3}, "lora": {"learning_rate": 1e-3}}
    study = dataclasses.replace(
        suite.rank_study, method_settings={"eva": {2: {"learning_rate": 5e-3}, 4: {"learning_rate": 2e-3}}}
    )
    suite = dataclasses.replace(suite, rank_study=study)
    specs = {(r, spec.method): spec for r, spec in RankStudyRuns(suite, tmp_path).plan()}
    assert specs[(2, "eva")].task.ppo["learning_rate"] == 5e-3
    assert specs[(4, "eva")].task.ppo["learning_rate"] == 2e-3  # not the suite's 3e-3, so not the suite's run
    assert specs[(4, "eva")].run_dir == tmp_path / "smoke-ranks" / "r4" / "PointGoal" / "eva" / "seed0"
    assert specs[(4, "lora")].run_dir == tmp_path / "smoke" / "PointGoal" / "lora" / "seed0"  # untouched: reused


def test_tuning_at_every_rank_plans_each_point_and_picks_per_method_and_rank(tmp_path: Path) -> None:
    from eva_rl.experiments.studies.tuning import RankTuningSweep, TuningSweep, point_name, tuning_points

    suite = load_suite("smoke")  # grid 1e-3 / 3e-3 / 1e-2, tuning seed 100, ranks 2 and 4, lora and eva
    sweep = RankTuningSweep(suite, tmp_path)
    planned = sweep.plan()
    assert len(planned) == 2 * 3 * 1 * 2
    for (r, name), spec in planned:
        assert spec.task.lora.r == r and spec.task.lora.default_alpha == r and spec.seed == 100
        assert point_name({"learning_rate": spec.task.ppo["learning_rate"]}) == name
        # eva at the task's own r = 4 is a run of the suite's tuning sweep (lora is not among the suite's methods)
        own = (r, spec.method) == (4, "eva")
        folder = tmp_path / "smoke-tuning" if own else tmp_path / "smoke-rank-tuning" / f"r{r}"
        assert spec.run_dir == folder / name / "smoke" / "PointGoal" / spec.method / "seed100"
    suite_runs = {spec.run_dir: spec for _, spec in TuningSweep(suite, tmp_path).plan()}
    for _, spec in planned:
        if spec.run_dir in suite_runs:
            assert run_settings(spec) == run_settings(suite_runs[spec.run_dir])  # the very run, not a namesake
    # eva's best rate differs by rank, lora's does not: AUC = the run's constant return
    best = {("eva", 2): "learning_rate0.001", ("eva", 4): "learning_rate0.01"}
    runs = []
    for (r, name), spec in planned:
        value = 1.0 if best.get((spec.method, r), "learning_rate0.003") == name else 0.0
        runs.append(((r, name), _result(spec.method, 100, value, [[0, value], [4096, value]])))
    report = sweep.report(runs)
    points = {point_name(p): p for p in tuning_points(suite.tuning_grid)}
    assert report["chosen"]["eva"] == {2: points["learning_rate0.001"], 4: points["learning_rate0.01"]}
    assert report["chosen"]["lora"] == {2: points["learning_rate0.003"], 4: points["learning_rate0.003"]}
    study = dataclasses.replace(suite.rank_study, method_settings=report["chosen"])  # what the page says to paste
    assert study.settings_at("eva", 4) == {"learning_rate": 1e-2}


def test_a_rank_study_with_a_grid_of_its_own_tunes_on_it_and_shares_only_the_suites_points(tmp_path: Path) -> None:
    from eva_rl.experiments.studies.tuning import RankTuningSweep, TuningSweep, point_name

    suite = load_suite("smoke")  # the suite's grid: 1e-3 / 3e-3 / 1e-2; eva at r = 4 is among its tuning runs
    own = [3e-3, 6e-3]
    suite = dataclasses.replace(
        suite, rank_study=dataclasses.replace(suite.rank_study, tuning_grid={"learning_rate": own})
    )
    sweep = RankTuningSweep(suite, tmp_path)
    assert sweep.grid_key == "rank_study.tuning_grid"
    planned = sweep.plan()
    assert sorted({spec.task.ppo["learning_rate"] for _, spec in planned}) == own
    assert len(planned) == 2 * len(own) * 1 * 2
    for (r, name), spec in planned:
        # the suite's sweep made eva at r = 4 and 3e-3, never at 6e-3
        shared = (r, spec.method, name) == (4, "eva", point_name({"learning_rate": 3e-3}))
        root = tmp_path / "smoke-tuning" if shared else tmp_path / "smoke-rank-tuning" / f"r{r}"
        assert spec.run_dir.is_relative_to(root / name)
    # once eva's own suite tuning tries 6e-3 too, its run there at r = 4 is shared as well
    suite = dataclasses.replace(suite, method_tuning_grid={"eva": {"learning_rate": [6e-3]}})
    suite_runs = {spec.run_dir for _, spec in TuningSweep(suite, tmp_path).plan()}
    for (r, _), spec in RankTuningSweep(suite, tmp_path).plan():
        shared = (r, spec.method) == (4, "eva")
        assert (spec.run_dir in suite_runs) == shared
        assert spec.run_dir.is_relative_to(tmp_path / "smoke-tuning") == shared


@pytest.mark.parametrize(
    "change",
    [
        {"method_settings": {"eva": {"learning_rate": 3e-3, "tau": 0.9}}},  # a setting the grid does not set
        {"settings": {"alpha": 8}},  # alpha = 8 at r = 4: not the rank study's alpha = r
        {"methods": ["full"]},
    ],
)
def test_tuning_at_every_rank_runs_its_own_where_the_suites_tuning_makes_another_run(tmp_path: Path, change) -> None:
    from eva_rl.experiments.studies.tuning import RankTuningSweep

    suite = dataclasses.replace(load_suite("smoke"), **change)
    for (r, name), spec in RankTuningSweep(suite, tmp_path).plan():
        assert spec.run_dir.is_relative_to(tmp_path / "smoke-rank-tuning" / f"r{r}" / name)


def test_a_control_takes_its_methods_rate_at_every_rank_and_is_not_tuned(tmp_path: Path) -> None:
    from eva_rl.experiments.studies.tuning import RankTuningSweep

    suite = load_suite("smoke")
    study = dataclasses.replace(
        suite.rank_study,
        methods=["lora", "eva", "eva-span"],
        method_settings={"eva": {2: {"learning_rate": 5e-3}, 4: {"learning_rate": 2e-3}}},
        controls={"eva-span": "eva"},
    )
    suite = dataclasses.replace(suite, rank_study=study)
    specs = {(r, spec.method): spec for r, spec in RankStudyRuns(suite, tmp_path).plan()}
    for r, rate in ((2, 5e-3), (4, 2e-3)):
        assert specs[(r, "eva-span")].task.ppo["learning_rate"] == specs[(r, "eva")].task.ppo["learning_rate"] == rate
        assert specs[(r, "eva-span")].run_dir == tmp_path / "smoke-ranks" / f"r{r}" / "PointGoal" / "eva-span" / "seed0"
    assert study.tuned_methods == ["lora", "eva"]
    assert {spec.method for _, spec in RankTuningSweep(suite, tmp_path).plan()} == {"lora", "eva"}


@pytest.mark.parametrize("study_class", ["RankStudyRuns", "RankTuningSweep"])
def test_the_rank_studies_score_a_success_task_by_its_success_rate(
    study_class: str, tmp_path: Path, monkeypatch
) -> None:
    from eva_rl.experiments.studies import base, ranks, tuning

    suite = load_suite("smoke")
    suite.tasks = [dataclasses.replace(task, score="success") for task in suite.tasks]
    study = getattr(ranks, study_class, None) or getattr(tuning, study_class)
    # the return is 50 throughout while the success rate is 0.2: the study must read the success rate
    run = dataclasses.replace(_result("eva", 0, 50.0, [[0, 50.0], [4096, 50.0]]), success_curve=[[0, 0.2], [4096, 0.2]])
    study = study(suite, tmp_path)
    (_, spec), *_ = study.page_plan()
    spec.folder.result_file.parent.mkdir(parents=True)
    spec.folder.result_file.write_text("{}")  # the one complete run; its result is the one above
    monkeypatch.setattr(base, "completed_result", lambda spec: run)
    assert [result.final_return for _, result in study.completed()] == [0.2]


def test_each_rank_reports_the_score_after_k_updates_and_the_steps_to_the_threshold() -> None:
    """EVA's argument is about the first updates: the rank study reports them beside the final return (10 env steps
    a rollout here, so after 5, 10 and 25 updates are the evaluations at 50, 100 and 250 steps), checked against the
    curves read by hand."""
    rng = np.random.default_rng(1)
    study = RankStudy(task="T", ranks=[1, 4], methods=["lora", "eva"], seeds=5)
    ppo = {"hyperparameters": {"n_steps": 10}, "n_envs": 1}
    steps = [0, 50, 100, 150, 250, 300]
    runs, expected, reached = [], {}, {}
    for r in study.ranks:
        for method in study.methods:
            for seed in range(5):
                values = np.sort(rng.uniform(0, 1, len(steps)))  # rising curves: the first value >= 0.5 is reached
                curve = [[s, float(v)] for s, v in zip(steps, values)]
                run = dataclasses.replace(_result(method, seed, curve[-1][1], curve), settings=ppo)
                # EVA's own env steps shift the curve for the threshold, not the update count
                runs.append((r, dataclasses.replace(run, eva_env_steps=7 if method == "eva" else 0)))
                for k, step in ((5, 50), (10, 100), (25, 250)):
                    expected.setdefault((method, r, k), []).append(curve[steps.index(step)][1])
                shift = 7 if method == "eva" else 0
                first = next((s + shift for s, v in curve if v >= 0.5 and s + shift <= 300), None)
                reached.setdefault((method, r), []).append(first)
    report = rank_report("s", study, runs, threshold=0.5)
    for (method, r, k), values in expected.items():
        assert report.points[method][r].after_updates[k].estimate == pytest.approx(iqm(values))
    for (method, r), firsts in reached.items():
        point = report.points[method][r]
        assert point.reached_threshold == sum(f is not None for f in firsts)
        median = np.median([np.inf if f is None else f for f in firsts])
        assert point.steps_to_threshold_median == (None if np.isinf(median) else pytest.approx(median))
    markdown = rank_markdown(report)
    columns = "| after 5 updates | after 10 updates | after 25 updates | steps to threshold (median) | reached |"
    assert columns in markdown
    point = report.points["eva"][4]
    assert f"| {point.after_updates[5]} | {point.after_updates[10]} | {point.after_updates[25]} |" in markdown
    assert "Threshold: 0.5." in markdown and report.to_dict()["threshold"] == 0.5
    # EVA against each method after k updates, rank by rank, from the same hand-read values
    for k in (5, 10, 25):
        for r in study.ranks:
            eva, lora = expected[("eva", r, k)], expected[("lora", r, k)]
            won = np.mean([(a > b) + 0.5 * (a == b) for a in eva for b in lora])
            assert report.p_reference_better_after[k]["lora"][r].estimate == pytest.approx(won)
        assert f"P(eva's score after {k} updates beats the method's), per rank:" in markdown
    assert set(report.to_dict()["p_eva_better_after_updates"]) == {"5", "10", "25"}
    # the suite's bootstrap, which the page names
    assert "(2,000 resamples)" in markdown and report.to_dict()["resamples"] == 2000
    assert "(50,000 resamples)" in rank_markdown(rank_report("s", study, runs, threshold=0.5, resamples=50000))
    assert set(report.to_dict()["methods"]["eva"]["4"]["after_updates"]) == {5, 10, 25}
    # off-policy runs (or a study without a threshold) have neither: the columns are left out
    plain = rank_report("s", study, [(r, dataclasses.replace(x, settings=None)) for r, x in runs])
    assert "after 5 updates" not in rank_markdown(plain) and "steps to threshold" not in rank_markdown(plain)
    assert "score after" not in rank_markdown(plain) and "p_eva_better_after_updates" not in plain.to_dict()
