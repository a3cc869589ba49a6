"""EVA's report in an SB3 logger (TensorBoard): one text table and one chart under ``init/``, which sorts after the
evaluation (``eval/``; TensorBoard sorts groups by name), as do the catch-up row's scalars
(:class:`~eva_rl.eva_ppo.EvaRolloutsMixin`)."""

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
    if report.data_source == "ppo":  # no env steps of its own; the rollouts it read were trained on
        source = f"PPO's rollouts (no extra env steps; {report.deferred_steps:,} steps' updates waited for EVA)"
    else:
        source = f"its own rollouts, {report.env_steps or 0:,} env steps"
        if report.replayed_steps:
            source += ", kept in the replay buffer"
    budget = sum(report.ranks.values())
    cost = f"Rank budget {budget}; {report.batches_used} batches from {source}, {report.seconds:.1f} s."
    return "\n".join([*rows, "", cost])


def allocation_chart(ranks: Mapping[str, int], captured: Mapping[str, float]) -> np.ndarray:
    """The rank EVA gave each layer, labelled with the share of the layer input's variance it captures, as an
    ``(H, W, 3)`` uint8 image. One narrow panel with large type: TensorBoard's image cards shrink an image to their
    width (about 330 pixels), where a wide chart's labels could not be read."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(ranks)
    positions = range(len(names))
    widest = max(ranks.values(), default=0) or 1
    figure, axis = plt.subplots(figsize=(4.4, 0.42 * len(names) + 1.1), dpi=100)
    axis.barh(positions, [ranks[n] for n in names], color="#1f77b4")
    axis.set_yticks(positions, names, fontsize=10)
    axis.invert_yaxis()
    axis.set_xlim(0, widest * 1.75)  # room for the labels
    axis.set_xlabel("rank (label: variance captured)", fontsize=10)
    axis.set_title("EVA's rank per layer", fontsize=11)
    for i, name in enumerate(names):
        axis.text(ranks[name], i, f" {ranks[name]} · {captured.get(name, 0.0):.0%}", va="center", fontsize=10)
    figure.tight_layout()
    figure.canvas.draw()
    image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return image
