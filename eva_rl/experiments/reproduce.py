"""The README's main-job figures against what the command prints today (``scripts/check_readme.py``).

The README shows the table the main job printed and a sentence on when each method first reached 0.9; both are
regenerated here from a fresh run (or the completed runs of a ``--log-dir``) and compared, so a stale number fails.

Runs are deterministic on one platform, but the returns move in their second or third decimal with the torch build
and the CPU (the README says where its figures were made). A return within :data:`RETURN_TOLERANCE` of the
README's is reported as drift, not as a difference; so is the sentence, when the table drifted: the first
evaluation above 0.9 moves with it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from eva_rl.experiments.run_folder import RunFolder, RunResult
from eva_rl.experiments.tasks import ROOT

MAIN_JOB = ["scripts/finetune.py", "--env", "MiniGrid-DoorKey"]
"""The README's main job, as it is typed there."""
COMPARED = ("method", "seed", "jumpstart", "final", "best", "trainable", "total")
"""The summary table's columns that must match (wall time depends on the machine)."""
RETURNS = ("jumpstart", "final", "best")
"""Columns that may drift across platforms, within :data:`RETURN_TOLERANCE`."""
RETURN_TOLERANCE = 0.03
"""The largest return drift across platforms taken as drift: the README's 0.959/0.959 read 0.954/0.965 on an AMD
EPYC with the same torch build; a stale figure (another budget, agent or learning rate) moves by more."""


def summary_rows(text: str) -> list[dict[str, str]]:
    """The rows of the first summary table (``method seed jumpstart ...``) in ``text``, as ``{column: cell}``."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        columns = re.split(r"\s{1,}", line.strip().replace("wall s", "wall_s"))
        if columns[: len(COMPARED)] == list(COMPARED):
            rows = []
            for row in lines[i + 2 :]:
                cells = row.split()
                if len(cells) != len(columns):
                    break
                rows.append(dict(zip(columns, cells)))
            return rows
    return []


def first_reaching(results: Sequence[RunResult], threshold: float = 0.9) -> str:
    """The README's sentence on sample efficiency: each method's first evaluation at or above ``threshold``."""
    parts = []
    for result in results:
        step = next((int(s) for s, value in result.eval_curve if value >= threshold), None)
        parts.append(f"{result.method} {'never' if step is None else f'at {step:,} steps'}")
    return f"First evaluation at or above {threshold}: {', '.join(parts)}."


def compare_tables(expected: list[dict[str, str]], got: list[dict[str, str]]) -> tuple[list[str], list[str]]:
    """One line per row or cell of the README's table that differs from today's: differences, and drift (a return
    within :data:`RETURN_TOLERANCE`)."""
    if not expected:
        return ["the README has no summary table"], []
    problems, drift = [], []
    keyed = {(row["method"], row["seed"]): row for row in got}
    for row in expected:
        today = keyed.get((row["method"], row["seed"]))
        if today is None:
            problems.append(f"{row['method']} seed {row['seed']}: in the README, not in today's output")
            continue
        for column in COMPARED:
            if row[column] == today[column]:
                continue
            line = f"{row['method']} seed {row['seed']} {column}: README {row[column]}, today {today[column]}"
            near = column in RETURNS and abs(float(row[column]) - float(today[column])) <= RETURN_TOLERANCE
            (drift if near else problems).append(line)
    return problems, drift


def check_readme(readme: Path, log_dir: Path) -> tuple[list[str], list[str], str]:
    """Run the main job into ``log_dir`` (completed runs are reused) and compare with ``readme``.

    :return: The differences (none: the README is current), the drift, and the job's output.
    """
    done = subprocess.run(
        [sys.executable, *MAIN_JOB, "--log-dir", str(log_dir), "--no-progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return [f"the main job failed ({done.returncode}): {done.stderr.strip()[-500:]}"], [], done.stdout
    text = readme.read_text()
    problems, drift = compare_tables(summary_rows(text), summary_rows(done.stdout))
    board = log_dir / "MiniGrid-DoorKey"
    folders = [RunFolder(path) for path in sorted(board.glob("*/seed*"))]
    results = [folder.read_result() for folder in folders if folder.is_complete]
    order = {row["method"]: i for i, row in enumerate(summary_rows(done.stdout))}
    sentence = first_reaching(sorted(results, key=lambda r: order.get(r.method, len(order))))
    if sentence not in " ".join(text.split()):  # the README wraps its lines
        (drift if drift else problems).append(f"the README does not say, as today's run does: {sentence}")
    return problems, drift, done.stdout
