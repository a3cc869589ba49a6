"""Statistics for comparing methods across seeds and tasks, as RL researchers report them (Agarwal et al. 2021):
interquartile mean, stratified-bootstrap confidence intervals, probability of improvement, and the transfer
metrics of Taylor & Stone (2009): jumpstart, steps-to-threshold, area under the curve, final return.

The resampling is ``scipy.stats.bootstrap``'s; nothing here reimplements a statistical routine SciPy provides.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

RESAMPLES = 50_000
"""Bootstrap resamples behind a page's CIs: rliable's default (Agarwal et al. 2021)."""


def iqm(values: Sequence[float] | np.ndarray, axis: int = -1) -> float | np.ndarray:
    """Interquartile mean: the mean of the middle 50% (``scipy.stats.trim_mean`` with 25% cut at each end)."""
    return stats.trim_mean(np.asarray(values, dtype=float), 0.25, axis=axis)


@dataclass
class Interval:
    """A point estimate with a confidence interval."""

    estimate: float
    low: float
    high: float

    def __str__(self) -> str:
        return self.format()

    def format(self, spec: str = ".3f") -> str:
        """The estimate and the bounds in one format (``",.0f"`` for returns in the thousands)."""
        return f"{self.estimate:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"


def score_format(finals: Iterable[Interval]) -> str:
    """The format of a table's scores: three decimals for returns like MiniGrid's and Pendulum's, whole numbers with
    thousands separators once their final returns' CI bounds reach the thousands (MuJoCo), where decimals are noise.

    :param finals: The table's final returns.
    """
    largest = max((max(abs(f.low), abs(f.high)) for f in finals), default=0.0)
    return ",.0f" if largest >= 1000 else ".3f"


def _bootstrap_interval(
    samples: tuple[np.ndarray, ...],
    statistic: Callable[..., np.ndarray],
    confidence: float,
    n_resamples: int,
    seed: int,
) -> Interval:
    """``statistic`` of ``samples`` with a percentile-bootstrap CI, each sample resampled on its own (stratified).

    Samples with no spread give a zero-width interval (SciPy would warn about a degenerate distribution). A sample
    of one score (a method with one completed seed while a sweep runs) resamples only to itself, so it is held
    fixed and the others are resampled (SciPy refuses a sample of one).
    """
    estimate = float(statistic(*samples))
    if all(len(s) < 2 or np.ptp(s) == 0 for s in samples):
        return Interval(estimate, estimate, estimate)
    # A sample of one score cannot be resampled: it goes into every resample as it is.
    resampled = [i for i, s in enumerate(samples) if len(s) >= 2]

    def with_fixed(*drawn: np.ndarray, axis: int = -1) -> np.ndarray:
        batch = drawn[0].shape[:-1]
        full = [np.broadcast_to(s, (*batch, len(s))) for s in samples]
        for i, values in zip(resampled, drawn):
            full[i] = values
        return statistic(*full, axis=axis)

    result = stats.bootstrap(
        tuple(samples[i] for i in resampled),
        with_fixed,
        confidence_level=confidence,
        n_resamples=n_resamples,
        method="percentile",
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    return Interval(estimate, float(result.confidence_interval.low), float(result.confidence_interval.high))


def mean_interval(
    values: Sequence[float], confidence: float = 0.95, n_resamples: int = 50000, seed: int = 0
) -> Interval:
    """The mean of ``values`` with a percentile-bootstrap CI."""
    return _bootstrap_interval((np.asarray(values, dtype=float),), np.mean, confidence, n_resamples, seed)


def _pooled_iqm(*per_task: np.ndarray, axis: int = -1) -> np.ndarray:
    return iqm(np.concatenate(per_task, axis=axis), axis=axis)


def stratified_iqm(
    per_task: Sequence[Sequence[float]], confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> Interval:
    """IQM of the scores of all tasks pooled, with a stratified-bootstrap CI: seeds are resampled within each task.

    :param per_task: One list of per-seed scores per task.
    """
    samples = tuple(np.asarray(s, dtype=float) for s in per_task)
    return _bootstrap_interval(samples, _pooled_iqm, confidence, n_resamples, seed)


def _mean_of_task_means(*per_task: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean([np.mean(scores, axis=axis) for scores in per_task], axis=0)


def stratified_mean(
    per_task: Sequence[Sequence[float]], confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> Interval:
    """The mean over tasks of each task's mean score (every task weighs the same, as a paper's "mean success over
    the tasks" does), with a stratified-bootstrap CI: seeds are resampled within each task.

    :param per_task: One list of per-seed scores per task.
    """
    samples = tuple(np.asarray(s, dtype=float) for s in per_task)
    return _bootstrap_interval(samples, _mean_of_task_means, confidence, n_resamples, seed)


def _probability_of_improvement(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """P(X > Y) + 0.5 P(X = Y) from all pairs, i.e. the Mann-Whitney U statistic over n*m."""
    x = np.moveaxis(np.asarray(x), axis, -1)[..., :, None]
    y = np.moveaxis(np.asarray(y), axis, -1)[..., None, :]
    return ((x > y) + 0.5 * (x == y)).mean(axis=(-2, -1))


def probability_of_improvement(
    x_per_task: Sequence[Sequence[float]],
    y_per_task: Sequence[Sequence[float]],
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """Average over tasks of P(a run of X scores higher than a run of Y), with a stratified-bootstrap CI."""
    pairs = [(np.asarray(x, float), np.asarray(y, float)) for x, y in zip(x_per_task, y_per_task)]
    n_tasks = len(pairs)

    def statistic(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.mean(
            [_probability_of_improvement(samples[2 * i], samples[2 * i + 1], axis) for i in range(n_tasks)], 0
        )

    flat = tuple(a for pair in pairs for a in pair)
    return _bootstrap_interval(flat, statistic, confidence, n_resamples, seed)


def steps_to_threshold(
    steps: Sequence[float], returns: Sequence[float], threshold: float, horizon: float | None = None
) -> float | None:
    """The first evaluation step whose return reaches ``threshold``; ``None`` if none does (by ``horizon``, if given:
    a run whose EVA took env steps of its own may reach it past the budget)."""
    for step, value in zip(steps, returns):
        if horizon is not None and step > horizon:
            break
        if value >= threshold:
            return float(step)
    return None


def median_steps_to_threshold(reached: Sequence[float | None]) -> float | None:
    """The median of runs' :func:`steps_to_threshold`, a run that never reached it (``None``) counting as never;
    ``None`` where the median run never did."""
    median = float(np.median([np.inf if steps is None else steps for steps in reached]))
    return None if np.isinf(median) else median


def normalized_auc(steps: Sequence[float], returns: Sequence[float], horizon: float | None = None) -> float:
    """Area under the eval curve divided by its step span: the curve's average return over training.

    :param horizon: Integrate up to this step: a curve that ends before it is held at its last value, one that goes
        past it is cut there (its value at ``horizon`` interpolated); defaults to the last step.
    """
    steps = np.asarray(steps, float)
    returns = np.asarray(returns, float)
    if horizon is not None:
        end = np.interp(horizon, steps, returns)
        keep = steps < horizon
        steps, returns = np.append(steps[keep], horizon), np.append(returns[keep], end)
    span = steps[-1] - steps[0]
    if span <= 0:
        return float(returns[-1])
    return float(np.trapezoid(returns, steps) / span)


def curve_at(steps: Sequence[float], returns: Sequence[float], grid: np.ndarray) -> np.ndarray:
    """The eval curve on a common step grid: linear interpolation, NaN before its first step, held at its last value
    after its end."""
    return np.interp(grid, np.asarray(steps, float), np.asarray(returns, float), left=np.nan)
