"""Typed records of what runs write: ``result.json``, ``eva.json`` and a suite's ``results.json`` read back as
records, and the files they write keep their fields, so readers of files written before the records still work."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from eva_rl import ConfigError, EvaReport
from eva_rl.experiments.run_folder import RunResult
from eva_rl.experiments.studies.suite import SuiteReport

ROOT = Path(__file__).resolve().parents[1]

# A result.json as finetune.py wrote it before the records (no eva_skipped_steps, no source_return).
OLD_RESULT = {
    "task": "MiniGrid-DoorKey",
    "method": "eva",
    "seed": 0,
    "total_timesteps": 30720,
    "jumpstart": 0.396,
    "final_return": 0.964,
    "best_return": 0.97,
    "eval_curve": [[0, 0.396], [15360, 0.9], [30720, 0.964]],
    "trainable_params": 8288,
    "total_params": 176472,
    "wall_seconds": 61.2,
    "eva_env_steps": 2040,
    "eva_seconds": 1.3,
}


def test_an_old_result_reads_and_writes_every_field_it_had() -> None:
    result = RunResult.from_dict(OLD_RESULT)
    assert result.eva_skipped_steps == 0 and result.source_return is None
    written = result.to_dict()
    assert {key: written[key] for key in OLD_RESULT} == OLD_RESULT
    assert RunResult.from_dict(written) == result
    steps, returns = result.sample_curve()
    # EVA's 2040 own env steps shift the curve; the pretrained policy acting while they were collected leads it
    assert list(steps) == [0, 2040, 15360 + 2040, 30720 + 2040] and list(returns) == [0.396, 0.396, 0.9, 0.964]
    assert result.budget == 30720
    # at the budget: between (17400, 0.9) and (32760, 0.964), 13320 of the 15360 steps along
    assert result.budget_return == pytest.approx(0.9 + 0.064 * 13320 / 15360)
    assert dataclasses.replace(result, eva_env_steps=0).budget_return == result.final_return


def test_a_result_missing_a_field_every_result_has_is_an_error() -> None:
    with pytest.raises(ConfigError, match="not a run result"):
        RunResult.from_dict({k: v for k, v in OLD_RESULT.items() if k != "final_return"})


def test_an_eva_report_round_trips_and_old_reports_get_defaults() -> None:
    old = {"ranks": {"a": 2, "b": 0}, "captured_variance": {"a": 0.9, "b": 0.0}, "batches_used": 3, "env_steps": 768,
           "seconds": 0.5}  # fmt: skip
    report = EvaReport.from_dict(old)
    assert report.ranks == {"a": 2, "b": 0} and report.skipped_steps == 0 and report.data_source == "rollouts"
    assert EvaReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report
    with pytest.raises(ConfigError, match="not an EVA report"):
        EvaReport.from_dict({"batches_used": 3})


def test_suite_results_written_before_the_records_read_back_unchanged() -> None:
    """The DoorKey suite's results.json as committed before the records (a copy in tests/fixtures): it must read and
    write back the same."""
    saved = json.loads((ROOT / "tests" / "fixtures" / "suite_results_before_records.json").read_text())
    report = SuiteReport.from_dict(saved)
    assert report.tasks["MiniGrid-DoorKey"].methods["eva"].seeds == 10
    assert (
        report.aggregate["full"].p_reference_better is not None and report.aggregate["eva"].p_reference_better is None
    )
    written = report.to_dict()
    assert written.pop("reference") == "eva"
    assert json.loads(json.dumps(written)) == saved


@pytest.mark.parametrize(
    "suite",
    ["doorkey", "pendulum", "mujoco", "mujoco-eva-rate", "pendulum-protocol", "pendulum-at-eva-rate", "doorkey-1m"],
)
def test_the_committed_suite_results_read_back_unchanged(suite: str) -> None:
    saved = json.loads((ROOT / "docs" / "results" / suite / "results.json").read_text())
    report = SuiteReport.from_dict(saved)
    assert report.tasks and report.aggregate
    assert json.loads(json.dumps(report.to_dict())) == saved
