"""One run's life cycle: envs are closed however it ends, and a completed run is read back as its record."""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from eva_rl import ConfigError
from eva_rl.experiments import environments, runs
from eva_rl.experiments.environments import import_packages
from eva_rl.experiments.tasks import EvalSettings, TaskConfig, find_task

pytestmark = pytest.mark.filterwarnings("ignore:EVA:UserWarning")


@pytest.fixture
def closed_envs(monkeypatch: pytest.MonkeyPatch) -> list[list[bool]]:
    """Every VecEnv a run makes, as a one-element list that turns True when it is closed."""
    made: list[list[bool]] = []
    make_vec = environments.make_vec

    def recording(*args, **kwargs):
        env = make_vec(*args, **kwargs)
        closed = [False]
        close = env.close

        def tracked_close() -> None:
            closed[0] = True
            close()

        env.close = tracked_close
        made.append(closed)
        return env

    monkeypatch.setattr(environments, "make_vec", recording)
    return made


def point_goal_spec(tmp_path: Path, method: str = "eva", **eva_changes) -> runs.RunSpec:
    import_packages(["envs"])
    task = find_task("PointGoal").with_overrides(method=method)
    task = task.with_overrides(dict(
        total_timesteps=512, eval=dataclasses.replace(task.eval, freq=512, episodes=2), n_envs=2,
        eva=dataclasses.replace(task.eva, **eva_changes), ppo={**task.ppo, "n_steps": 128},
    ))  # fmt: skip
    return runs.RunSpec(task, method, 0, tmp_path, task.agent_path, "cpu")


def test_envs_are_closed_when_a_run_fails(tmp_path: Path, closed_envs: list[list[bool]]) -> None:
    with pytest.raises(ConfigError, match="EvaConfig.batch_size=1 is below"):
        runs.run(point_goal_spec(tmp_path, batch_size=1), progress=False)
    assert len(closed_envs) == 2 and all(closed[0] for closed in closed_envs)


def test_envs_are_closed_after_a_run_and_a_rerun_reads_the_record(
    tmp_path: Path, closed_envs: list[list[bool]]
) -> None:
    spec = point_goal_spec(tmp_path, "lora")
    result = runs.run(spec, progress=False)
    # training, evaluation, and the evaluation back on the source env (the result's source_return)
    assert len(closed_envs) == 3 and all(closed[0] for closed in closed_envs)
    assert result.source_return is not None
    assert result.method == "lora" and result.total_timesteps == 512 and result.eval_curve[0][0] == 0
    assert (spec.run_dir / "adapter" / "adapter_config.json").is_file()
    assert runs.run(spec, progress=False) == result  # complete: read back, nothing run again
    assert len(closed_envs) == 3


def test_a_failed_write_leaves_neither_a_half_file_nor_its_temp(tmp_path: Path) -> None:
    import errno

    from eva_rl.files import atomic_write

    target = tmp_path / "model.zip"
    target.write_bytes(b"the previous checkpoint")

    def disk_full(tmp: Path) -> None:
        tmp.write_bytes(b"half of a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, disk_full, suffix=".tmp.zip")
    assert target.read_bytes() == b"the previous checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.zip"]


def test_one_run_folder_takes_one_process_at_a_time(tmp_path: Path) -> None:
    """A second process on a run folder in use stops with an error instead of writing over the first one's files;
    the lock is the operating system's, so it is free again once the holder exits (even when killed)."""
    import subprocess
    import sys

    from eva_rl.experiments.run_folder import RunDirError, RunFolder

    run_dir = tmp_path / "PointGoal" / "lora" / "seed0"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from eva_rl.experiments.run_folder import RunFolder\nimport sys, time\n"
         f"with RunFolder({str(run_dir)!r}).lock():\n    print('held', flush=True)\n"
         "    time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match="is in use by another run"):
            runs.run(point_goal_spec(tmp_path, "lora"), progress=False)
    finally:
        holder.kill()
        holder.wait()
    with RunFolder(run_dir).lock():  # free again once the holder is gone
        pass


