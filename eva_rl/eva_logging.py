"""EVA's report in an SB3 logger (TensorBoard): ranks, captured variance, cost, and a rank bar chart."""

from __future__ import annotations

import numpy as np
from stable_baselines3.common.logger import Image, Logger

from eva_rl.eva_report import EvaReport


def record_eva_report(logger: Logger, report: EvaReport) -> None:
    """Record EVA's ranks, captured variance, cost and a rank bar chart under ``eva/`` (not dumped here)."""
    for layer, rank in report.ranks.items():
        logger.record(f"eva/rank/{layer}", rank)
        logger.record(f"eva/captured_variance/{layer}", report.captured_variance[layer])
    logger.record("eva/batches", report.batches_used)
    logger.record("eva/env_steps", report.env_steps)
    logger.record("eva/skipped_steps", report.skipped_steps)
    logger.record("eva/seconds", report.seconds)
    logger.record("eva/ranks", Image(rank_bar_chart(report.ranks), "HWC"), exclude=("stdout", "log", "json", "csv"))


def rank_bar_chart(ranks: dict[str, int]) -> np.ndarray:
    """A bar chart of EVA's rank per layer as an ``(H, W, 3)`` uint8 image for TensorBoard."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(ranks)
    figure, axis = plt.subplots(figsize=(6, 0.35 * len(names) + 1.2), dpi=100)
    axis.barh(range(len(names)), [ranks[n] for n in names], color="#4c72b0")
    axis.set_yticks(range(len(names)), names, fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel("rank")
    axis.set_title("EVA rank per layer")
    figure.tight_layout()
    figure.canvas.draw()
    image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return image
