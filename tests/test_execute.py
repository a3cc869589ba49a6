"""The executors' scheduling: a run that starts from another run's model waits for it, the longest chain of waiting
runs starts first, and a failed run fails the runs waiting on it without attempting them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import eva_rl.experiments.execute as execute
from eva_rl.errors import ConfigError
from eva_rl.experiments.execute import LocalProcesses, PrerequisiteFailed, RayCluster, prerequisites
from eva_rl.experiments.run_folder import RunResult
from eva_rl.experiments.suites import load_suite


def _specs(tmp_path: Path) -> dict:
    """Two independent runs and a chain of three (``c2`` starts from ``c1``'s model, ``c3`` from ``c2``'s), listed
    with the chain's end first."""
    suite = load_suite("smoke")
    a, b, c1, d = [spec for _, spec in suite.run_specs(tmp_path)]
    e = dataclasses.replace(d, seed=9)
    c2 = dataclasses.replace(d, agent_path=c1.folder.model_file)
    c3 = dataclasses.replace(e, agent_path=c2.folder.model_file)
    return {"a": a, "b": b, "c3": c3, "c2": c2, "c1": c1}


def _fake_runs(monkeypatch, specs: dict, fails: str | None = None) -> list[str]:
    """Replace the run itself: record which run was made, in order; ``fails`` raises."""
    names = {id(spec): name for name, spec in specs.items()}
    made: list[str] = []

    def run_in_worker(spec, resume=True, overwrite=False, threads=1, progress=False) -> RunResult:
        made.append(names[id(spec)])
        if names[id(spec)] == fails:
            raise RuntimeError(f"{fails} broke")
        curve = [[0, 0.5], [4096, 0.5]]
        return RunResult(spec.task.name, spec.method, spec.seed, 4096, 0.5, 0.5, 0.5, curve, 1, 1, 1.0)

    monkeypatch.setattr(execute, "run_in_worker", run_in_worker)
    return made


def test_prerequisites_are_the_runs_whose_model_another_run_starts_from(tmp_path: Path) -> None:
    specs = list(_specs(tmp_path).values())  # a, b, c3, c2, c1
    assert prerequisites(specs) == {2: 3, 3: 4}
    assert prerequisites(specs[:2]) == {}


def test_a_chain_starts_first_and_each_stage_after_the_one_it_starts_from(tmp_path: Path, monkeypatch) -> None:
    specs = _specs(tmp_path)
    made = _fake_runs(monkeypatch, specs)
    lines: list[str] = []
    results = LocalProcesses(1, echo=lines.append).run(list(specs.values()))
    # c1 heads the longest chain, c2 then leads what is ready; the rest in the order given
    assert made == ["c1", "c2", "a", "b", "c3"]
    assert [r.task for r in results] == [s.task.name for s in specs.values()] and len(lines) == 5
    # a stage's line names the run it started from, apart from a run of the same task from the pretrained agent
    c1, c2 = specs["c1"], specs["c2"]
    assert lines[1].startswith(f"[2/5] {c2.task.name} {c2.method} seed{c2.seed} after {c1.task.name}: final 0.500")
    assert " after " not in lines[0] + lines[2]


def test_a_failed_run_fails_the_runs_that_start_from_it_unattempted(tmp_path: Path, monkeypatch) -> None:
    specs = _specs(tmp_path)
    made = _fake_runs(monkeypatch, specs, fails="c1")
    lines: list[str] = []
    with pytest.raises(RuntimeError, match="c1 broke"):  # the first error, once every run has ended
        LocalProcesses(1, echo=lines.append).run(list(specs.values()))
    assert made == ["c1", "a", "b"]
    assert sum(line.endswith(": failed (RuntimeError: c1 broke)") for line in lines) == 1
    assert sum(": failed (PrerequisiteFailed: " in line for line in lines) == 2
    assert "3 of 5 runs failed" in lines[-1]

    outcomes = []
    monkeypatch.setattr(execute._Outcomes, "results", lambda self: outcomes.extend(self.failures) or [])
    LocalProcesses(1, echo=lambda line: None).run(list(specs.values()))
    assert [type(error) for error in outcomes] == [RuntimeError, PrerequisiteFailed, PrerequisiteFailed]
    c1, c2 = specs["c1"].run_dir, specs["c2"].run_dir
    assert str(outcomes[1]) == f"{c2} was not run: the run it starts from, {c1}, failed"


def test_runs_that_start_from_each_others_models_are_refused(tmp_path: Path, monkeypatch) -> None:
    specs = _specs(tmp_path)
    loop = dataclasses.replace(specs["c1"], agent_path=specs["c3"].folder.model_file)
    made = _fake_runs(monkeypatch, specs)
    with pytest.raises(ConfigError, match="from its own model"):
        LocalProcesses(1).run([specs["c3"], specs["c2"], loop])
    assert made == []


def test_the_ray_backend_refuses_runs_that_wait_on_others(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--backend local"):  # before Ray is imported or started
        RayCluster().run(list(_specs(tmp_path).values()))