def test_a_completed_run_made_with_other_settings_is_named_not_reused(tmp_path: Path) -> None:
    spec = point_goal_spec(tmp_path, "lora")
    first = runs.run(spec, progress=False)
    assert first.settings["hyperparameters"]["learning_rate"] == spec.task.ppo["learning_rate"]
    assert first.settings["lora"]["r"] == spec.task.lora.r and "eva" not in first.settings
    changed = dataclasses.replace(
        spec,
        task=spec.task.with_overrides(
            dict(ppo={**spec.task.ppo, "learning_rate": 0.123}, lora=dataclasses.replace(spec.task.lora, r=3))
        ),
    )
    with pytest.raises(runs.RunDirError) as error:
        runs.run(changed, progress=False)
    message = str(error.value)
    assert "holds a completed run made with other settings" in message and "--overwrite" in message
    assert "hyperparameters.learning_rate: " in message and "-> 0.123" in message
    assert f"lora.r: {spec.task.lora.r} -> 3" in message and "total_timesteps" not in message
    assert runs.completed_result(spec) == first  # the unchanged spec still reads it back
    with pytest.raises(runs.RunDirError, match="lora.r"):
        runs.completed_result(changed)  # a report over a changed grid stops too
    again = runs.run(changed, progress=False, overwrite=True)
    assert again.settings["hyperparameters"]["learning_rate"] == 0.123 and again.settings["lora"]["r"] == 3
    assert runs.run(changed, progress=False) == again
    assert not (spec.run_dir / "settings.json").exists()


