"""Meta-World's tasks as Continual World runs them (envs/meta_world.py): ids, seeding, one observation space."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest

import envs  # noqa: F401  (registers MetaWorld-<task>-v3)
from envs.meta_world import CW10, EPISODE_STEPS, MT10, MT50, PRETRAINING_TASKS, env_id

metaworld = pytest.importorskip("metaworld")


def test_the_task_lists_match_meta_worlds_and_keep_cw10_out_of_pretraining() -> None:
    from metaworld.env_dict import MT10_V3, MT50_V3

    assert {f"{task}-v3" for task in MT50} == set(MT50_V3) and {f"{task}-v3" for task in MT10} == set(MT10_V3)
    assert set(CW10) <= set(MT50) and len(PRETRAINING_TASKS) == 40 and not set(PRETRAINING_TASKS) & set(CW10)


@pytest.mark.parametrize("task", ["hammer", "push"])
def test_a_seed_fixes_the_positions_and_the_next_reset_draws_new_ones(task: str) -> None:
    env = gym.make(env_id(task))
    first, _ = env.reset(seed=3)
    again, _ = env.reset(seed=3)
    following, _ = env.reset()
    other, _ = env.reset(seed=4)
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert not np.array_equal(again[4:7], following[4:7])  # the object moved: a fresh draw, not a fixed list
    assert first.dtype == np.float32 and np.any(first[36:39] != 0)  # the goal is observed


def test_every_task_has_the_same_observation_space_and_200_step_episodes() -> None:
    spaces = [gym.make(env_id(task)).observation_space for task in ("hammer", "reach", "window-close")]
    assert spaces[0] == spaces[1] == spaces[2]
    env = gym.make(env_id("reach"))
    env.reset(seed=0)
    steps, truncated = 0, False
    while not truncated:
        *_, truncated, info = env.step(env.action_space.sample())
        steps += 1
    assert steps == EPISODE_STEPS and "success" in info


def test_the_scripted_expert_succeeds_within_the_horizon() -> None:
    from metaworld.policies import ENV_POLICY_MAP

    env, expert = gym.make(env_id("hammer")), ENV_POLICY_MAP["hammer-v3"]()
    observation, _ = env.reset(seed=0)
    success = False
    for _ in range(EPISODE_STEPS):
        observation, _, _, _, info = env.step(expert.get_action(observation))
        success |= bool(info["success"])
    assert success


def test_an_unknown_task_names_the_known_ones() -> None:
    from envs.meta_world import MetaWorldTask

    with pytest.raises(ValueError, match="task='hamer' is not a Meta-World task; expected one of"):
        MetaWorldTask("hamer")


def test_runs_and_cards_on_meta_world_record_the_mujoco_and_metaworld_versions() -> None:
    from importlib.metadata import version

    from eva_rl.experiments.machine import describe_platform
    from eva_rl.experiments.pretrain import package_versions
    from eva_rl.physics import simulator_packages

    simulator = describe_platform("cpu", env_id("hammer"))["simulator"]
    assert simulator == f"mujoco {version('mujoco')}, metaworld {version('metaworld')}"
    assert package_versions(simulator_packages(env_id("hammer")))["metaworld"] == version("metaworld")
    assert simulator_packages("HalfCheetah-v5") == ("mujoco",) and simulator_packages("CartPole-v1") == ()


def test_a_cloned_base_fine_tunes_on_two_cw10_tasks_and_the_page_scores_success(tmp_path) -> None:
    """The smoke version of the CW10 suite: a base cloned from two experts (one demonstration each, a small net),
    eva and full on hammer and push-wall for one short run each, the page comparing success rates."""
    from eva_rl.experiments.pretrain import pretrain
    from eva_rl.experiments.runs import RunSpec, run
    from eva_rl.experiments.studies.suite import aggregate, results_markdown
    from eva_rl.experiments.suites import Suite, SuiteTask
    from eva_rl.experiments.tasks import find_task

    small = {
        "policy_kwargs": {"net_arch": {"pi": [32, 32], "vf": [16]}, "activation_fn": "torch.nn:ReLU"},
        "agent": str(tmp_path / "base" / "model.zip"),
        "ppo.n_steps": 64,
        "ppo.batch_size": 64,
        "n_envs": 2,
        "total_timesteps": 256,
        "eval.freq": 128,
        "eval.episodes": 2,
        "eval.n_envs": 2,
        "lora.r": 2,
        "eva.batch_size": 64,
    }
    base = find_task("MetaWorld-MT40").with_overrides(
        {**small, "pretrain_cloning.envs": [env_id("reach"), env_id("door-open")], "pretrain_cloning.episodes": 1}
    )
    card = pretrain(base, tmp_path / "base", device="cpu", progress=False)
    assert card["cloning"]["transitions"] == 2 * EPISODE_STEPS and card["target_success"] is not None
    suite_tasks = [SuiteTask(f"MetaWorld-{task}", threshold=0.5, score="success") for task in ("hammer", "push-wall")]
    runs = []
    for suite_task in suite_tasks:
        task = find_task(suite_task.task).with_overrides(small)
        for method in ("eva", "full"):
            spec = RunSpec(task, method, 0, tmp_path / "runs", task.agent_path, device="cpu")
            result = run(spec, progress=False)
            assert [step for step, _ in result.success_curve] == [0, 128, 256]
            runs.append((suite_task, result.scored("success")))
    report = aggregate(Suite("cw10-smoke", suite_tasks, methods=["eva", "full"], seeds=1), runs)
    assert set(report.tasks) == {"MetaWorld-hammer", "MetaWorld-push-wall"}
    assert all(0.0 <= row.final.estimate <= 1.0 for task in report.tasks.values() for row in task.methods.values())
    page = results_markdown(report)
    assert page.count("final success") == 4  # each task's table, the pooled one and its normalization note
    assert "| method | tasks | final success | normalized AUC |" in page


def _noised_expert_steps(task: str, steps: int):
    """The unwrapped env of ``task`` after each of ``steps`` steps of its scripted expert, noised so that the
    gripper also misses (seed 1, noise seed 0)."""
    from metaworld.policies import ENV_POLICY_MAP

    env, expert = gym.make(env_id(task)), ENV_POLICY_MAP[f"{task}-v3"]()
    noise = np.random.default_rng(0)
    observation, _ = env.reset(seed=1)
    for _ in range(steps):
        action = expert.get_action(observation) + noise.normal(0.0, 0.3, 4)
        observation, *_ = env.step(np.clip(action, -1.0, 1.0))
        yield env.unwrapped


def test_the_fast_touching_object_answers_as_meta_worlds_own_on_scripted_episodes() -> None:
    from metaworld.sawyer_xyz_env import SawyerXYZEnv

    from envs.meta_world import TouchingObject

    touched = 0
    for task in CW10:
        for core in _noised_expert_steps(task, 120):
            assert isinstance(core.touching_object, TouchingObject)
            # every geom a contact names, the object's and others', against Meta-World's own loop
            for geom in {int(g) for g in core.data.contact.geom1} | {int(g) for g in core.data.contact.geom2}:
                expected = SawyerXYZEnv.touching_object(core, geom)
                assert core.touching_object(geom) == expected, (task, geom)
                touched += expected
    assert touched > 50  # the pads grip objects in these episodes: the comparison covers both answers


def test_the_fast_object_quaternion_is_scipys_bit_for_bit() -> None:
    from scipy.spatial.transform import Rotation

    from envs.meta_world import matrix_quaternion

    noise = np.random.default_rng(0)
    for matrix in Rotation.random(5000, random_state=0).as_matrix():
        assert np.array_equal(matrix_quaternion(matrix), Rotation.from_matrix(matrix).as_quat())
        # off a rotation by 1e-9 SciPy re-orthogonalizes first: the fallback must give its answer too
        skewed = matrix + noise.normal(0.0, 1e-9, (3, 3))
        assert np.array_equal(matrix_quaternion(skewed), Rotation.from_matrix(skewed).as_quat())
    for corner in (np.eye(3), np.diag([1.0, -1.0, -1.0]), np.diag([-1.0, 1.0, -1.0]), np.diag([-1.0, -1.0, 1.0])):
        assert np.array_equal(matrix_quaternion(corner), Rotation.from_matrix(corner).as_quat())  # ties in the choice
    with pytest.raises(ValueError, match="determinant"):
        matrix_quaternion(np.diag([1.0, 1.0, -1.0]))  # a reflection: SciPy's own error


def test_every_task_that_asks_scipy_for_its_object_quaternion_gets_the_fast_one_and_the_same_answers() -> None:
    import inspect

    from envs.meta_world import OBJECT_FRAMES, ObjectQuaternion

    asks_scipy = {
        task
        for task in MT50
        if "Rotation.from_matrix" in inspect.getsource(type(gym.make(env_id(task)).unwrapped)._get_quat_objects)
    }
    assert asks_scipy == set(OBJECT_FRAMES)
    for task in sorted(OBJECT_FRAMES):
        for core in _noised_expert_steps(task, 30):
            assert isinstance(core._get_quat_objects, ObjectQuaternion)
            assert np.array_equal(core._get_quat_objects(), type(core)._get_quat_objects(core)), task


def test_an_env_built_from_the_parsed_model_runs_as_one_that_parsed_its_own() -> None:
    from envs import meta_world

    def episode(env, seed: int) -> list[np.ndarray]:
        observation, _ = env.reset(seed=seed)
        actions = np.random.default_rng(seed).uniform(-1.0, 1.0, (40, 4))
        steps = [env.step(action) for action in actions]
        return [observation] + [np.append(observation, reward) for observation, reward, *_ in steps]

    for task in CW10:
        meta_world._PARSED_MODELS.clear()
        parsed = gym.make(env_id(task))  # Meta-World's own parse
        copied = gym.make(env_id(task))
        assert len(meta_world._PARSED_MODELS) == 1 and copied.unwrapped.model is not parsed.unwrapped.model
        expected = episode(parsed, 1)
        episode(copied, 2)  # another goal and object position written into this env's model first
        later = gym.make(env_id(task))  # after both envs changed their models: the cache holds the parse
        for env in (copied, later):
            assert all(np.array_equal(a, b) for a, b in zip(episode(env, 1), expected, strict=True)), task
    # a process keeps the most recent tasks' models only (about 21 MB each)
    assert list(meta_world._PARSED_MODELS) == [(gym.make(env_id(CW10[-1])).unwrapped.fullpath, 480, 480)]
    for task in CW10[: meta_world.PARSED_MODELS_KEPT + 1]:
        gym.make(env_id(task))
    kept = [path for path, _, _ in meta_world._PARSED_MODELS]
    assert kept == [gym.make(env_id(task)).unwrapped.fullpath for task in CW10[1 : meta_world.PARSED_MODELS_KEPT + 1]]


def test_the_meta_world_benchmark_times_the_checks_and_the_builds(capsys) -> None:
    from eva_rl.experiments.cli import bench_main

    assert bench_main(["--meta-world-only", "--quick"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    figures = printed["meta_world_contacts"]
    assert figures["env"] == "MetaWorld-push-v3"
    assert figures["meta_world_steps_per_s"] > 0 and figures["fast_contacts_steps_per_s"] > 0
    assert figures["speedup"] == pytest.approx(figures["fast_contacts_steps_per_s"] / figures["meta_world_steps_per_s"])
    project = figures["fast_contacts_and_quaternion_steps_per_s"]
    assert figures["quaternion_speedup"] == pytest.approx(project / figures["fast_contacts_steps_per_s"])
    assert figures["total_speedup"] == pytest.approx(project / figures["meta_world_steps_per_s"])
    assert printed["meta_world_builds"]["envs"] == 4
    assert printed["meta_world_builds"]["each_parses_s"] > 0 and printed["meta_world_builds"]["parsed_once_s"] > 0


def test_the_cw10_sequence_shares_every_run_from_the_base_with_the_cw10_suite(tmp_path) -> None:
    from eva_rl.experiments.sequences import load_sequence
    from eva_rl.experiments.studies.continual import ContinualStudy

    study = ContinualStudy(load_sequence("cw10"), tmp_path)
    planned = study.plan()
    assert len(planned) == 10 * 4 * 5  # stages x (eva, lora, full, scratch) x seeds
    assert study.shared == {key for key, _ in planned}  # the suite's folder is the sequence's own: names tell them
    assert all(spec.log_dir == tmp_path / "cw10" and spec.task.name.startswith("MetaWorld-") for _, spec in planned)
