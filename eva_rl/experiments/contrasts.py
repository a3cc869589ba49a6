"""Contrasts between a method and the control that changes one thing about it (issue 27's controls): how often a run
of the one beats a run of the other, on final return, normalized AUC and the return after the first updates.

Each control keeps EVA's init but for one thing (or LoRA's, but for one thing), so the contrasts together tell
"EVA's subspace helps" from "EVA's row norm (or the signal its rows carry) changes the step size" from "training A
matters": a suite page shows them unless the only one drawn is EVA against another method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from eva_rl.experiments.markdown import table, table_row
from eva_rl.experiments.stats import Interval, probability_of_improvement


@dataclass(frozen=True)
class Contrast:
    """``method`` against ``control``, which differ in ``differs`` only."""

    method: str
    control: str
    differs: str


CONTRASTS: tuple[Contrast, ...] = (
    Contrast("eva", "lora", "EVA's init as a whole: data subspace and ranks, unit row norm"),
    Contrast("eva", "lora-orth", "data subspace and ranks against random ones, both at unit row norm"),
    Contrast("eva-rescaled", "lora", "data subspace and ranks against random ones, both at Kaiming's row norm"),
    Contrast("eva-fa", "lora-orth-fa", "the subspace alone: A frozen at unit row norm, only B trains"),
    Contrast("eva", "eva-rescaled", "row norm, unit against Kaiming's, in EVA's subspace"),
    Contrast("eva-signal", "lora", "data subspace and ranks against random ones, both feeding B Kaiming's signal"),
    Contrast("eva", "eva-signal", "the signal into B, EVA's own against Kaiming's, in EVA's subspace"),
    Contrast("lora-orth", "lora", "row norm, unit orthonormal against Kaiming-uniform, random subspace"),
    Contrast("eva", "eva-fa", "A trains or stays frozen, EVA's subspace"),
    Contrast("lora", "lora-fa", "A trains or stays frozen, random subspace"),
    Contrast("eva", "lora-deferred", "EVA's init alone: both hold their first updates back until EVA converges"),
    Contrast("lora-deferred", "lora", "the deferral alone: first updates held back for EVA, then made in a row"),
    Contrast("lora-redist", "lora-deferred", "EVA's ranks alone: Kaiming-uniform A, both on EVA's schedule"),
    Contrast("eva-rescaled", "lora-redist", "EVA's subspace alone: EVA's ranks and schedule, Kaiming's row norm"),
    Contrast("eva-own", "eva", "where EVA reads: rollouts of its own before training against PPO's (updates wait)"),
    Contrast("eva-own", "lora", "EVA's init with no update waiting, its own env steps taken out of its budget"),
    Contrast("eva-span", "eva", "EVA's convergence test: the span of each layer's directions, not each direction"),
    Contrast("eva-span", "lora", "EVA's init, waiting only until the span of its directions settles"),
)
"""The contrasts a page draws, where both methods ran."""

FINAL, AUC = "final", "auc"
"""Keys of the per-run scores :func:`contrast_stats` compares; ``after k`` for the return after k updates."""


def after_key(updates: int) -> str:
    return f"after {updates}"


@dataclass
class ContrastStats:
    """P(a run of ``method`` scores higher than a run of ``control``), averaged over the tasks both ran, with
    stratified-bootstrap 95% CIs.

    :ivar after_updates: ``{k: P(...) on the return after k updates}`` where both were evaluated there.
    :ivar per_task: ``{task: {"final": P(...), "auc": P(...)}}`` on each task alone, where they ran on several
        (tasks can disagree: a pooled tie may be a loss on one and a win on the other).
    """

    method: str
    control: str
    differs: str
    tasks: list[str]
    final: Interval
    auc: Interval
    after_updates: dict[int, Interval] = field(default_factory=dict)
    per_task: dict[str, dict[str, Interval]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["after_updates"] = {str(k): dataclasses.asdict(v) for k, v in self.after_updates.items()}
        if not self.per_task:  # written where there is one, so reports written before it read back unchanged
            data.pop("per_task")
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ContrastStats:
        after = {int(k): Interval(**v) for k, v in data.get("after_updates", {}).items()}
        per_task = {
            task: {key: Interval(**value) for key, value in scores.items()}
            for task, scores in data.get("per_task", {}).items()
        }
        intervals = {"final": Interval(**data["final"]), "auc": Interval(**data["auc"]), "after_updates": after}
        return cls(**{**data, **intervals, "per_task": per_task})


Scores = Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]]
"""``{method: {FINAL | AUC | after_key(k): {task: per-seed scores}}}``."""


def on_one_task(
    ours: Mapping[str, Mapping[str, Sequence[float]]],
    theirs: Mapping[str, Mapping[str, Sequence[float]]],
    task: str,
    resamples: int,
) -> dict[str, Interval]:
    """``{FINAL: P, AUC: P}``: P(a run of the one method scores higher than a run of the other) on ``task`` alone,
    from each method's ``{FINAL | AUC: {task: per-seed scores}}``."""
    return {
        key: probability_of_improvement([ours[key][task]], [theirs[key][task]], n_resamples=resamples)
        for key in (FINAL, AUC)
    }