def test_a_checkpoint_made_with_another_learning_rate_is_not_resumed_with_the_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from eva_rl.experiments.training import RunCallback

    spec = point_goal_spec(tmp_path, "lora")
    spec = dataclasses.replace(spec, task=spec.task.with_overrides(dict(total_timesteps=1024, checkpoint_freq=256)))
    save = RunCallback.save_checkpoint

    def save_then_die(self: RunCallback) -> None:
        save(self)
        raise RuntimeError("killed")

    monkeypatch.setattr(RunCallback, "save_checkpoint", save_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        runs.run(spec, progress=False)
    monkeypatch.undo()
    assert (spec.run_dir / "checkpoints" / "256" / "checkpoint.zip").is_file()
    assert (spec.run_dir / "settings.json").is_file()
    faster = dataclasses.replace(spec, task=spec.task.with_overrides({"learning_rate": 0.01}))
    with pytest.raises(runs.RunDirError, match=r"holds an unfinished run made with other settings \(hyperpara"):
        runs.run(faster, progress=False, resume=True)
    with pytest.raises(runs.RunDirError, match="pass --resume"):
        runs.run(spec, progress=False)  # same settings, no --resume
    result = runs.run(spec, progress=False, resume=True)
    assert result.total_timesteps == 1024 and result.settings == runs.run_settings(spec)


ZOO_GSDE = Path(__file__).resolve().parent / "fixtures" / "zoo" / "ppo" / "Pendulum-v1_1"
"""rl-zoo3's own PPO agent with gSDE (use_sde, sde_sample_freq 4) and VecNormalize."""


def point_goal_run(method: str, agent: Path | None, normalized: bool) -> Callable[[Path], runs.RunSpec]:
    def spec_in(folder: Path) -> runs.RunSpec:
        spec = point_goal_spec(folder, method)
        eval_settings = dataclasses.replace(spec.task.eval, freq=384, episodes=4)
        task = spec.task.with_overrides(
            dict(total_timesteps=2048, checkpoint_freq=768, eval=eval_settings, update_obs_stats=normalized)
        )
        if normalized:  # EVA's own rollouts (with VecNormalize frozen); "eva" resumes after EVA on PPO's rollouts
            task = task.with_overrides({"eva_data": "rollouts"})
        return dataclasses.replace(spec, task=task, agent_path=agent or spec.agent_path)

    return spec_in


def gsde_run(folder: Path) -> runs.RunSpec:
    task = TaskConfig(
        name="Pendulum-v1",
        target_env="Pendulum-v1",
        n_envs=2,
        ppo={"n_steps": 128, "batch_size": 64, "n_epochs": 2},
        total_timesteps=1024,
        checkpoint_freq=512,
        eval=EvalSettings(freq=512, episodes=2, deterministic=True),
    )
    return runs.RunSpec(task, "lora", 0, folder, ZOO_GSDE, "cpu")


def mujoco_run(folder: Path) -> runs.RunSpec:
    """HalfCheetah (an EzPickle env: unpickled, it is rebuilt from its arguments) with its bundled agent."""
    pytest.importorskip("mujoco")
    task = find_task("HalfCheetah-FrontThighOff").with_overrides(
        {"total_timesteps": 1024, "checkpoint_freq": 512, "n_envs": 2, "ppo.n_steps": 256, "ppo.batch_size": 128}
    )
    task = task.with_overrides({"eval": EvalSettings(freq=512, episodes=1, n_envs=1, deterministic=True)})
    import_packages(task.env_packages)
    return runs.RunSpec(task, "lora", 0, folder, task.agent_path, "cpu")


def sac_warm_up_run(folder: Path) -> runs.RunSpec:
    """The bundled SAC agent, killed inside its learning_starts (its warm-up acts with the pretrained policy)."""
    task = find_task("Pendulum-Gravity").with_overrides(
        {"total_timesteps": 384, "checkpoint_freq": 128, "ppo.learning_starts": 256, "ppo.buffer_size": 1000}
    )
    task = task.with_overrides({"eval": EvalSettings(freq=192, episodes=1, n_envs=1, deterministic=True)})
    import_packages(task.env_packages)
    return runs.RunSpec(task, "lora", 0, folder, task.agent_path, "cpu")


@pytest.mark.parametrize("setup", ["lora", "eva", "eva-normalized", "zoo-gsde", "mujoco", "sac-warm-up"])
def test_a_resumed_run_is_the_uninterrupted_run(
    setup: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """Killed right after a checkpoint, then resumed: the same updates, evaluations, TensorBoard points and final
    weights as a run that was never interrupted; with an agent's VecNormalize statistics (updated during training,
    and its running returns normalizing the rewards) too, with gSDE (rl-zoo3's own agent: each rollout's exploration
    matrix is drawn before the checkpoint), and on MuJoCo (its envs are rebuilt when unpickled, mid-episode)."""
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from eva_rl.experiments.training import RunCallback
    from eva_rl.loading import load_agent

    if setup == "zoo-gsde":
        spec_in = gsde_run
    elif setup == "mujoco":
        spec_in = mujoco_run
    elif setup == "sac-warm-up":
        spec_in = sac_warm_up_run
    else:
        normalized = setup == "eva-normalized"
        agent = request.getfixturevalue("normalized_agent") if normalized else None
        spec_in = point_goal_run(setup.split("-")[0], agent, normalized)
    uninterrupted = runs.run(spec_in(tmp_path / "whole"), progress=False)
    save = RunCallback.save_checkpoint

    def save_then_die(self: RunCallback) -> None:
        save(self)
        raise RuntimeError("killed")

    monkeypatch.setattr(RunCallback, "save_checkpoint", save_then_die)
    spec = spec_in(tmp_path / "killed")
    with pytest.raises(RuntimeError, match="killed"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs.run(spec, progress=False)
    assert not [w for w in caught if "cannot be saved" in str(w.message)]
    monkeypatch.undo()
    torch.manual_seed(12345)  # whatever the process did meanwhile must not matter
    resumed = runs.run(spec, progress=False, resume=True)

    assert resumed.eval_curve == uninterrupted.eval_curve
    whole, again = (
        load_agent(d / "model.zip", device="cpu") for d in (spec_in(tmp_path / "whole").run_dir, spec.run_dir)
    )
    assert again._n_updates == whole._n_updates
    for key, value in whole.policy.state_dict().items():
        torch.testing.assert_close(again.policy.state_dict()[key], value, atol=0, rtol=0, msg=key)

    def points(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
        # By step: the killed and the resumed part are two event files, read in file-name order, and names made in
        # the same second by one process order by a counter as text (".10" before ".9").
        events = EventAccumulator(str(run_dir)).Reload()
        return {tag: sorted((e.step, e.value) for e in events.Scalars(tag)) for tag in events.Tags()["scalars"]}

    ours, theirs = points(spec.run_dir), points(spec_in(tmp_path / "whole").run_dir)
    timing = {"time/fps", "time/time_elapsed"}  # wall clock
    assert {t: v for t, v in ours.items() if t not in timing} == {t: v for t, v in theirs.items() if t not in timing}


def test_a_change_to_the_agents_statistics_or_zoo_config_makes_its_runs_stale(tmp_path: Path) -> None:
    """The agent enters a run's identity with every file that shapes how it acts, not only its zip: a rerun after
    its vecnormalize.pkl or config.yml changed is not a stale hit of the old result."""
    agent = tmp_path / "ppo" / "Pendulum-v1_1"
    shutil.copytree(ZOO_GSDE, agent)
    spec = dataclasses.replace(gsde_run(tmp_path / "run"), agent_path=agent)
    assert set(runs.run_settings(spec)["agent_inputs"]) == {"vecnormalize.pkl", "config.yml", "args.yml"}
    runs.run(spec, progress=False)
    assert runs.run(spec, progress=False).settings == runs.run_settings(spec)  # the same inputs: reused
    sac_stats = ZOO_GSDE.parents[1] / "sac" / "Pendulum-v1_1" / "Pendulum-v1" / "vecnormalize.pkl"
    shutil.copy(sac_stats, agent / "Pendulum-v1" / "vecnormalize.pkl")
    with pytest.raises(runs.RunDirError, match=r"other settings \(agent_inputs.vecnormalize.pkl: '[0-9a-f]{64}' -> "):
        runs.run(spec, progress=False)
    shutil.copy(ZOO_GSDE / "Pendulum-v1" / "vecnormalize.pkl", agent / "Pendulum-v1" / "vecnormalize.pkl")
    config = agent / "Pendulum-v1" / "config.yml"
    config.write_text(config.read_text().replace("- - normalize\n", "- - frame_stack\n    - 2\n  - - normalize\n"))
    with pytest.raises(runs.RunDirError, match=r"other settings \(agent_inputs.config.yml: "):
        runs.run(spec, progress=False)


@pytest.mark.parametrize("stopped_by", ["convergence", "the budget"])
def test_evas_cap_is_no_difference_for_a_run_whose_eva_stopped_before_it(tmp_path: Path, stopped_by: str) -> None:
    """A run whose EVA stopped (converged, or its budget ended) before the recorded and the asked cap is the same run
    under both; one whose EVA would have hit the asked cap is not, and any other change still counts."""
    # EVA on rollouts of its own reads until it converges; on PPO's two rollouts it stops where the budget ends
    spec = point_goal_spec(tmp_path, data_source="rollouts" if stopped_by == "convergence" else "ppo")
    first = runs.run(spec, progress=False)
    eva = spec.folder.read_eva()
    assert all(eva.converged.values()) == (stopped_by == "convergence")
    assert eva.batches_used < spec.task.eva.max_batches

    def asking(**changes) -> runs.RunSpec:
        return dataclasses.replace(
            spec, task=spec.task.with_overrides(dict(eva=dataclasses.replace(spec.task.eva, **changes)))
        )

    for same in (asking(on_max_batches="warn"), asking(max_batches=eva.batches_used + 1, on_max_batches="warn")):
        assert runs.completed_result(same) == first and runs.run(same, progress=False) == first
    with pytest.raises(runs.RunDirError, match=rf"eva.max_batches: 100 -> {eva.batches_used}\)"):
        runs.completed_result(asking(max_batches=eva.batches_used))
    with pytest.raises(runs.RunDirError, match=r"\(eva.tau: [0-9.]+ -> 0.5\)"):  # the cap's change left out
        runs.run(asking(on_max_batches="warn", tau=0.5), progress=False)


def test_results_written_before_the_agents_inputs_were_recorded_are_not_stale() -> None:
    recorded = {"agent_sha256": "a", "total_timesteps": 10}
    assert runs.settings_differences(recorded, {**recorded, "agent_inputs": {"vecnormalize.pkl": "b"}}) == []
    assert runs.settings_differences({**recorded, "agent_inputs": {}}, {**recorded, "agent_inputs": {"x": "b"}})


CHECKPOINT_PARTS = [
    ("training.atomic_save_model", "before the model"),
    ("training.atomic_save_stats", "after the model"),
    ("training.save_runtime_state", "after the statistics"),
    ("run_folder.Checkpoint.commit", "after the runtime state"),
    ("run_folder.RunFolder.keep_only", "after the state, before the old checkpoint is removed"),
]


@pytest.mark.parametrize("target", [target for target, _ in CHECKPOINT_PARTS], ids=[w for _, w in CHECKPOINT_PARTS])
def test_a_kill_while_a_checkpoint_is_written_resumes_from_a_whole_one(
    target: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between any two parts of the second checkpoint, the run resumes from the last whole checkpoint and
    ends exactly as a run that was never interrupted (a mix of two checkpoints was accepted before)."""
    import importlib

    import torch

    from eva_rl.loading import load_agent

    spec_in = point_goal_run("lora", None, False)
    uninterrupted = runs.run(spec_in(tmp_path / "whole"), progress=False)
    module, _, attribute = target.partition(".")
    owner = importlib.import_module(f"eva_rl.experiments.{module}")
    for name in attribute.split(".")[:-1]:
        owner = getattr(owner, name)
    name = attribute.split(".")[-1]
    part, calls = getattr(owner, name), []

    def dies_the_second_time(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return part(*args, **kwargs)

    monkeypatch.setattr(owner, name, dies_the_second_time)
    spec = spec_in(tmp_path / "killed")
    with pytest.raises(RuntimeError, match="killed"):
        runs.run(spec, progress=False)
    monkeypatch.undo()
    whole_steps = [c.step for c in spec.folder.checkpoints() if c.read_state() is not None]
    assert whole_steps[0] == (1536 if name == "keep_only" else 768)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = runs.run(spec, progress=False, resume=True)
    cut_off = [str(w.message) for w in caught if "was cut off while it was written" in str(w.message)]
    assert len(cut_off) == (0 if name == "keep_only" else 1), cut_off
    assert resumed.eval_curve == uninterrupted.eval_curve
    whole_dir = spec_in(tmp_path / "whole").run_dir
    whole, again = (load_agent(d / "model.zip", device="cpu") for d in (whole_dir, spec.run_dir))
    for key, value in whole.policy.state_dict().items():
        torch.testing.assert_close(again.policy.state_dict()[key], value, atol=0, rtol=0, msg=key)


def test_a_run_cut_off_in_its_first_checkpoint_starts_over_and_ends_as_an_uninterrupted_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from eva_rl.experiments import training

    spec_in = point_goal_run("lora", None, False)
    uninterrupted = runs.run(spec_in(tmp_path / "whole"), progress=False)
    spec = spec_in(tmp_path / "killed")

    def killed(model, path, *args, **kwargs):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        (Path(path).parent / ".checkpoint.tmp.zip").write_bytes(b"")  # what a kill mid-write leaves
        raise RuntimeError("killed")

    monkeypatch.setattr(training, "atomic_save_model", killed)
    with pytest.raises(RuntimeError, match="killed"):
        runs.run(spec, progress=False)
    monkeypatch.undo()
    assert spec.folder.first_checkpoint_cut_off and spec.folder.latest_checkpoint() is None
    with pytest.warns(UserWarning, match="its first checkpoint was cut off while it was written; the run starts over"):
        again = runs.run(spec, progress=False, resume=True)
    assert again.eval_curve == uninterrupted.eval_curve


def test_a_checkpoint_whose_model_was_written_is_never_started_over(tmp_path: Path) -> None:
    from eva_rl.experiments.run_folder import RunFolder

    folder = RunFolder(tmp_path)
    folder.new_checkpoint(1).model_file.write_text("a model whose state was never committed")
    assert folder.latest_checkpoint() is None and not folder.first_checkpoint_cut_off


def test_a_checkpoint_with_a_part_from_another_save_is_not_resumed_from(tmp_path: Path) -> None:
    from eva_rl.experiments.run_folder import RunFolder

    folder = RunFolder(tmp_path)
    first, second = folder.new_checkpoint(1), folder.new_checkpoint(2)
    for checkpoint, text in ((first, "one"), (second, "two")):
        checkpoint.model_file.write_text(text)
        checkpoint.runtime_file.write_text(text)
        checkpoint.commit({"num_timesteps": checkpoint.step})
    assert folder.latest_checkpoint()[0] == second
    second.runtime_file.write_text("one")  # a part of another save
    latest, state, cut_off = folder.latest_checkpoint()
    assert (latest, state, cut_off) == (first, {"num_timesteps": 1}, [second])


def test_overwrite_replaces_a_run_only_when_the_new_one_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C (or a crash) during an --overwrite run leaves the completed run it was to replace, and so does a kill
    that skips every cleanup (the next command puts the replaced run back first)."""
    from eva_rl.experiments.training import RunCallback

    spec = point_goal_run("lora", None, False)(tmp_path)
    old = runs.run(spec, progress=False)
    faster = dataclasses.replace(spec, task=spec.task.with_overrides({"learning_rate": 0.01}))

    def interrupted(self: RunCallback) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(RunCallback, "save_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runs.run(faster, progress=False, overwrite=True)
    monkeypatch.undo()
    assert spec.folder.read_result() == old and not spec.folder.set_aside_dir.exists()

    spec.folder.set_aside()  # as a kill -9 mid-replacement leaves it: the old run aside, a new one begun
    (spec.run_dir / "settings.json").write_text("{}")
    assert runs.run(spec, progress=False) == old  # the old settings: the replaced run is back, and reused

    new = runs.run(faster, progress=False, overwrite=True)
    assert spec.folder.read_result() == new != old and not spec.folder.set_aside_dir.exists()


def test_a_damaged_run_record_is_named_and_overwrite_starts_it_over(tmp_path: Path) -> None:
    spec = point_goal_run("lora", None, False)(tmp_path)
    runs.run(spec, progress=False)
    (spec.run_dir / "result.json").write_text("{not json")
    with pytest.raises(runs.RunDirError, match=r"result.json is damaged \(not JSON.*pass --overwrite"):
        runs.run(spec, progress=False)
    assert runs.run(spec, progress=False, overwrite=True).final_return is not None
    assert spec.folder.read_result().settings == runs.run_settings(spec)
