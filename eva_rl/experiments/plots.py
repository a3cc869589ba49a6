"""Figures: one way to make and save them (:func:`new_figure`, :func:`save_figure`; the studies' draw functions
draw on axes and never read disk), and the figure of a task's runs from their TensorBoard event files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from eva_rl.errors import ConfigError


def new_figure(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """``matplotlib.pyplot.subplots(*args, **kwargs)`` on the file-only backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def palette() -> list[str]:
    """Matplotlib's colour cycle."""
    import matplotlib.pyplot as plt

    return plt.rcParams["axes.prop_cycle"].by_key()["color"]


def save_figure(figure: Any, path: Path) -> Path:
    """Lay ``figure`` out, write it to ``path`` (its folder made) and close it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def read_scalars(run_dir: Path, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of one scalar tag in a run folder (empty arrays when absent)."""
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    if tag not in accumulator.Tags()["scalars"]:
        return np.array([]), np.array([])
    events = accumulator.Scalars(tag)
    return np.array([e.step for e in events]), np.array([e.value for e in events])


def plot_runs(board: Path, out: Path, tags: tuple[str, ...] = ("eval/mean_return", "rollout/ep_rew_mean")) -> Path:
    """One panel per tag, one line per method (seeds of a method drawn thin, their mean thick).

    :param board: ``<log-dir>/<task>``, holding ``<method>/seed<k>/`` run folders.
    :param out: PNG path.
    """
    if not board.is_dir():
        raise ConfigError(f"{board} is not a folder: expected <log-dir>/<task>, holding <method>/seed<k>/ runs")
    methods = sorted(p for p in board.iterdir() if p.is_dir() and any(p.glob("seed*/events.out.tfevents*")))
    if not methods:
        raise ConfigError(f"{board} holds no runs: expected <method>/seed<k>/ folders with TensorBoard event files")
    figure, axes = new_figure(1, len(tags), figsize=(5.5 * len(tags), 3.8), dpi=120, squeeze=False)
    colors = palette()
    for axis, tag in zip(axes[0], tags):
        for color, method_dir in zip(colors, methods):
            curves = [read_scalars(seed_dir, tag) for seed_dir in sorted(method_dir.glob("seed*"))]
            curves = [c for c in curves if len(c[0])]
            for steps, values in curves:
                axis.plot(steps, values, color=color, alpha=0.3 if len(curves) > 1 else 1.0, linewidth=1)
            if len(curves) > 1:
                length = min(len(c[0]) for c in curves)
                mean = np.mean([c[1][:length] for c in curves], axis=0)
                axis.plot(curves[0][0][:length], mean, color=color, linewidth=2)
            axis.plot([], [], color=color, label=f"{method_dir.name} ({len(curves)} seed{'s' * (len(curves) > 1)})")
        axis.set_title(tag)
        axis.set_xlabel("environment steps")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(board.name)
    return save_figure(figure, out)
