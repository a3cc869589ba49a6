"""The continual benchmark end to end on the seconds-long smoke sequence: banks that reproduce each stage's own
fine-tuned return, one network trained in turn, and the metrics computed from them."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from eva_rl.bank import AdapterBank
from eva_rl.errors import EvaRLError
from eva_rl.experiments.cli import main
from eva_rl.experiments.execute import LocalProcesses
from eva_rl.experiments.sequences import load_sequence
from eva_rl.experiments.stats import normalized_auc
from eva_rl.experiments.studies.base import conduct
from eva_rl.experiments.studies.continual import ContinualStudy, continual_world_transfer
from eva_rl.experiments.tasks import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:EVA:UserWarning")


def run_sequence(sequence, log_dir: Path, workers: int = 1, echo=print) -> dict:
    """What ``eva-rl continual`` does: the continual study, carried out by local processes."""
    return conduct(ContinualStudy(sequence, log_dir, echo=echo), LocalProcesses(workers, echo=echo))


PUBLISHED = {
    "source": "a paper, Tab. 2",
    "statistic": "CW20",
    "setting": "SAC",
    "approaches": {"PackNet": {"average_success": 0.8, "forgetting": 0.0, "forward_transfer": 0.18},
                   "A-GEM": {"average_success": 0.45}},
}  # fmt: skip


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[ContinualStudy, dict]:
    root = tmp_path_factory.mktemp("continual")
    sequence = load_sequence("smoke")  # at a sixteenth of its budget: the banks, not what they learn, are tested here
    stages = [dataclasses.replace(stage, total_timesteps=1024) for stage in sequence.stages]
    sequence = dataclasses.replace(sequence, stages=stages, seeds=[0], eval_episodes=4)
    report = run_sequence(sequence, root, workers=2, echo=SMOKE_LINES.append)
    return ContinualStudy(sequence, root), report


SMOKE_LINES: list[str] = []
"""What the smoke sequence printed."""


def test_a_page_says_which_runs_it_shares_with_a_suite(smoke) -> None:
    from eva_rl.experiments.studies.continual import continual_markdown

    plan, report = smoke
    note = "3 of the 9 runs from the base are suite `s`'s, the same runs made once for both pages."
    page = continual_markdown(plan.sequence, report, sharing=note)
    assert page.index(note) < page.index("| approach |")  # above the table it qualifies
    assert "runs from the base are suite" not in continual_markdown(plan.sequence, report)


def _final(run_dir: Path) -> float:
    return json.loads((run_dir / "result.json").read_text())["final_return"]


def test_banks_give_each_stage_its_own_fine_tuned_return(smoke) -> None:
    plan, report = smoke
    for method in plan.sequence.methods:
        folder = plan.bank_dir(method, 0)
        returns = json.loads((folder / "returns.json").read_text())
        for stage in plan.sequence.stages:
            # evaluated through the bank, with the protocol of the run's own evaluations: identical outputs
            assert returns[stage.name] == _final(plan.from_base(stage, method, 0).run_dir)
        bank = AdapterBank.load(folder, device="cpu")
        assert list(bank.tasks) == [s.name for s in plan.sequence.stages]
        adapters = sum(task.nbytes for task in bank.tasks.values())
        assert report[method].memory_bytes == bank.base_nbytes() + adapters
        assert report[method].forgetting.estimate == 0.0
        expected = np.mean([returns[s.name] for s in plan.sequence.stages])
        assert report[method].average_final.estimate == pytest.approx(expected)
    full = report["full-copies"]
    assert full.memory_bytes == len(plan.sequence.stages) * report["full-seq"].memory_bytes
    assert full.forward_transfer.estimate == 0.0  # the reference itself


def test_the_sequential_network_is_evaluated_on_every_task_after_every_stage(smoke) -> None:
    plan, report = smoke
    stages = plan.sequence.stages
    rows = []
    for index, stage in enumerate(stages):
        spec = plan.sequential(index, 0)
        # each stage starts from the previous stage's model; the first is the full copy's own run
        expected_agent = plan.base.agent_path if index == 0 else plan.sequential(index - 1, 0).run_dir / "model.zip"
        assert spec.agent_path == expected_agent
        row = json.loads((spec.run_dir / "returns_on_every_task.json").read_text())
        assert row[stage.name] == _final(spec.run_dir)
        rows.append(row)
    jumpstarts = {s.name: json.loads((plan.from_base(s, "full", 0).run_dir / "result.json").read_text())["jumpstart"]
                  for s in stages}  # fmt: skip
    matrix = [jumpstarts, *rows]
    stats = report["full-seq"]
    assert stats.returns == matrix
    drops = [max(row[s.name] for row in matrix[i + 1 :]) - matrix[-1][s.name] for i, s in enumerate(stages)]
    assert stats.forgetting.estimate == pytest.approx(np.mean(drops))
    assert stats.forgetting_per_task == pytest.approx({s.name: d for s, d in zip(stages, drops)})
    assert stats.average_final.estimate == pytest.approx(np.mean([rows[-1][s.name] for s in stages]))


def test_outputs_and_the_bank_command(smoke, capsys) -> None:
    plan, _ = smoke
    for name in ("continual.md", "continual.json", "continual.png"):
        assert (plan.root / name).is_file(), name
    markdown = (plan.root / "continual.md").read_text()
    assert "| full-seq |" in markdown and "goal-a (1,024) -> goal-b (1,024) -> goal-c" in markdown
    assert "stratified-bootstrap CIs (50,000 resamples)" in markdown  # rliable's, as the suites' pages
    assert main(["inspect", str(plan.bank_dir("eva", 0)), "--evaluate"]) == 0
    out = capsys.readouterr().out
    returns = json.loads((plan.bank_dir("eva", 0) / "returns.json").read_text())
    for stage in plan.sequence.stages:
        line = next(row for row in out.splitlines() if row.startswith(stage.name))
        assert line.split()[1] == "eva" and float(line.split()[-1]) == pytest.approx(returns[stage.name], abs=5e-4)
    assert "networks' worth where one full copy per task would hold 3" in out
    selection = json.loads((plan.root / "selection.json").read_text())
    assert set(selection["accuracy"]) == {"16", "64", "256"}
    assert all(len(picks) == 3 * plan.sequence.selection_trials for picks in selection["picks"].values())
    for n, picks in selection["picks"].items():
        assert selection["accuracy"][n] == sum(p["stage"] == p["picked"] for p in picks) / len(picks)
    bank = AdapterBank.load(plan.bank_dir("lora", 0), device="cpu")
    assert all(task.signature is not None for task in bank.tasks.values())
    assert "Picking the adapter for an unlabelled env" in markdown
    # the evaluations after the runs say what is coming
    stages = len(plan.sequence.stages)
    expected = (
        f"{stages} sequential stage run(s) on all {stages} tasks (4 episodes each): {stages * stages} evaluations"
    )
    assert any(line.endswith(expected) for line in SMOKE_LINES)


def test_a_clone_of_the_results_regenerates_the_page_without_training(smoke, tmp_path: Path) -> None:
    """What git keeps of ``--log-dir docs/results`` (this repository's .gitignore decides) is enough to rewrite
    continual.md and continual.json: no run trains again, no model of the sequential chain is needed."""
    plan, _ = smoke
    clone = plan.root.parent.parent / f"{plan.root.parent.name}-clone"  # the same depth: banks name the base relatively
    shutil.copytree(plan.root.parent, clone)
    files = sorted(path for path in clone.rglob("*") if path.is_file())
    as_committed = "\n".join(f"docs/results/{path.relative_to(clone)}" for path in files)
    check = ["git", "check-ignore", "--no-index", "--stdin"]
    ignored = subprocess.run(check, input=as_committed, capture_output=True, text=True, check=False).stdout.split()
    assert ignored and len(ignored) < len(files)
    for name in ignored:
        (clone / Path(name).relative_to("docs/results")).unlink()
    assert not list(clone.rglob("model.zip")) and not list(clone.rglob("*.tfevents*"))
    (clone / plan.sequence.name / "continual.json").unlink()
    run_sequence(plan.sequence, clone, workers=1, echo=lambda line: None)
    assert not list(clone.rglob("model.zip")) and not list(clone.rglob("*.tfevents*"))  # nothing trained
    for name in ("continual.json", "continual.md"):
        assert (clone / plan.sequence.name / name).read_text() == (plan.root / name).read_text(), name


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stages": [{"env": "PointGoal-v0", "total_timesteps": 10}]}, "at least two stages"),
        ({"methods": ["full"]}, "methods=['full'] is invalid"),
        ({"seeds": 0}, "seeds=0 is invalid"),
        ({"resamples": "many"}, "resamples='many' is invalid"),
        ({"eval_freq": 0}, "eval_freq=0 is invalid"),
        ({"stages": [{"env": "PointGoal-v0", "total_timesteps": 0}] * 2}, "total_timesteps=0 is invalid"),
        ({"stages": [{"env": "PointGoal-v0", "total_timesteps": 10}] * 2}, "PointGoal is listed twice"),
        ({"stages": [{"env": "PointGoal-v0", "total_timesteps": 10, "goal": 1}] * 2}, "unknown key(s) ['goal']"),
        (
            {"published": {**PUBLISHED, "approaches": {"PackNet": {"success": 0.8}}}},
            "approaches['PackNet']={'success': 0.8} is invalid: expected {metric: number} with metrics out of",
        ),
        ({"published": {**PUBLISHED, "approaches": {"PackNet": {"forgetting": None}}}}, "forgetting=None is invalid"),
        ({"suite": 3}, "suite=3 is invalid: expected a suite's name in configs/suites/ or a path"),
    ],
)
def test_bad_sequences_are_one_line_errors(change: dict, message: str, tmp_path: Path) -> None:
    import yaml

    data = {"name": "bad", "base_task": "PointGoal", **yaml.safe_load(Path("configs/sequences/smoke.yaml").read_text())}
    data.update(change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as error:
        load_sequence(str(path))
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"env": "PointGoal-v9", "total_timesteps": 1024}, "unknown env 'PointGoal-v9'"),
        ({"env": "PointGoal-v0", "total_timesteps": 100}, "total_timesteps=100 is below one rollout"),
    ],
)
def test_a_stage_that_cannot_run_stops_the_sequence_before_its_first_run(stage: dict, message: str, tmp_path) -> None:
    """The last stage is wrong: nothing of the stages before it may run first."""
    sequence = load_sequence("smoke")
    last = dataclasses.replace(sequence.stages[-1], env=stage["env"], total_timesteps=stage["total_timesteps"])
    sequence = dataclasses.replace(sequence, stages=[*sequence.stages[:-1], last])
    with pytest.raises(EvaRLError, match=re.escape(message)):
        run_sequence(sequence, tmp_path, echo=lambda line: None)
    assert not list(tmp_path.rglob("result.json")) and not list(tmp_path.rglob("events.out.tfevents*"))


def test_a_sequences_eval_freq_holds_in_every_stage_within_its_budget(tmp_path: Path) -> None:
    sequence = dataclasses.replace(load_sequence("smoke"), eval_freq=4096)
    study = ContinualStudy(sequence, tmp_path)
    assert {study.stage_task(stage, method).eval.freq for stage in sequence.stages for method in ("eva", "full")} == {
        4096
    }
    short = dataclasses.replace(sequence.stages[0], total_timesteps=1024)
    assert study.stage_task(short, "eva").eval.freq == 1024
    unset = ContinualStudy(dataclasses.replace(sequence, eval_freq=None), tmp_path)
    assert unset.stage_task(sequence.stages[0], "eva").eval.freq == unset.base.eval.freq == 5000


def test_seeds_on_the_command_line_narrow_the_sequence_to_them(tmp_path: Path, monkeypatch) -> None:
    """``eva-rl continual --seeds 1``: every run of the plan (from the base and sequential) and the page are seed 1's
    alone, so one seed's banks and sequential network complete before the next starts."""
    import eva_rl.experiments.studies.base as base

    conducted = []
    monkeypatch.setattr(base, "conduct", lambda study, executor, overwrite=False: conducted.append(study))
    assert main(["continual", "--sequence", "smoke", "--seeds", "1", "1", "--log-dir", str(tmp_path)]) == 0
    (study,) = conducted
    assert study.sequence.seed_list == [1] and load_sequence("smoke").seed_list == [0, 1]
    assert {spec.seed for _, spec in study.plan()} == {1}
    assert study.sequential(1, 1).seed == 1


def test_continual_world_transfer_normalizes_by_what_scratch_left_to_learn() -> None:
    # (0.8 - 0.5) / 0.5 = 0.6 and (0.2 - 0.6) / 0.4 = -1.0; a task scratch solves throughout counts 0
    assert continual_world_transfer([0.8, 0.2, 0.9], [0.5, 0.6, 1.0]) == pytest.approx((0.6 - 1.0 + 0.0) / 3)


def test_a_success_scored_sequence_reports_continual_worlds_metrics(tmp_path: Path) -> None:
    sequence = load_sequence("smoke")
    stages = [dataclasses.replace(stage, total_timesteps=512) for stage in sequence.stages[:2]]
    sequence = dataclasses.replace(
        sequence, stages=stages, seeds=[0], eval_episodes=4, eval_freq=256, score="success", continual_world=True,
        method_settings={**sequence.method_settings, "scratch": {"learning_rate": 1.0e-2}}, published=PUBLISHED,
    )  # fmt: skip
    report = run_sequence(sequence, tmp_path, echo=lambda line: None)
    study = ContinualStudy(sequence, tmp_path)
    scratch = [study.from_base(stage, "scratch", 0) for stage in stages]
    assert all(spec.folder.is_complete for spec in scratch), "the single-task reference runs from scratch"
    for method in sequence.methods:
        success = json.loads((study.bank_dir(method, 0) / "success.json").read_text())
        finals = [study.from_base(s, method, 0).folder.read_result().success_curve[-1][1] for s in stages]
        assert [success[s.name] for s in stages] == finals  # the bank reproduces each stage's success rate
        stats = report[method]
        assert stats.cw_forgetting.estimate == 0.0  # a bank forgets nothing
        assert 0.0 <= stats.average_final.estimate <= 1.0 and stats.cw_forward_transfer is not None
    sequential = report["full-seq"]
    matrix = sequential.returns  # one seed: the means are that seed's rows
    expected = np.mean([matrix[i + 1][s.name] - matrix[-1][s.name] for i, s in enumerate(stages)])
    assert sequential.cw_forgetting.estimate == pytest.approx(expected)
    # the sequential stages' transfer from their success curves too, not their returns (CW10's full-seq read 503)
    stage_runs = [study.sequential(i, 0).folder.read_result() for i in range(len(stages))]
    own = [normalized_auc(*run.scored("success").sample_curve(), horizon=512) for run in stage_runs]
    reference = [normalized_auc(*s.folder.read_result().scored("success").sample_curve(), horizon=512) for s in scratch]
    assert sequential.cw_forward_transfer.estimate == pytest.approx(continual_world_transfer(own, reference))
    assert -1.0 <= sequential.forward_transfer.estimate <= 1.0
    page = (tmp_path / sequence.name / "continual.md").read_text()
    assert "average success after the sequence" in page and "CW forward transfer (vs scratch)" in page
    assert "IQM over 1 seed with" in page
    saved = json.loads((tmp_path / sequence.name / "continual.json").read_text())
    assert "cw_forgetting" in saved["approaches"]["eva"]
    # the published anchors under the page's own table, a metric a paper did not give as a dash
    assert "| approach | average success | forgetting | forward transfer |" in page
    assert "| PackNet | 0.80 | 0.00 | 0.18 |" in page and "| A-GEM | 0.45 | - | - |" in page
    assert "Published: CW20 (a paper, Tab. 2)." in page and "The settings differ: SAC" in page
    assert saved["published"]["approaches"]["PackNet"] == PUBLISHED["approaches"]["PackNet"]

    class Recording(LocalProcesses):
        def map(self, function, jobs, packages=()):
            mapped.extend(jobs)
            return super().map(function, jobs, packages)

    mapped: list[tuple] = []
    study.carry_out(Recording())
    assert mapped == [], "every sequential stage's row of success rates is cached: nothing to evaluate again"


def test_continual_worlds_metrics_need_success_scores() -> None:
    sequence = load_sequence("smoke")
    with pytest.raises(ConfigError, match="continual_world=true is invalid with score='return'"):
        dataclasses.replace(sequence, continual_world=True)


def _suite_and_sequence(tmp_path: Path, sequence_rate: float | None = None) -> ContinualStudy:
    """A suite on PointGoal (PointGoal-Shifted-v0) and a sequence whose first stage is that env with the same budget
    and evaluation: the first stage's runs are the suite's, the second stage's (another goal) the sequence's own."""
    import yaml

    from eva_rl.experiments.sequences import ContinualSequence, Stage

    suite = {
        "name": "shared-suite",
        "tasks": [{"task": "PointGoal", "threshold": 0.5, "total_timesteps": 4096, "eval_freq": 2048}],
        "methods": ["eva", "lora", "full", "scratch"],
        "seeds": [0, 1],
        "eval_episodes": 8,
        "method_settings": {"eva": {"learning_rate": 3.0e-3}, "full": {"learning_rate": 1.0e-2}},
    }
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    stages = [
        Stage(env="PointGoal-Shifted-v0", name="shifted", total_timesteps=4096),
        Stage(env="PointGoal-v0", name="other", total_timesteps=4096, env_kwargs={"goal": [0.7, 0.3]}),
    ]
    own = {"eva": {"learning_rate": sequence_rate}} if sequence_rate else {}
    sequence = ContinualSequence(
        "shared", "PointGoal", stages, seeds=[0, 1, 2], eval_episodes=8, eval_freq=2048, method_settings=own,
        suite=str(tmp_path / "suite.yaml"),
    )  # fmt: skip
    return ContinualStudy(sequence, tmp_path / "runs")


def test_a_sequence_shares_the_runs_of_its_suite_that_are_the_same_run(tmp_path: Path) -> None:
    study = _suite_and_sequence(tmp_path)
    suite_dir = tmp_path / "runs" / "shared-suite"
    planned = dict(study.plan())
    shared = {key for key, spec in planned.items() if spec.log_dir == suite_dir}
    assert study.shared == shared
    # the first stage's runs of the suite's seeds; seed 2 (not the suite's) and the other goal are the sequence's
    assert shared == {("shifted", method, seed) for method in ("eva", "lora", "full") for seed in (0, 1)}
    assert all(spec.log_dir == study.root for key, spec in planned.items() if key not in shared)
    # the suite's tuned rates apply to the sequence's own runs too (lora has none: the task's)
    rates = {m: planned[("other", m, 2)].task.ppo["learning_rate"] for m in ("eva", "lora", "full")}
    assert rates == {"eva": 3.0e-3, "lora": 1.0e-3, "full": 1.0e-2}
    # the sequential network starts from the suite's run of full fine-tuning
    assert study.sequential(0, 0).folder.path == planned[("shifted", "full", 0)].folder.path
    assert study.sequential(1, 0).agent_path == planned[("shifted", "full", 0)].folder.model_file
    # the console says how many; the runs from the base go to the executor as planned
    lines: list[str] = []
    ran: list = []

    class Recording(LocalProcesses):
        def run(self, specs, overwrite=False):
            ran.extend(specs)

    study.echo = lines.append
    study.sequence.sequential = False  # its later stages start from models these runs would make
    study.carry_out(Recording())
    assert [spec.folder.path for spec in ran] == [spec.folder.path for spec in planned.values()]
    assert lines == [study.sharing_note()]
    assert study.sharing_note().startswith("6 of the 18 runs from the base are suite `shared-suite`'s")
    assert ContinualStudy(load_sequence("smoke"), tmp_path).sharing_note() == ""


def test_a_sequence_makes_its_own_run_where_its_settings_differ_from_its_suites(tmp_path: Path) -> None:
    study = _suite_and_sequence(tmp_path, sequence_rate=1.0e-2)
    planned = dict(study.plan())
    suite_dir = tmp_path / "runs" / "shared-suite"
    assert planned[("shifted", "eva", 0)].log_dir == study.root  # eva's rate is the sequence's own here
    assert planned[("shifted", "lora", 0)].log_dir == suite_dir and planned[("shifted", "full", 0)].log_dir == suite_dir


@pytest.mark.parametrize("name", ["RETURNS_ON_EVERY_TASK", "SUCCESS_ON_EVERY_TASK"])
def test_git_keeps_what_each_sequential_stage_scored_on_every_task(name: str) -> None:
    """A clone of the results regenerates a sequence's page from these files (the stages' models are not kept), for a
    sequence scored by return and one scored by success rate alike."""
    from eva_rl.experiments.run_folder import RunFolder

    kept = f"docs/results/cw10/sequential/push/full/seed0/{getattr(RunFolder, name)}"
    dropped = "docs/results/cw10/sequential/push/full/seed0/model.zip"
    check = ["git", "check-ignore", "--no-index", "--stdin"]
    ignored = subprocess.run(check, input=f"{kept}\n{dropped}", capture_output=True, text=True, check=False).stdout
    assert ignored.split() == [dropped]


def test_git_keeps_the_adapters_the_cw10_banks_are_built_from() -> None:
    """The cw10 sequence's banks take the eva and lora adapters of the cw10 suite's runs: kept in git, a bank is built
    on a machine other than the one that trained its first tasks; other methods' adapters and models stay out, and so
    do the copies of those adapters a bank holds (rebuilt from the runs')."""
    run = "docs/results/cw10/MetaWorld-push/{}/seed0/{}"
    bank = "docs/results/cw10/banks/eva/seed0/{}"
    kept = [run.format(method, "adapter/adapter.safetensors") for method in ("eva", "lora")]
    kept += [bank.format("bank.json"), bank.format("success.json")]
    dropped = [run.format("eva+dora", "adapter/adapter.safetensors"), run.format("eva", "model.zip")]
    dropped += [bank.format("adapters/push.safetensors"), bank.format("signatures/push.safetensors")]
    check = ["git", "check-ignore", "--no-index", "--stdin"]
    paths = "\n".join(kept + dropped)
    ignored = subprocess.run(check, input=paths, capture_output=True, text=True, check=False).stdout
    assert ignored.split() == dropped
