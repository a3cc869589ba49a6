"""Figures: one way to make and save them (:func:`new_figure`, :func:`save_figure`; the studies' draw functions
draw on axes and never read disk), and the figure of a task's runs from their TensorBoard event files."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from eva_rl.errors import ConfigError
from eva_rl.experiments.run_folder import RunFolder


def new_figure(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """``matplotlib.pyplot.subplots(*args, **kwargs)`` on the file-only backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


METHOD_COLORS = {
    "eva": "#1f77b4",
    "lora": "#ff7f0e",
    "full": "#2ca02c",
    "scratch": "#7f7f7f",
    "head": "#d62728",
    "pissa": "#9467bd",
    "olora": "#8c564b",
    "dora": "#e377c2",
    "eva+dora": "#17becf",
    "lora-redist": "#bcbd22",
    # the controls, each a lighter or darker shade of the method it takes apart
    "lora-orth": "#ffbb78",
    "lora-fa": "#a05d00",
    "eva-rescaled": "#aec7e8",
    "eva-signal": "#6baed6",
    "eva-fa": "#0b3c5d",
    "lora-orth-fa": "#e6550d",
    "lora-deferred": "#843c39",
    "eva-own": "#e7298a",
    "eva-span": "#66a61e",
}
"""One colour per method in every plot the project draws (matplotlib's ten, the core methods first: eva blue, lora
orange, full green, scratch grey)."""
_OTHER_COLORS = ("#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d")


def method_color(method: str) -> str:
    """The colour ``method`` is drawn in everywhere; a name outside :data:`METHOD_COLORS` (a continual approach) gets
    a lighter one, the same on every run."""
    return METHOD_COLORS.get(method) or _OTHER_COLORS[zlib.crc32(method.encode()) % len(_OTHER_COLORS)]


def method_linestyle(method: str) -> str:
    """Dashed for a method whose A stays frozen (``-fa``), so it stands apart from the method it shades."""
    from eva_rl.methods import get_method, method_names

    return "--" if method in method_names() and not get_method(method).train_A else "-"


def seed_count(seeds: int) -> str:
    """``"1 seed"``, ``"5 seeds"``."""
    return f"{seeds} seed{'' if seeds == 1 else 's'}"


def method_label(method: str, seeds: int) -> str:
    """A legend entry: the method and how many seeds its line stands on."""
    return f"{method} ({seed_count(seeds)})"


def value_label(value: float) -> str:
    """A setting's value as a tick label, in one style along a learning-rate axis: ``1.5625e-5``, ``1.25e-4``,
    ``1e-3`` (Python's ``g`` writes ``1.5625e-05`` beside ``0.000125``); values from 0.01 to 10,000 as ``g`` does."""
    if value == 0 or 1e-2 <= abs(value) < 1e4:
        return f"{value:g}"
    mantissa, exponent = f"{value:.6e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def save_figure(figure: Any, path: Path) -> Path:
    """Lay ``figure`` out, write it to ``path`` (its folder made) and close it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def read_scalars(run_dir: Path, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of one scalar tag in a run folder (empty arrays when absent). A resumed run's log repeats the
    steps after its checkpoint; TensorBoard keeps the resumed ones, and its warning about them is kept off the
    console."""
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    tensorboard = logging.getLogger("tensorboard")
    level = tensorboard.level
    tensorboard.setLevel(logging.ERROR)
    try:
        accumulator.Reload()
    finally:
        tensorboard.setLevel(level)
    if tag not in accumulator.Tags()["scalars"]:
        return np.array([]), np.array([])
    events = accumulator.Scalars(tag)
    return np.array([e.step for e in events]), np.array([e.value for e in events])


Curves = dict[str, dict[str, list[tuple[np.ndarray, np.ndarray]]]]
"""``{tag: {method: [(steps, values) per seed]}}``."""


def read_runs(board: Path, tags: tuple[str, ...]) -> Curves:
    """Every seed's curve of each of ``tags``, per method, from the event files of the run folders under ``board``.

    :raises ConfigError: if ``board`` is not a folder or holds no runs.
    """
    if not board.is_dir():
        raise ConfigError(f"{board} is not a folder: expected <log-dir>/<task>, holding <method>/seed<k>/ runs")
    methods = sorted(
        p for p in board.iterdir() if p.is_dir() and any(RunFolder(s).event_files() for s in p.glob("seed*"))
    )
    if not methods:
        raise ConfigError(f"{board} holds no runs: expected <method>/seed<k>/ folders with TensorBoard event files")
    curves: Curves = {}
    for tag in tags:
        for method_dir in methods:
            per_seed = [read_scalars(seed_dir, tag) for seed_dir in sorted(method_dir.glob("seed*"))]
            curves.setdefault(tag, {})[method_dir.name] = [c for c in per_seed if len(c[0])]
    return curves


def draw_runs(axes: Any, curves: Curves) -> None:
    """A panel per tag, a colour per method: its seeds drawn thin, their mean thick."""
    for axis, (tag, by_method) in zip(axes, curves.items()):
        for method, runs in by_method.items():
            color = method_color(method)
            for steps, values in runs:
                axis.plot(steps, values, color=color, alpha=0.3 if len(runs) > 1 else 1.0, linewidth=1)
            if len(runs) > 1:
                length = min(len(c[0]) for c in runs)
                mean = np.mean([c[1][:length] for c in runs], axis=0)
                axis.plot(runs[0][0][:length], mean, color=color, linewidth=2)
            axis.plot([], [], color=color, label=f"{method} ({len(runs)} seed{'s' * (len(runs) > 1)})")
        axis.set_title(tag)
        axis.set_xlabel("environment steps")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)


def plot_runs(board: Path, out: Path, tags: tuple[str, ...] = ("eval/mean_return", "rollout/ep_rew_mean")) -> Path:
    """``scripts/plot_runs.py``: one panel per tag, one line per method (seeds of a method drawn thin, their mean
    thick).

    :param board: ``<log-dir>/<task>``, holding ``<method>/seed<k>/`` run folders.
    :param out: PNG path.
    """
    curves = read_runs(board, tags)
    figure, axes = new_figure(1, len(tags), figsize=(5.5 * len(tags), 3.8), dpi=120, squeeze=False)
    draw_runs(axes[0], curves)
    figure.suptitle(board.name)
    return save_figure(figure, out)
