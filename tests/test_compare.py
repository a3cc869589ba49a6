"""The comparison harness end to end on the seconds-long smoke suite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eva_rl.compare import compare, run_specs, tune
from eva_rl.suites import load_suite
from eva_rl.tasks import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:EVA:UserWarning")


def test_local_sweep_writes_tables_and_plots_and_a_rerun_skips_completed_runs(tmp_path: Path) -> None:
    suite = load_suite("smoke")
    lines: list[str] = []
    report = compare(suite, tmp_path, workers=2, echo=lines.append)
    out = tmp_path / "smoke"
    assert len(lines) == 4 and all("final" in line for line in lines)
    for name in ("results.md", "results.json", "sample_efficiency.png", "final_return.png", "eva_ranks.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(report))
    rows = report["tasks"]["PointGoal"]["methods"]
    assert set(rows) == {"eva", "full"} and rows["eva"]["seeds"] == 2
    assert rows["eva"]["trainable_params"] < rows["full"]["trainable_params"]
    assert rows["eva"]["source_retention"] is not None
    assert "p_eva_better_final" in report["aggregate"]["full"]
    markdown = (out / "results.md").read_text()
    assert "## PointGoal (threshold 0.5)" in markdown and "| eva | 2 |" in markdown

    results = sorted(out.glob("PointGoal/*/seed*/result.json"))
    assert len(results) == 4
    stamps = {path: path.stat().st_mtime_ns for path in results}
    compare(suite, tmp_path, workers=1, echo=lines.append)
    assert {path: path.stat().st_mtime_ns for path in results} == stamps, "completed runs were not redone"


def test_specs_are_one_per_task_method_seed_with_method_settings(tmp_path: Path) -> None:
    suite = load_suite("smoke")
    suite.method_settings = {"eva": {"learning_rate": 3e-3, "alpha": 8.0}}
    specs = [spec for _, spec in run_specs(suite, tmp_path)]
    assert [(s.method, s.seed) for s in specs] == [("eva", 0), ("full", 0), ("eva", 1), ("full", 1)]
    eva, full = specs[0], specs[1]
    assert eva.task.ppo["learning_rate"] == 3e-3 and eva.task.lora.alpha == 8.0
    assert full.task.ppo["learning_rate"] == 1e-3
    assert eva.task.total_timesteps == 4096 and eva.run_dir == tmp_path / "smoke" / "PointGoal" / "eva" / "seed0"


def test_bad_suites_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown suite 'nope'; known suites: .*'smoke'"):
        load_suite("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [{task: PointGoal, threshold: 0.5}]\nmethod_settings: {eva: {lr: 1}}\n")
    with pytest.raises(ConfigError, match=r"method_settings\['eva'\]"):
        load_suite(str(bad))


def test_tuning_sweeps_every_method_alike_and_picks_by_auc(tmp_path: Path) -> None:
    suite = load_suite("smoke")
    chosen = tune(suite, tmp_path, workers=2, echo=lambda line: None)
    table = json.loads((tmp_path / "smoke-tuning" / "tuning.json").read_text())
    assert set(chosen) == {"eva", "full"}
    for method, point in chosen.items():
        scores = table["auc_iqm"][method]
        assert set(scores) == {"learning_rate0.001", "learning_rate0.003"}
        assert scores[f"learning_rate{point['learning_rate']:g}"] == max(scores.values())
    assert sorted(
        p.name for p in (tmp_path / "smoke-tuning" / "learning_rate0.003" / "smoke" / "PointGoal").iterdir()
    ) == [
        "eva",
        "full",
    ]


def test_ray_backend_runs_a_tiny_sweep_on_a_local_instance(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    suite = load_suite("smoke")
    lines: list[str] = []
    report = compare(suite, tmp_path, echo=lines.append, backend="ray")
    assert len(lines) == 4 and lines[-1].startswith("[4/4]")
    assert set(report["tasks"]["PointGoal"]["methods"]) == {"eva", "full"}
    assert len(sorted((tmp_path / "smoke").glob("PointGoal/*/seed*/result.json"))) == 4
