"""Carrying out runs: one interface, three executors, one worker setup.

Every command and study hands its :class:`~eva_rl.experiments.runs.RunSpec` list to an :class:`Executor`; which one
is a choice of class, made once where the command line is read:

- :class:`LocalProcesses`: a process pool of ``workers`` (1: this process), a line per finished run (sweeps);
- :class:`SideBySide`: the same, with one progress bar per run (the main job);
- :class:`RayCluster`: Ray tasks on a cluster (or a local instance), results on the shared ``--log-dir``.

Each run is deterministic on its own (its seed, the worker's torch threads), so the executor changes the wall time,
never the numbers: a completed run is skipped and an interrupted one resumed, whichever executor meets it.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import nullcontext
from multiprocessing.managers import SyncManager
from pathlib import Path
from queue import Empty
from typing import TYPE_CHECKING, Any, TypeVar

from tqdm.auto import tqdm

from eva_rl.errors import ConfigError, EvaRLError
from eva_rl.experiments.run_folder import RunResult

if TYPE_CHECKING:  # the command line's help needs neither torch nor SB3, which the runs import
    from eva_rl.experiments.runs import RunSpec
    from eva_rl.experiments.training import ProgressSink

T = TypeVar("T")


def prepare_worker(threads: int = 1, packages: Iterable[str] = ()) -> None:
    """What every process that carries out runs does first: its torch threads, one-line warnings, and the env
    packages that register the runs' ids."""
    import torch

    from eva_rl.experiments.environments import import_packages
    from eva_rl.experiments.training import one_line_warnings

    torch.set_num_threads(threads)
    one_line_warnings()
    import_packages(packages)