def contrast_stats(scores: Scores, updates: Sequence[int], resamples: int, *, reference: str) -> list[ContrastStats]:
    """The :data:`CONTRASTS` whose two methods ran on a common task, or none where the only one drawn is the page's
    reference method against another (its P(eva better) column shows that one already). A page of two controls
    alone, such as the frozen-A pair at their own rates, keeps its one contrast.

    :param scores: Every method's per-seed scores per task.
    :param updates: The update counts whose returns are compared where both methods have them.
    :param resamples: Bootstrap resamples behind each CI.
    :param reference: The page's reference method, the one its P(... better) columns compare.
    """
    drawn = []
    for contrast in CONTRASTS:
        ours, theirs = scores.get(contrast.method, {}), scores.get(contrast.control, {})
        tasks = [task for task in ours.get(FINAL, {}) if task in theirs.get(FINAL, {})]
        if not tasks:
            continue
        keys = [FINAL, AUC] + [
            after_key(k)
            for k in updates
            if all(t in ours.get(after_key(k), {}) and t in theirs.get(after_key(k), {}) for t in tasks)
        ]
        p = {
            key: probability_of_improvement(
                [ours[key][t] for t in tasks], [theirs[key][t] for t in tasks], n_resamples=resamples
            )
            for key in keys
        }
        after = {k: p[after_key(k)] for k in updates if after_key(k) in p}
        # Each task alone too, where there are several: a pooled tie can hide a loss on one task and a win on another.
        per_task = {task: on_one_task(ours, theirs, task, resamples) for task in (tasks if len(tasks) > 1 else [])}
        drawn.append(
            ContrastStats(contrast.method, contrast.control, contrast.differs, tasks, p[FINAL], p[AUC], after, per_task)
        )
    return [] if len(drawn) == 1 and drawn[0].method == reference else drawn


def contrasts_markdown(contrasts: Sequence[ContrastStats], rates: Mapping[str, str] | None = None) -> list[str]:
    """The page's section on the controls (no lines without contrasts).

    :param rates: Each method's learning-rate cell, as its task tables show it: a pair run at two rates differs in
        the rate too, and its rates column says so.
    """
    if not contrasts:
        return []
    rates = rates or {}
    counts = sorted({k for c in contrasts for k in c.after_updates})
    lines = [
        "## Controls",
        "",
        "P(a run of the method scores higher than a run of its control), averaged over the tasks both ran, 95% CIs; "
        "0.5 is a tie. Each pair's inits differ in one thing; the rates column gives the learning rate of each "
        "(method vs control where they differ: the pair then differs in its rate too).",
        "",
        *table(["method > control", "what differs", "rates", "tasks", "final", "AUC", *(f"after {k}" for k in counts)]),
    ]
    for c in contrasts:
        cells = [str(c.after_updates[k]) if k in c.after_updates else "-" for k in counts]
        ours, theirs = rates.get(c.method, "-"), rates.get(c.control, "-")
        rate = ours if ours == theirs else f"{ours} vs {theirs}"
        row = [f"{c.method} > {c.control}", c.differs, rate, str(len(c.tasks)), str(c.final), str(c.auc), *cells]
        lines.append(table_row(row))
    return [*lines, "", *_per_task_markdown(contrasts)]


def _per_task_markdown(contrasts: Sequence[ContrastStats]) -> list[str]:
    """The same contrasts on each task alone, where any ran on several (no lines otherwise); a contrast drawn on one
    task shows its pooled figure, which is that task's, in that task's column."""
    tasks = list(dict.fromkeys(task for c in contrasts for task in c.per_task))
    if not tasks:
        return []
    rows = []
    for c in contrasts:
        alone = c.per_task or {t: {FINAL: c.final, AUC: c.auc} for t in c.tasks}
        cells = [f"{alone[task][FINAL]}; {alone[task][AUC]}" if task in alone else "-" for task in tasks]
        rows.append([f"{c.method} > {c.control}", *cells])
    return ["The same on each task alone (final; AUC):", "", *table(["method > control", *tasks], rows), ""]
