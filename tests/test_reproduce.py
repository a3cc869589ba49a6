"""The README check: today's summary table and sentence against the README's (no run here; the parsing and the
comparison, on tables the main job's own formatter writes)."""

from __future__ import annotations

import dataclasses

from eva_rl.experiments.finetune import summary_table
from eva_rl.experiments.reproduce import compare_tables, first_reaching, summary_rows
from eva_rl.experiments.runs import RunResult

RESULT = RunResult(
    task="MiniGrid-DoorKey", method="eva", seed=0, total_timesteps=51200, jumpstart=0.396, final_return=0.97,
    best_return=0.972, eval_curve=[[0, 0.396], [5120, 0.8], [10240, 0.93]], trainable_params=8288,
    total_params=176472, wall_seconds=120.0,
)  # fmt: skip


def test_the_summary_table_reads_back_and_a_changed_number_is_named() -> None:
    full = dataclasses.replace(RESULT, method="full", final_return=0.969, trainable_params=168184)
    printed = "[eva-rl] task ...\n\n" + summary_table([RESULT, full]) + "\n\nResults: ..."
    rows = summary_rows(printed)
    cells = [(r["method"], r["final"], r["trainable"]) for r in rows]
    assert cells == [("eva", "0.970", "8,288"), ("full", "0.969", "168,184")]
    assert compare_tables(rows, rows) == ([], [])
    slower = summary_rows(summary_table([RESULT, dataclasses.replace(full, wall_seconds=999.0)]))
    assert compare_tables(rows, slower) == ([], []), "wall time depends on the machine and is not compared"
    stale = summary_rows(summary_table([dataclasses.replace(RESULT, final_return=0.5), full]))
    assert compare_tables(stale, rows) == (["eva seed 0 final: README 0.500, today 0.970"], [])
    assert compare_tables([], rows) == (["the README has no summary table"], [])
    assert compare_tables(rows, rows[:1]) == (["full seed 0: in the README, not in today's output"], [])
    # another platform: the returns' last decimals move, within the tolerance; the parameter counts may not
    drifted = summary_rows(summary_table([dataclasses.replace(RESULT, final_return=0.954), full]))
    assert compare_tables(rows, drifted) == ([], ["eva seed 0 final: README 0.970, today 0.954"])
    bigger = summary_rows(summary_table([dataclasses.replace(RESULT, trainable_params=8289), full]))
    assert compare_tables(rows, bigger) == (["eva seed 0 trainable: README 8,288, today 8,289"], [])


def test_the_sample_efficiency_sentence_comes_from_the_curves() -> None:
    never = dataclasses.replace(RESULT, method="scratch", eval_curve=[[0, 0.0], [5120, 0.2]])
    assert first_reaching([RESULT, never]) == ("First evaluation at or above 0.9: eva at 10,240 steps, scratch never.")


def test_a_run_that_reports_success_adds_its_rates_at_step_0_and_at_the_end() -> None:
    succeeding = dataclasses.replace(RESULT, success_curve=[[0, 0.1], [5120, 0.5], [10240, 0.8]])
    table = summary_table([succeeding])
    assert table.splitlines()[0].split()[-2:] == ["success@0", "success"]
    assert table.splitlines()[-1].split()[-2:] == ["0.10", "0.80"]
    assert summary_rows(table)[0]["final"] == "0.970"
    assert "success" not in summary_table([RESULT])