def die_with_parent(parent: int) -> None:
    """Every pool process's initializer: on Linux the kernel kills it when the process that started it dies, so a
    killed ``compare`` or ``finetune`` leaves no workers running on, holding their runs' locks (elsewhere nothing is
    done).

    :param parent: The pid of the process that started it: if that one died before this call, exit at once.
    """
    if sys.platform != "linux":
        return
    import ctypes

    set_parent_death_signal = 1  # prctl's PR_SET_PDEATHSIG
    ctypes.CDLL(None, use_errno=True).prctl(set_parent_death_signal, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def run_in_worker(
    spec: RunSpec,
    resume: bool = True,
    overwrite: bool = False,
    threads: int = 1,
    progress: bool | ProgressSink = False,
) -> RunResult:
    """One run (skipped if complete, resumed if interrupted and ``resume``) in a prepared process."""
    from eva_rl.experiments.runs import run

    prepare_worker(threads, spec.task.env_packages)
    return run(spec, progress=progress, resume=resume, overwrite=overwrite)


def _call_in_worker(function: Callable[..., T], threads: int, packages: Sequence[str], args: tuple) -> T:
    prepare_worker(threads, packages)
    return function(*args)


def in_fresh_process(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` in a new process of its own (a measurement that must not see this process's memory)."""
    with _spawned_pool(1) as pool:
        return pool.submit(function, *args).result()


def _spawned_pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes that die with this one; spawned, not forked: a forked torch with threads already started can
    deadlock."""
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(workers, mp_context=context, initializer=die_with_parent, initargs=(os.getpid(),))


def progress_line(
    done: int,
    total: int,
    spec: RunSpec,
    result: RunResult | None,
    to_go: float | None = None,
    after: RunSpec | None = None,
    error: BaseException | None = None,
    earlier: bool = False,
) -> str:
    """A finished run's line: its final return (and success rate, where the env reports one), or ``failed``
    (``result`` None) and why, and the time the runs still to make should take (``to_go`` seconds).

    :param after: The run whose model it started from, where that run is in the same call (a sequential stage): the
        line names its task, apart from the same task's run from the pretrained agent.
    :param error: A failed run's error: its type and first line follow ``failed``, so a sweep's log says why as the
        run ends, not only once every run has.
    :param earlier: The run was complete before this call (skipped): the line says so, so that a resumed sweep's
        log does not read as if it made its runs again.
    """
    outcome = "failed" if result is None else f"final {result.final_return:.3f}"
    if result is None and error is not None:
        outcome += f" ({_first_line(error)})"
    if result is not None and result.success_curve:
        outcome += f", success {result.success_curve[-1][1]:.2f}"
    estimate = "" if to_go is None else f" (about {duration(to_go)} to go)"
    if earlier:
        estimate = " (complete before)" + estimate
    start = "" if after is None else f" after {after.task.name}"
    return f"[{done}/{total}] {spec.task.name} {spec.method} seed{spec.seed}{start}: {outcome}{estimate}"


def _first_line(error: BaseException, limit: int = 300) -> str:
    line = f"{type(error).__name__}: {str(error).strip()}".splitlines()[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def duration(seconds: float) -> str:
    """``seconds`` as a person reads a wait: ``40 s``, ``25 min``, ``3.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def default_workers(runs: int) -> int:
    """``--workers``' default: one per CPU core, at most one per run."""
    return max(1, min(runs, os.cpu_count() or 1))


def prerequisites(specs: Sequence[RunSpec]) -> dict[int, int]:
    """The runs of ``specs`` that start from another run's model in ``specs`` (a sequential stage), each mapped to
    that run's index: ``{dependent: prerequisite}``."""
    by_model = {spec.folder.model_file.resolve(): i for i, spec in enumerate(specs)}
    found = {j: by_model.get(spec.agent_path.resolve()) for j, spec in enumerate(specs)}
    return {j: i for j, i in found.items() if i is not None and i != j}


def _chain_lengths(after: dict[int, int], count: int) -> list[int]:
    """How many runs wait, one after the other, on each of ``count`` runs: the longest chain starts first, so a
    sequence of stages runs beside the independent runs instead of after them."""
    lengths = [0] * count
    for run in after:
        prerequisite, length = after.get(run), 1
        while prerequisite is not None:
            if length > count:
                raise ConfigError(f"run {run} starts from a run that starts, some runs further on, from its own model")
            lengths[prerequisite] = max(lengths[prerequisite], length)
            prerequisite, length = after.get(prerequisite), length + 1
    return lengths


def _completed(function: Callable[..., T], *args: Any) -> Future:
    """``function(*args)`` made here, as a finished future (the one-worker path of :class:`LocalProcesses`)."""
    future: Future = Future()
    try:
        future.set_result(function(*args))
    except Exception as error:
        future.set_exception(error)
    return future


class PrerequisiteFailed(EvaRLError):
    """A run that was to start from another run's model, which failed: it is not attempted."""


class Executor(ABC):
    """Carries out runs.

    :param workers: Runs at a time.
    :param threads: torch CPU threads per run.
    :param echo: Receives a line per finished run.
    """

    def __init__(self, workers: int = 1, threads: int = 1, echo: Callable[[str], None] = print) -> None:
        self.workers, self.threads, self.echo = workers, threads, echo

    @classmethod
    def from_flags(cls, args: Any, runs: int) -> Executor:
        """The executor a command line asks for (``--workers``, ``--threads``) to carry out ``runs`` runs."""
        return cls(args.workers or default_workers(runs), args.threads)

    @abstractmethod
    def run(self, specs: Sequence[RunSpec], resume: bool = True, overwrite: bool = False) -> list[RunResult]:
        """Carry out ``specs``; the results come in their order. A run that starts from another run's model in
        ``specs`` (a sequential stage: its ``agent_path`` is that run's ``model.zip``) waits for that run.

        :param resume: Continue an interrupted run from its checkpoint (without it, one is an error).
        :param overwrite: Start over a run whose folder holds one made with other settings.
        :raises EvaRLError: the first error a run raised.
        """

    def map(self, function: Callable[..., T], jobs: Sequence[tuple], packages: Sequence[str] = ()) -> list[T]:
        """``function(*job)`` for each job, in processes prepared like the runs' (work on completed runs, such as
        evaluating them on other tasks); in this process by default."""
        prepare_worker(self.threads, packages)
        return [function(*job) for job in jobs]


class _Outcomes:
    """Each run's result or error as the runs end: a line per finished run (``successes``: for the failed ones only,
    where bars show the rest), and the first error raised only once every run has ended.

    Each line says how long the runs still to make should take: their number times the mean wall time of the runs
    made by this call, over ``workers`` (runs complete before the call are skipped in no time and count in neither).
    """

    def __init__(
        self,
        specs: Sequence[RunSpec],
        echo: Callable[[str], None],
        successes: bool = True,
        workers: int = 1,
        after: dict[int, int] | None = None,
    ) -> None:
        self.specs, self.echo, self.successes, self.workers = specs, echo, successes, workers
        self.after = after or {}
        self.results_at: dict[int, RunResult] = {}
        self.failures: list[Exception] = []
        self.to_make = {i for i, spec in enumerate(specs) if not spec.folder.is_complete}
        self.made_walls: list[float] = []

    def to_go(self) -> float | None:
        """Seconds the runs still to make should take (``None``: none made yet, or none left)."""
        left = len(self.to_make - set(self.results_at))
        if not self.made_walls or not left:
            return None
        return sum(self.made_walls) / len(self.made_walls) * left / min(self.workers, left)

    def record(self, i: int, outcome: Callable[[], RunResult]) -> None:
        """Run ``i``'s outcome: ``outcome()`` returns its result or raises its error."""
        done = len(self.results_at) + len(self.failures) + 1
        after = self.specs[self.after[i]] if i in self.after else None
        try:
            self.results_at[i] = outcome()
        except Exception as error:
            self.failures.append(error)
            self.to_make.discard(i)
            self.echo(progress_line(done, len(self.specs), self.specs[i], None, self.to_go(), after, error))
            return
        earlier = i not in self.to_make
        if not earlier:
            self.made_walls.append(self.results_at[i].wall_seconds)
        if self.successes:
            result, to_go = self.results_at[i], self.to_go()
            self.echo(progress_line(done, len(self.specs), self.specs[i], result, to_go, after, earlier=earlier))

    def results(self) -> list[RunResult]:
        """The results in the runs' order.

        :raises Exception: the first failed run's error, after a line saying how many failed.
        """
        if self.failures:
            self.echo(f"{len(self.failures)} of {len(self.specs)} runs failed (named above); the first one's error:")
            raise self.failures[0]
        return [self.results_at[i] for i in range(len(self.specs))]


class LocalProcesses(Executor):
    """A process pool of ``workers`` on this machine (``workers`` 1: one run after the other in this process)."""

    def run(self, specs: Sequence[RunSpec], resume: bool = True, overwrite: bool = False) -> list[RunResult]:
        """As :meth:`Executor.run`; a run that fails is named as it ends and the others go on, so one bad run folder
        neither stops a sweep nor hides its progress: the first error is raised once every run has ended.

        Runs start as workers free up, the longest chain of waiting runs first; a run that another was to start
        from fails that one too, unattempted."""
        after = prerequisites(specs)
        outcomes = _Outcomes(specs, self.echo, workers=self.workers, after=after)
        waiting: dict[int, list[int]] = {}
        for run, prerequisite in after.items():
            waiting.setdefault(prerequisite, []).append(run)
        chains = _chain_lengths(after, len(specs))
        ready = [i for i in range(len(specs)) if i not in after]
        in_flight: dict[Future, int] = {}
        with self._pool(len(specs)) if self.workers > 1 and len(specs) > 1 else nullcontext() as pool:
            while ready or in_flight:
                ready.sort(key=lambda i: (-chains[i], i))
                while ready and len(in_flight) < self.workers:
                    i = ready.pop(0)
                    start = _completed if pool is None else pool.submit
                    in_flight[start(run_in_worker, specs[i], resume, overwrite, self.threads)] = i
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    i = in_flight.pop(future)
                    outcomes.record(i, future.result)
                    if i in outcomes.results_at:
                        ready += waiting.get(i, [])
                    else:
                        self._fail_waiting(i, waiting, outcomes)
        return outcomes.results()

    def _fail_waiting(self, failed: int, waiting: dict[int, list[int]], outcomes: _Outcomes) -> None:
        """Record every run that waited (directly or further down its chain) on run ``failed`` as failed."""
        for run in waiting.get(failed, []):
            starts_from = outcomes.specs[failed].run_dir

            def refuse(run: int = run, starts_from: Path = starts_from) -> RunResult:
                raise PrerequisiteFailed(
                    f"{outcomes.specs[run].run_dir} was not run: the run it starts from, {starts_from}, failed"
                )

            outcomes.record(run, refuse)
            self._fail_waiting(run, waiting, outcomes)

    def map(self, function: Callable[..., T], jobs: Sequence[tuple], packages: Sequence[str] = ()) -> list[T]:
        if self.workers <= 1 or len(jobs) < 2:
            return super().map(function, jobs, packages)
        with self._pool(len(jobs)) as pool:
            futures = [pool.submit(_call_in_worker, function, self.threads, list(packages), job) for job in jobs]
            return [future.result() for future in futures]

    def _pool(self, jobs: int) -> ProcessPoolExecutor:
        return _spawned_pool(min(self.workers, jobs))


class SideBySide(LocalProcesses):
    """Runs side by side, one process each (up to ``workers`` at a time), one progress bar each in this process;
    ``workers`` 1 runs them here one after the other, with their own bars.

    :param progress: Show the bars.
    """

    def __init__(
        self, workers: int = 1, threads: int = 1, echo: Callable[[str], None] = print, progress: bool = True
    ) -> None:
        super().__init__(workers, threads, echo)
        self.progress = progress

    def run(self, specs: Sequence[RunSpec], resume: bool = True, overwrite: bool = False) -> list[RunResult]:
        """As :meth:`LocalProcesses.run`: a failed run is named (above the bars) and the others go on."""
        outcomes = _Outcomes(specs, tqdm.write if self.progress else self.echo, successes=False, workers=self.workers)
        if self.workers <= 1 or len(specs) <= 1:
            for i, spec in enumerate(specs):
                outcomes.record(
                    i, lambda spec=spec: run_in_worker(spec, resume, overwrite, self.threads, self.progress)
                )
            return outcomes.results()
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(die_with_parent, (os.getpid(),))
        with manager:
            queue = manager.Queue() if self.progress else None
            bars = [
                tqdm(
                    total=spec.task.total_timesteps,
                    desc=f"{spec.method} seed{spec.seed}",
                    position=i,
                    unit="step",
                    disable=not self.progress,
                    mininterval=0.5,
                )
                for i, spec in enumerate(specs)
            ]
            try:
                with self._pool(len(specs)) as pool:
                    futures = {
                        pool.submit(_run_reporting, spec, i, queue, resume, overwrite, self.threads): i
                        for i, spec in enumerate(specs)
                    }
                    # Move the bars while waiting; a failed run's bar says so.
                    pending: set[Future] = set(futures)
                    while pending:
                        done, pending = wait(pending, timeout=0.25)
                        _show(queue, bars)
                        for future in done:
                            if future.exception() is not None:
                                bars[futures[future]].set_postfix_str("failed")
                            outcomes.record(futures[future], future.result)
                _show(queue, bars)
            finally:
                for bar in bars:
                    bar.close()
        return outcomes.results()


def _run_reporting(spec: RunSpec, index: int, queue: Any, resume: bool, overwrite: bool, threads: int) -> RunResult:
    """:func:`run_in_worker`, reporting its progress to the bars of the process that started it."""

    def report(steps: int, total: int, status: str) -> None:
        queue.put((index, steps, total, status))

    return run_in_worker(spec, resume, overwrite, threads, report if queue is not None else False)


def _show(queue: Any, bars: list[tqdm]) -> None:
    """Move each run's bar to the latest progress its process reported."""
    if queue is None:
        return
    while True:
        try:
            index, steps, total, status = queue.get_nowait()
        except Empty:
            return
        bar = bars[index]
        bar.total = total
        bar.update(steps - bar.n)
        if status:
            bar.set_postfix_str(status, refresh=False)


class RayCluster(Executor):
    """Ray tasks (one CPU each) on the cluster at ``address`` (``None``: a new local instance).

    Results are written by the workers to the shared ``--log-dir``; progress is reported as runs finish. The
    driver's working directory goes on the workers' ``PYTHONPATH``, so env packages like ``envs/`` import there.
    """

    def __init__(
        self, address: str | None = None, threads: int = 1, echo: Callable[[str], None] = print, workers: int = 1
    ) -> None:
        super().__init__(workers, threads, echo)
        self.address = address

    @classmethod
    def from_flags(cls, args: Any, runs: int) -> Executor:
        """``--ray-address`` (Ray schedules the runs on the cluster's CPUs: ``--workers`` does not apply)."""
        return cls(args.ray_address, args.threads)

    def run(self, specs: Sequence[RunSpec], resume: bool = True, overwrite: bool = False) -> list[RunResult]:
        if prerequisites(specs):
            raise ConfigError("the Ray backend runs independent runs: run a sequence's stages with --backend local")
        try:
            import ray
        except ImportError as error:
            raise ConfigError('the Ray backend needs Ray: pip install -e ".[ray]"') from error

        started_here = not ray.is_initialized()
        if started_here:
            python_path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)
            ray.init(
                address=self.address,
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": {"PYTHONPATH": python_path}},
            )
        try:
            task = ray.remote(num_cpus=1)(run_in_worker)
            pending = {task.remote(spec, resume, overwrite, self.threads): i for i, spec in enumerate(specs)}
            results: dict[int, RunResult] = {}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                i = pending.pop(done[0])
                results[i] = ray.get(done[0])
                self.echo(progress_line(len(results), len(specs), specs[i], results[i]))
            return [results[i] for i in range(len(specs))]
        finally:
            if started_here:
                ray.shutdown()


BACKENDS: dict[str, type[Executor]] = {"local": LocalProcesses, "ray": RayCluster}
"""``--backend``'s choices, each an executor class."""
