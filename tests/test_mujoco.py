"""The MuJoCo transfer tasks: physics variants (the changed quantity really changed, and only it), their task files,
the bundled HalfCheetah agent with its VecNormalize statistics, and one short EVA + PPO run per task."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import envs  # noqa: F401  (registers the variant ids)
from eva_rl.errors import ConfigError
from eva_rl.experiments.environments import env_factory
from eva_rl.experiments.runs import RunSpec, run
from eva_rl.experiments.tasks import ROOT, find_task
from eva_rl.loading import load_pretrained
from eva_rl.physics import MujocoPhysics

pytest.importorskip("mujoco")
pytestmark = [
    pytest.mark.filterwarnings("ignore::eva_rl.physics.MujocoWarning"),
    pytest.mark.filterwarnings("ignore:EVA:UserWarning"),
]
TASKS = ("HalfCheetah-FrontThighOff", "HalfCheetah-HeavyTorso")


def _model(env: gym.Env):
    return env.unwrapped.model


def _rollout(env: gym.Env, steps: int = 100) -> np.ndarray:
    """Observations under a fixed action sequence from a fixed start: the dynamics, compared across variants."""
    observation, _ = env.reset(seed=0)
    actions = np.random.default_rng(0).uniform(-1, 1, (steps, *env.action_space.shape))
    trajectory = [observation]
    for action in actions:
        observation, *_ = env.step(action.astype(np.float32))
        trajectory.append(observation)
    return np.array(trajectory)


@pytest.mark.parametrize(
    ("env_id", "changed"),
    [
        ("HalfCheetah-FrontThighOff-v0", {"actuator_gear": ("actuator", "fthigh", 0.0)}),
        ("HalfCheetah-HeavyTorso-v0", {"body_mass": ("body", "torso", 3.0), "body_inertia": ("body", "torso", 3.0)}),
    ],
)
def test_variant_changes_its_quantity_only_and_keeps_it_across_resets(env_id: str, changed: dict) -> None:
    base, variant = gym.make("HalfCheetah-v5"), gym.make(env_id)
    for field in ("body_mass", "body_inertia", "actuator_gear", "geom_friction"):
        expected = getattr(_model(base), field).copy()
        if field in changed:
            kind, name, factor = changed[field]
            expected[getattr(_model(base), kind)(name).id] *= factor
        np.testing.assert_allclose(getattr(_model(variant), field), expected, err_msg=field)
    np.testing.assert_array_equal(_model(variant).opt.gravity, _model(base).opt.gravity)
    assert variant.observation_space == base.observation_space and variant.action_space == base.action_space
    changed_before = {field: getattr(_model(variant), field).copy() for field in changed}
    variant.reset(seed=1)
    variant.reset(seed=2)
    for field, values in changed_before.items():
        np.testing.assert_array_equal(getattr(_model(variant), field), values)
    # the dynamics changed: the same actions from the same start move the body differently
    assert not np.allclose(_rollout(variant), _rollout(base))
    np.testing.assert_array_equal(_rollout(gym.make("HalfCheetah-v5")), _rollout(base))


def test_wrapper_scales_friction_gravity_every_body_and_joint_named_actuators() -> None:
    hopper = gym.make("Hopper-v5")
    model = _model(hopper)
    mass, gear, friction = model.body_mass.copy(), model.actuator_gear[:, 0].copy(), model.geom_friction.copy()
    gravity = model.opt.gravity.copy()
    # Hopper's actuators have no names: a joint name selects the actuator driving it
    MujocoPhysics(hopper, body_mass={"*": 1.5}, actuator_gear={"thigh_joint": 0.5}, friction=0.25, gravity=2.0)
    np.testing.assert_allclose(model.body_mass[1:], mass[1:] * 1.5)
    thigh = int(np.flatnonzero(model.actuator_trnid[:, 0] == model.joint("thigh_joint").id)[0])
    np.testing.assert_allclose(model.actuator_gear[:, 0], np.where(np.arange(len(gear)) == thigh, 0.5, 1.0) * gear)
    np.testing.assert_allclose(model.geom_friction[:, 0], friction[:, 0] * 0.25)
    np.testing.assert_array_equal(model.geom_friction[:, 1:], friction[:, 1:])
    np.testing.assert_allclose(model.opt.gravity, gravity * 2.0)
    # the derived constants follow (mj_setConst): the world's subtree mass is the new total
    assert model.body_subtreemass[0] == pytest.approx(model.body_mass.sum())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"body_mass": {"tail": 2.0}}, "body_mass names ['tail'] are not bodies of this model; it has ['torso'"),
        ({"actuator_gear": {"knee": 0.0}}, "actuator_gear names ['knee'] are not actuators"),
        ({"body_mass": {"torso": 0.0}}, "body_mass['torso']=0.0 is invalid: expected a factor above 0"),
        ({"actuator_gear": {"fthigh": -1}}, "actuator_gear['fthigh']=-1 is invalid: expected a factor 0 or more"),
        ({"friction": float("nan")}, "friction=nan is invalid: expected a finite number"),
        ({"gravity": "2"}, "gravity='2' is invalid: expected a finite number"),
        ({"body_mass": ["torso"]}, "body_mass=['torso'] is invalid: expected a mapping of names"),
    ],
)
def test_bad_physics_settings_are_one_line_errors_naming_the_value(kwargs, message) -> None:
    with pytest.raises(ConfigError) as error:
        MujocoPhysics(gym.make("HalfCheetah-v5"), **kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_wrapper_refuses_an_env_that_is_not_mujoco() -> None:
    with pytest.raises(ConfigError, match="needs a MuJoCo env .* got PendulumEnv"):
        MujocoPhysics(gym.make("Pendulum-v1"), gravity=2.0)


def test_mujoco_compile_warnings_show_once_not_per_env_copy(capfd, recwarn) -> None:
    make = env_factory("HalfCheetah-FrontThighOff-v0")
    for _ in range(3):
        make().close()
    out, err = capfd.readouterr()
    assert "settotalmass" not in out + err  # MuJoCo's own print is routed into Python's warnings
    # MuJoCo 4 deprecates the attribute half_cheetah.xml sets; 3.x (which Meta-World pins) compiles it silently
    deprecated = int(importlib.metadata.version("mujoco").split(".")[0]) >= 4
    assert sum("settotalmass" in str(w.message) for w in recwarn) == (1 if deprecated else 0)


@pytest.mark.parametrize("name", TASKS)
def test_task_files_name_the_bundled_agent_and_its_statistics(name: str) -> None:
    task = find_task(name)
    assert task is not None and task.source_env == "HalfCheetah-v5" and task.pretrain_normalize
    card = json.loads((task.agent_path.parent / "card.json").read_text())
    assert card["vec_normalize"] == "vecnormalize.pkl"
    assert task.pretrain_timesteps <= card["timesteps"] < task.pretrain_timesteps + task.ppo["n_steps"]
    agent = load_pretrained(task.agent_path, device="cpu")
    assert agent.vec_normalize == task.agent_path.parent / "vecnormalize.pkl"
    target = env_factory(task.target_env, task.wrappers, task.env_kwargs)()
    assert agent.model.observation_space == target.observation_space
    assert agent.model.action_space == target.action_space
    assert task.agent_path.stat().st_size < 5_000_000, "bundled agents stay small"
    assert str(task.agent_path.relative_to(ROOT)).startswith("agents/")


@pytest.mark.slow
@pytest.mark.parametrize("name", TASKS)
def test_one_short_eva_and_ppo_run_per_task(tmp_path: Path, name: str) -> None:
    task = find_task(name)
    eval_settings = {"freq": 512, "episodes": 1, "n_envs": 1, "deterministic": True, "seed": 10000}
    task = task.with_overrides(dict(total_timesteps=512, checkpoint_freq=512, eval=type(task.eval)(**eval_settings)))
    task.eva.max_batches = 4  # a smoke test of the pipeline: EVA keeps its estimate after 4 batches
    task.eva.on_max_batches = "warn"
    result = run(RunSpec(task, "eva", 0, tmp_path, task.agent_path, "cpu"), progress=False)
    run_dir = tmp_path / name / "eva" / "seed0"
    eva = json.loads((run_dir / "eva.json").read_text())
    assert sum(eva["ranks"].values()) > 0
    assert eva["data_source"] == "ppo" and result.eva_env_steps == 0  # the default reads PPO's first rollout
    assert (run_dir / "vecnormalize.pkl").is_file() and (run_dir / "adapter").is_dir()
    assert [step for step, _ in result.eval_curve] == [0, 512]
    # B = 0 after EVA: the step-0 evaluation is the pretrained agent's own return on the target
    card = json.loads((task.agent_path.parent / "card.json").read_text())
    assert np.isfinite(result.final_return) and result.jumpstart < card["eval_return"]
