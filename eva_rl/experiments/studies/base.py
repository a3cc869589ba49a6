"""The shape every study shares: plan -> runs -> report -> page.

A study plans its runs as ``(key, RunSpec)`` pairs (the key says where a run belongs in the report: its suite task,
its rank, its tuning point...), an :class:`~eva_rl.experiments.execute.Executor` carries them out (completed runs are
skipped, so a study resumes), the report is computed from the completed runs made with today's settings, and the
page (Markdown, JSON, figures) is written from the report alone. ``--report-only`` is the same study without its
runs: the page regenerates from the results in the run folders.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from eva_rl.errors import ConfigError
from eva_rl.experiments.execute import Executor
from eva_rl.experiments.run_folder import RunDirError, RunResult
from eva_rl.experiments.runs import RunSpec, completed_result
from eva_rl.files import check_writable

Report = TypeVar("Report")
Planned = list[tuple[Any, RunSpec]]


class Study(ABC, Generic[Report]):
    """A study writing its page to :attr:`out_dir`.

    :param log_dir: The results root; run folders and the page go under it.
    :param echo: Receives the study's progress lines.
    """

    title: str = "study"

    def __init__(self, log_dir: Path, echo: Callable[[str], None] = print) -> None:
        self.log_dir, self.echo = Path(log_dir), echo

    @property
    @abstractmethod
    def out_dir(self) -> Path:
        """Where the page goes."""

    @abstractmethod
    def plan(self) -> Planned:
        """Every run of the study, with its key."""

    def carry_out(self, executor: Executor, overwrite: bool = False) -> None:
        """Carry out the planned runs (a study whose runs depend on each other's models carries them out in turn)."""
        executor.run([spec for _, spec in self.plan()], overwrite=overwrite)

    def page_plan(self) -> Planned:
        """The runs the page reports (default: the plan)."""
        return self.plan()

    def score(self, key: Any) -> str:
        """What the page compares for the run at ``key``: ``"return"`` (default) or ``"success"``."""
        return "return"

    def completed(self) -> list[tuple[Any, RunResult]]:
        """The page's runs that are complete and made with today's settings, each scored as the page compares it
        (:meth:`score`, :meth:`RunResult.scored`); one line names the runs made with other settings, which are left out.

        :raises ConfigError: if none is complete.
        """
        runs, stale = [], []
        for key, spec in self.page_plan():
            if spec.folder.is_complete:
                try:
                    runs.append((key, completed_result(spec).scored(self.score(key))))
                except RunDirError as error:
                    stale.append(str(error))
        if stale:
            self.echo(f"results leave out {len(stale)} run(s) made with other settings; the first: {stale[0]}")
        if not runs:
            raise ConfigError(f"no completed runs of {self.title} under {self.log_dir}")
        return runs

    @abstractmethod
    def report(self, runs: list[tuple[Any, RunResult]]) -> Report:
        """The study's statistics of its completed runs."""

    @abstractmethod
    def write_page(self, report: Report, runs: list[tuple[Any, RunResult]]) -> list[Path]:
        """Write the page (Markdown, JSON, figures) from ``report`` (and the runs' curves); the paths written."""


def conduct(
    study: Study[Report], executor: Executor | None = None, report_only: bool = False, overwrite: bool = False
) -> Report:
    """Run (or resume) ``study``'s runs with ``executor``, then report and write its page.

    :param report_only: Run nothing: the page from the runs already complete.
    :param overwrite: Start over the runs whose folders hold runs made with other settings.
    """
    if report_only:
        runs = study.completed()  # before the page's folder is made: a report of nothing writes nothing
        check_writable(study.out_dir)
    else:
        check_writable(study.out_dir)  # before any run: a page that cannot be written stops the study first
        if executor is None:
            raise ValueError("an executor is needed to carry out the runs (or report_only)")
        study.carry_out(executor, overwrite)
        runs = study.completed()
    report = study.report(runs)
    study.write_page(report, runs)
    return report
