"""The controls' contrasts on a suite page: each method against the control that changes one thing about it."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from eva_rl.experiments.contrasts import CONTRASTS, contrast_stats
from eva_rl.experiments.run_folder import RunResult
from eva_rl.experiments.studies.suite import SuiteReport, aggregate, results_markdown
from eva_rl.experiments.suites import Suite, SuiteTask
from eva_rl.methods import METHODS


def _run(method: str, curve: list[list[float]]) -> RunResult:
    """A PPO run of 16 steps x 2 envs a rollout, evaluated at the steps of ``curve``."""
    return RunResult(
        task="t", method=method, seed=0, total_timesteps=int(curve[-1][0]), jumpstart=curve[0][1],
        final_return=curve[-1][1], best_return=max(v for _, v in curve), eval_curve=curve, trainable_params=10,
        total_params=10, wall_seconds=1.0, settings={"hyperparameters": {"n_steps": 16}, "n_envs": 2},
    )  # fmt: skip


def _pairs_better(x: list[float], y: list[float]) -> float:
    """P(X > Y) + P(X = Y) / 2 by counting every pair: the oracle."""
    return float(np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(x, y)]))


def test_every_contrast_names_registered_methods_that_differ() -> None:
    for contrast in CONTRASTS:
        assert contrast.method in METHODS and contrast.control in METHODS and contrast.method != contrast.control


def test_contrasts_count_pairs_over_the_tasks_both_methods_ran_on_final_auc_and_early_returns() -> None:
    a, b = SuiteTask("A", 0.5), SuiteTask("B", 0.5)
    suite = Suite("s", [a, b], methods=["eva", "lora", "lora-orth"], resamples=1000)
    rng = np.random.default_rng(0)
    runs = []
    for task, method in itertools.product((a, b), suite.methods):
        for _ in range(5):
            # evaluated after 0, 5, 10 and 25 updates of 32 steps
            values = np.round(rng.uniform(0, 1, 4), 1)  # one decimal: ties happen
            runs.append((task, _run(method, [[s, float(v)] for s, v in zip((0, 160, 320, 800), values)])))
    report = aggregate(suite, runs)
    contrasts = {(c.method, c.control): c for c in report.contrasts}
    assert set(contrasts) == {("eva", "lora"), ("eva", "lora-orth"), ("lora-orth", "lora")}

    def scores(method: str, task: SuiteTask, index: int) -> list[float]:
        return [r.eval_curve[index][1] for t, r in runs if t is task and r.method == method]

    eva_lora = contrasts[("eva", "lora")]
    assert eva_lora.tasks == ["A", "B"]
    for index, interval in ((3, eva_lora.final), (1, eva_lora.after_updates[5]), (2, eva_lora.after_updates[10])):
        oracle = np.mean([_pairs_better(scores("eva", t, index), scores("lora", t, index)) for t in (a, b)])
        assert interval.estimate == pytest.approx(oracle)
        assert interval.low <= interval.estimate <= interval.high
    assert set(eva_lora.after_updates) == {5, 10, 25}
    # each task alone, where the pooled figure is their mean
    for task in (a, b):
        alone = eva_lora.per_task[task.task]
        assert alone["final"].estimate == pytest.approx(_pairs_better(scores("eva", task, 3), scores("lora", task, 3)))
    assert eva_lora.final.estimate == pytest.approx(np.mean([eva_lora.per_task[t]["final"].estimate for t in "AB"]))
    page = results_markdown(report)
    assert "## Controls" in page and f"| eva > lora-orth | {CONTRASTS[1].differs} | - | 2 |" in page
    alone = eva_lora.per_task
    assert f"| eva > lora | {alone['A']['final']}; {alone['A']['auc']} | {alone['B']['final']}; " in page
    assert SuiteReport.from_dict(report.to_dict()).contrasts == report.contrasts


def test_a_method_always_ahead_of_its_control_scores_one_and_a_tie_one_half() -> None:
    task = SuiteTask("A", 0.5)
    curve = [[0, 0.0], [160, 0.5], [320, 0.6], [800, 0.9]]
    scores = {
        "eva-fa": {"final": {"A": [0.9, 0.8]}, "auc": {"A": [0.5, 0.5]}},
        "lora-orth-fa": {"final": {"A": [0.1, 0.2]}, "auc": {"A": [0.5, 0.5]}},
        "eva": {"final": {"A": [0.5]}, "auc": {"A": [0.5]}},
        "eva-rescaled": {"final": {"A": [0.4]}, "auc": {"A": [0.5]}},
    }
    drawn = {(c.method, c.control): c for c in contrast_stats(scores, (5,), resamples=500, reference="eva")}
    assert drawn[("eva-fa", "lora-orth-fa")].final.estimate == 1.0
    assert drawn[("eva-fa", "lora-orth-fa")].auc.estimate == 0.5
    assert drawn[("eva", "eva-rescaled")].after_updates == {}  # no early returns recorded
    assert all(not c.per_task for c in drawn.values())  # one task: the pooled figure is that task's
    # a page of eva and lora alone has its P(eva better) column: no controls section
    plain = Suite("s", [task], methods=["eva", "lora"])
    report = aggregate(plain, [(task, _run(m, curve)) for m in ("eva", "lora") for _ in range(3)])
    assert report.contrasts == [] and "## Controls" not in results_markdown(report)
    assert "contrasts" not in report.to_dict()  # the pages made before contrasts read back unchanged
    assert dataclasses.replace(report, contrasts=[]) == SuiteReport.from_dict(report.to_dict())
    # a page of one control pair alone (no eva) draws its one contrast
    pair = Suite("s", [task], methods=["eva-fa", "lora-orth-fa"])
    report = aggregate(pair, [(task, _run(m, curve)) for m in ("eva-fa", "lora-orth-fa") for _ in range(3)])
    assert [(c.method, c.control) for c in report.contrasts] == [("eva-fa", "lora-orth-fa")]
    assert "| eva-fa > lora-orth-fa |" in results_markdown(report)


def test_the_controls_table_names_each_sides_rate_and_a_one_task_contrast_fills_its_tasks_column() -> None:
    a, b = SuiteTask("A", 0.5), SuiteTask("B", 0.5)
    suite = Suite("s", [a, b], methods=["eva", "lora", "lora-orth"])
    curve = [[0, 0.0], [160, 0.5], [320, 0.6], [800, 0.9]]

    def run(method: str, rate: float) -> RunResult:
        result = _run(method, curve)
        result.settings["hyperparameters"]["learning_rate"] = rate
        return result

    runs = [(t, run(m, 1e-3 if m == "eva" else 5e-4)) for t in (a, b) for m in ("eva", "lora") for _ in range(3)]
    runs += [(a, run("lora-orth", 5e-4)) for _ in range(3)]  # on A only
    page = results_markdown(aggregate(suite, runs))
    assert f"| eva > lora | {CONTRASTS[0].differs} | 1e-3 vs 5e-4 | 2 |" in page  # two rates: named apart
    assert f"| lora-orth > lora | {CONTRASTS[7].differs} | 5e-4 | 1 |" in page  # one rate: once
    report = aggregate(suite, runs)
    one_task = next(c for c in report.contrasts if c.control == "lora-orth")
    assert not one_task.per_task
    assert f"| eva > lora-orth | {one_task.final}; {one_task.auc} | - |" in page
