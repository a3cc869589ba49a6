"""Aggregation statistics on synthetic results with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from eva_rl.experiments.stats import (
    Interval,
    curve_at,
    iqm,
    mean_interval,
    normalized_auc,
    probability_of_improvement,
    score_format,
    steps_to_threshold,
    stratified_iqm,
)


def test_iqm_is_the_mean_of_the_middle_half() -> None:
    assert iqm([1, 2, 3, 4, 5, 6, 7, 100]) == pytest.approx(np.mean([3, 4, 5, 6]))
    assert iqm([0.5] * 5) == 0.5


def test_stratified_ci_covers_the_true_iqm_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(0)
    true_iqm = 0.0  # the IQM of a symmetric distribution is its centre
    covered = 0
    trials = 200
    for trial in range(trials):
        per_task = [rng.normal(0.0, 1.0, size=20), rng.normal(0.0, 1.0, size=20)]
        interval = stratified_iqm(per_task, n_resamples=500, seed=trial)
        covered += interval.low <= true_iqm <= interval.high
        assert interval.low <= interval.estimate <= interval.high
    assert 0.88 <= covered / trials <= 0.99, covered


def test_mean_ci_covers_the_true_mean_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(1)
    covered = 0
    for trial in range(200):
        values = rng.exponential(1.0, size=30)  # skewed: the percentile bootstrap still covers the mean of 1
        interval = mean_interval(values, n_resamples=500, seed=trial)
        assert interval.estimate == pytest.approx(values.mean())
        covered += interval.low <= 1.0 <= interval.high
    assert 0.85 <= covered / 200 <= 0.99, covered
    assert mean_interval([0.3, 0.3, 0.3]) == Interval(0.3, 0.3, 0.3)


def test_stratified_bootstrap_resamples_within_tasks() -> None:
    # Task A is always 0 and task B always 1: resampling within tasks keeps the pooled IQM at exactly 0.5.
    interval = stratified_iqm([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], n_resamples=200)
    assert (interval.estimate, interval.low, interval.high) == (0.5, 0.5, 0.5)


def test_probability_of_improvement_matches_mann_whitney() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(0.5, 1, 15), rng.normal(0.0, 1, 12)
    u = scipy_stats.mannwhitneyu(x, y).statistic
    interval = probability_of_improvement([x], [y], n_resamples=500)
    assert interval.estimate == pytest.approx(u / (len(x) * len(y)))
    assert interval.low < interval.estimate < interval.high
    assert probability_of_improvement([[1, 1], [2, 2]], [[0, 0], [2, 2]]).estimate == pytest.approx(0.75)


def test_a_sample_of_one_score_is_held_fixed_while_the_others_are_resampled() -> None:
    # Mid-sweep a method may have one completed seed: x = 5.5 against y = 1..10. Every resample of y gives
    # P(x > y) = the share of the resampled y below 5.5, so the oracle is that share's percentiles (numpy).
    y = np.arange(1.0, 11.0)
    draws = np.random.default_rng(7).choice(y, size=(20_000, y.size))
    oracle_low, oracle_high = np.percentile((draws < 5.5).mean(axis=1), [2.5, 97.5])
    interval = probability_of_improvement([[5.5]], [y], n_resamples=4000)
    assert interval.estimate == 0.5
    assert interval.low == pytest.approx(oracle_low, abs=0.1)
    assert interval.high == pytest.approx(oracle_high, abs=0.1)
    assert interval.low < 0.5 < interval.high
    # The pooled IQM of tasks [10] and [0, 0, 1, 1]: the single score is in every resample, always the largest, so
    # always trimmed; the IQM of the other four's resamples then ranges over [0, 1].
    pooled = stratified_iqm([[10.0], [0.0, 0.0, 1.0, 1.0]], n_resamples=500)
    assert pooled.estimate == pytest.approx(iqm([10.0, 0.0, 0.0, 1.0, 1.0]))
    assert 0.0 <= pooled.low < pooled.estimate < pooled.high <= 1.0
    # Only samples of one score: nothing to resample.
    assert str(probability_of_improvement([[2.0]], [[1.0]])) == "1.000 [1.000, 1.000]"


def test_scores_in_the_thousands_are_whole_numbers_and_small_ones_keep_three_decimals() -> None:
    assert score_format([Interval(0.95, 0.938, 0.964)]) == ".3f"
    assert score_format([Interval(-150.0, -156.17, -144.3)]) == ".3f"
    assert score_format([Interval(0.95, 0.938, 0.964), Interval(3000.0, -1000.0, 3370.9)]) == ",.0f"
    assert score_format([]) == ".3f"
    assert Interval(3553.127, 3237.483, 3816.421).format(",.0f") == "3,553 [3,237, 3,816]"
    assert str(Interval(0.9641, 0.938, 0.9666)) == "0.964 [0.938, 0.967]"


def test_steps_to_threshold_and_auc() -> None:
    steps, returns = [0, 10, 20, 30], [0.0, 0.5, 0.9, 1.0]
    assert steps_to_threshold(steps, returns, 0.9) == 20
    assert steps_to_threshold(steps, returns, 1.1) is None
    assert steps_to_threshold(steps, returns, 0.9, horizon=20) == 20
    assert steps_to_threshold(steps, returns, 0.9, horizon=19) is None
    # Trapezoids: (0+0.5)/2*10 + (0.5+0.9)/2*10 + (0.9+1)/2*10 = 19 over a span of 30.
    assert normalized_auc(steps, returns) == pytest.approx(19 / 30)
    assert normalized_auc(steps, returns, horizon=40) == pytest.approx((19 + 10) / 40)
    assert normalized_auc(steps, returns, horizon=20) == pytest.approx(9.5 / 20)
    # cut between two evals: the value at 25 is 0.95, so the last trapezoid is (0.9+0.95)/2*5
    assert normalized_auc(steps, returns, horizon=25) == pytest.approx((9.5 + 4.625) / 25)
    np.testing.assert_allclose(curve_at(steps, returns, np.array([5.0, 40.0])), [0.25, 1.0])
    assert np.isnan(curve_at([10, 20], [0.0, 1.0], np.array([0.0]))[0])
