"""Runs side by side: one process per run (up to ``workers`` at a time), one progress bar each in this process.

Each run is deterministic on its own (its seed, one torch thread), so running methods side by side gives the numbers
running them one after the other gives, in less wall time on a machine with several cores.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from queue import Empty
from typing import Any

from tqdm.auto import tqdm

from eva_rl.experiments.runs import RunResult, RunSpec, run


def run_side_by_side(
    specs: Sequence[RunSpec],
    workers: int,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    threads: int = 1,
) -> list[RunResult]:
    """Run ``specs`` in up to ``workers`` processes (one runs them here, one after the other).

    :param threads: torch CPU threads per run.
    :return: The results, in the order of ``specs``.
    :raises EvaRLError: the first error a run raised (the runs in progress finish first).
    """
    if workers <= 1 or len(specs) <= 1:
        return [run(spec, progress=progress, resume=resume, overwrite=overwrite) for spec in specs]
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        queue = manager.Queue() if progress else None
        bars = [
            tqdm(
                total=spec.task.total_timesteps,
                desc=f"{spec.method} seed{spec.seed}",
                position=i,
                unit="step",
                disable=not progress,
                mininterval=0.5,
            )
            for i, spec in enumerate(specs)
        ]
        try:
            with ProcessPoolExecutor(max_workers=min(workers, len(specs)), mp_context=context) as pool:
                futures = {
                    pool.submit(_run_in_worker, spec, i, queue, resume, overwrite, threads): i
                    for i, spec in enumerate(specs)
                }
                pending: set[Future] = set(futures)
                while pending:
                    done, pending = wait(pending, timeout=0.25, return_when=FIRST_EXCEPTION)
                    _show(queue, bars)
                    for future in done:
                        if future.exception() is not None:
                            pool.shutdown(wait=True, cancel_futures=True)
                            raise future.exception()
                results = {futures[future]: future.result() for future in futures}
            _show(queue, bars)
        finally:
            for bar in bars:
                bar.close()
    return [results[i] for i in range(len(specs))]


def _run_in_worker(spec: RunSpec, index: int, queue: Any, resume: bool, overwrite: bool, threads: int) -> RunResult:
    import torch

    from eva_rl.experiments.environments import import_packages
    from eva_rl.experiments.training import one_line_warnings

    torch.set_num_threads(threads)
    one_line_warnings()
    import_packages(spec.task.env_packages)

    def report(steps: int, total: int, status: str) -> None:
        queue.put((index, steps, total, status))

    return run(spec, progress=report if queue is not None else False, resume=resume, overwrite=overwrite)


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
