"""EVA's report in an SB3 logger (TensorBoard): one text table and one chart under ``init/``, no scalars, so
TensorBoard's first group is the evaluation (``eval/``; groups are sorted by name)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from stable_baselines3.common.logger import Image, Logger

from eva_rl.eva_report import EvaReport

_NOT_TEXT_LOGS = ("stdout", "log", "json", "csv")


def record_eva_report(logger: Logger, report: EvaReport) -> None:
    """Record EVA's report (not dumped here): ``init/eva_report``, a table of each layer's rank, captured variance and
    convergence with EVA's cost (TensorBoard's text tab), and ``init/eva_allocation``, the chart of rank and captured
    variance per layer (images tab)."""
    logger.record("init/eva_report", eva_report_markdown(report), exclude=_NOT_TEXT_LOGS)
    chart = allocation_chart(report.ranks, report.captured_variance)
    logger.record("init/eva_allocation", Image(chart, "HWC"), exclude=_NOT_TEXT_LOGS)


def eva_report_markdown(report: EvaReport) -> str:
    """The report as a Markdown table, one row per layer, and a line with what EVA took."""
    rows = [
        "| layer | fan-in | rank | captured variance | converged at batch |",
        "|---|---:|---:|---:|---:|",
    ]
    for layer, rank in report.ranks.items():
        captured = report.captured_variance.get(layer)
        shared = f" (input of {report.shared_inputs[layer]})" if layer in report.shared_inputs else ""
        rows.append(
            f"| {layer}{shared} | {report.fan_in.get(layer, '')} | {rank} | "
            f"{'' if captured is None else f'{captured:.1%}'} | {report.converged_at.get(layer, '-')} |"
        )
    source = "PPO's rollouts" if report.data_source == "ppo" else "its own rollouts"
    steps = report.skipped_steps if report.data_source == "ppo" else (report.env_steps or 0)
    cost = (
        f"Rank budget {sum(report.ranks.values())}; {report.batches_used} batches from {source}, {steps:,} env steps, "
        f"{report.seconds:.1f} s."
    )
    return "\n".join([*rows, "", cost])


def allocation_chart(ranks: Mapping[str, int], captured: Mapping[str, float]) -> np.ndarray:
    """Rank and captured variance per layer, side by side, as an ``(H, W, 3)`` uint8 image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(ranks)
    positions = range(len(names))
    figure, (rank_axis, variance_axis) = plt.subplots(
        1, 2, figsize=(9, 0.32 * len(names) + 1.4), dpi=100, sharey=True, gridspec_kw={"width_ratios": [1, 1]}
    )
    rank_axis.barh(positions, [ranks[n] for n in names], color="#4c72b0")
    rank_axis.set_yticks(positions, names, fontsize=8)
    rank_axis.invert_yaxis()
    rank_axis.set_xlabel("rank")
    rank_axis.set_title("rank EVA allocated", fontsize=10)
    for i, name in enumerate(names):
        rank_axis.text(ranks[name], i, f" {ranks[name]}", va="center", fontsize=8)
    variance_axis.barh(positions, [100 * captured.get(n, 0.0) for n in names], color="#55a868")
    variance_axis.set_xlim(0, 105)
    variance_axis.set_xlabel("% of the layer input's variance")
    variance_axis.set_title("variance the rank captures", fontsize=10)
    for i, name in enumerate(names):
        variance_axis.text(100 * captured.get(name, 0.0), i, f" {captured.get(name, 0.0):.0%}", va="center", fontsize=8)
    figure.tight_layout()
    figure.canvas.draw()
    image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return image
