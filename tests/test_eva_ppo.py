"""EVA on PPO's own rollouts (``EvaConfig(data_source="ppo")``): no extra env steps, same numerics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import KVWriter, Logger

import eva_rl
from eva_rl import EvaConfig, LoraConfig
from eva_rl.eva import run_eva
from eva_rl.eva_ppo import EvaPPO
from eva_rl.rollouts import policy_forward
from tests.conftest import VARIANTS, make_pretrained
from tests.test_policy import outputs, sample_obs

pytestmark = pytest.mark.filterwarnings("ignore:EVA:UserWarning")

N_ENVS, N_STEPS, BATCH = 2, 64, 64  # a rollout is 128 steps: two EVA batches


class RecordRollouts(BaseCallback):
    """Keeps a copy of each rollout's observations, as PPO's buffer holds them before the update."""

    def __init__(self) -> None:
        super().__init__()
        self.observations: list = []

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        obs = self.model.rollout_buffer.observations
        copy = {k: v.copy() for k, v in obs.items()} if isinstance(obs, dict) else obs.copy()
        self.observations.append(copy)


def _time_major_batches(rollouts: list, batch_size: int) -> list:
    batches = []
    for obs in rollouts:
        if isinstance(obs, dict):
            flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in obs.items()}
            rows = len(next(iter(flat.values())))
            batches += [{k: v[i : i + batch_size] for k, v in flat.items()} for i in range(0, rows, batch_size)]
        else:
            flat = obs.reshape(-1, *obs.shape[2:])
            batches += [flat[i : i + batch_size] for i in range(0, len(flat), batch_size)]
    return batches


@pytest.mark.parametrize(
    ("variant", "method"), [("mlp-discrete", "eva"), ("cnn-discrete", "eva"), ("dict-discrete", "eva+dora")]
)
def test_eva_from_ppo_rollouts_costs_no_own_env_steps_and_equals_eva_on_that_stream(
    variant: str, method: str, tmp_path: Path
) -> None:
    base = make_pretrained(variant)
    lora = LoraConfig(r=2)
    eva = EvaConfig(batch_size=BATCH, max_batches=60, on_max_batches="warn", data_source="ppo")
    env = make_vec_env(VARIANTS[variant][0], n_envs=N_ENVS, seed=0)
    # lr 0 keeps A as EVA set it, so it can be compared after learning.
    model = eva_rl.adapt(base, env, method, lora, eva, n_steps=N_STEPS, batch_size=64, n_epochs=2, learning_rate=0.0)
    assert isinstance(model, EvaPPO) and model.eva_pending and model.policy.eva_report is None
    obs = sample_obs(base)
    for got, want in zip(outputs(model.policy, obs), outputs(base.policy, obs)):
        assert (got - want).abs().max() < 1e-6  # placeholder adapters: the pretrained policy acts

    recorder = RecordRollouts()
    rollouts = 6
    model.learn(rollouts * N_STEPS * N_ENVS, callback=recorder)
    report = model.policy.eva_report
    assert not model.eva_pending and report.data_source == "ppo" and report.env_steps == 0
    deferred = math.ceil(report.batches_used / 2) - 1  # rollouts read before the one where EVA converged
    assert deferred >= 1, "the test needs EVA to read more than one rollout"
    assert report.deferred_steps == deferred * N_STEPS * N_ENVS and report.skipped_steps == 0
    assert model._n_updates == 2 * rollouts, "PPO must update on every rollout, those EVA read included"

    stream = _time_major_batches(recorder.observations, BATCH)[: report.batches_used]
    oracle = run_eva(base.policy, stream, lora, eva, forward_fn=policy_forward)
    assert report.ranks == oracle.ranks
    assert model.policy.lora_ranks == {k: v for k, v in oracle.ranks.items() if v > 0}
    for name, layer in model.policy.lora_layers.items():
        torch.testing.assert_close(layer.lora_A.detach().reshape(layer.r, -1), oracle.A[name], atol=1e-5, rtol=0)
        assert layer.use_dora == (method == "eva+dora")
    for got, want in zip(outputs(model.policy, obs), outputs(base.policy, obs)):
        assert (got - want).abs().max() < 1e-5  # EVA's swap keeps the policy unchanged too

    path = tmp_path / "model.zip"
    model.save(path)
    loaded = PPO.load(path, device="cpu")
    assert loaded.policy.lora_ranks == model.policy.lora_ranks
    assert loaded.policy.eva_report.deferred_steps == report.deferred_steps


def test_eva_from_ppo_trains_the_swapped_in_adapters() -> None:
    base = make_pretrained("mlp-discrete")
    eva = EvaConfig(batch_size=BATCH, max_batches=60, on_max_batches="warn", data_source="ppo")
    env = make_vec_env(VARIANTS["mlp-discrete"][0], n_envs=N_ENVS, seed=0)
    model = eva_rl.adapt(base, env, "eva", LoraConfig(r=2), eva, n_steps=N_STEPS, batch_size=64, n_epochs=2)
    model.learn(8 * N_STEPS * N_ENVS)
    trained = model.policy.trainable_parameters()
    assert {id(p) for group in model.policy.optimizer.param_groups for p in group["params"]} == {id(p) for p in trained}
    assert any(layer.lora_B.abs().sum() > 0 for layer in model.policy.lora_layers.values())


def test_eva_batch_larger_than_a_rollout_is_refused() -> None:
    base = make_pretrained("mlp-discrete")
    eva = EvaConfig(batch_size=512, data_source="ppo")
    with pytest.raises(ValueError, match=r"batch_size=512 exceeds the rollout of n_steps\*n_envs=128"):
        eva_rl.adapt(base, make_vec_env(VARIANTS["mlp-discrete"][0], n_envs=2), "eva", eva=eva, n_steps=64)


def test_numpy_layout_is_time_major() -> None:
    from gymnasium import spaces

    from eva_rl.eva_ppo import _time_major

    buffer = np.arange(3 * 2 * 4).reshape(3, 2, 4)  # (n_steps, n_envs, features)
    box = spaces.Box(0, 100, (4,))
    assert _time_major(buffer, 6, box)[:2].tolist() == [buffer[0, 0].tolist(), buffer[0, 1].tolist()]
    discrete = np.arange(3 * 2).reshape(3, 2, 1)  # the buffer keeps a trailing axis for Discrete observations
    assert _time_major(discrete, 6, spaces.Discrete(10)).tolist() == [0, 1, 2, 3, 4, 5]


def test_eva_on_ppo_rollouts_with_discrete_observations() -> None:
    """A Discrete observation space (FrozenLake) used to crash: the buffer's trailing axis reached the policy."""
    import gymnasium as gym
    from stable_baselines3 import PPO

    base = PPO("MlpPolicy", "FrozenLake-v1", n_steps=64, device="cpu", seed=0)
    eva = EvaConfig(batch_size=64, data_source="ppo", max_batches=40, on_max_batches="warn")
    model = eva_rl.adapt(base, gym.make("FrozenLake-v1"), "eva", LoraConfig(r=2), eva, n_steps=64)
    model.learn(64 * 30)
    assert not model.eva_pending and model.policy.eva_report.data_source == "ppo"


@pytest.mark.parametrize("loader", [PPO, EvaPPO])
def test_a_model_saved_before_eva_finished_refuses_to_train(loader: type, tmp_path: Path) -> None:
    base = make_pretrained("mlp-discrete")
    eva = EvaConfig(batch_size=BATCH, max_batches=60, data_source="ppo")
    env = make_vec_env(VARIANTS["mlp-discrete"][0], n_envs=N_ENVS, seed=0)
    model = eva_rl.adapt(base, env, "eva", LoraConfig(r=2), eva, n_steps=N_STEPS, batch_size=64, n_epochs=2)
    assert model.eva_pending
    model.save(tmp_path / "pending.zip")
    loaded = loader.load(tmp_path / "pending.zip", env=env, device="cpu")
    obs = sample_obs(base)
    for got, want in zip(outputs(loaded.policy, obs), outputs(base.policy, obs)):
        assert (got - want).abs().max() < 1e-6  # it still acts as the pretrained policy
    with pytest.raises(eva_rl.CheckpointError, match="saved before EVA on PPO's rollouts finished"):
        loaded.learn(4 * N_STEPS * N_ENVS)  # before the fix: trained the placeholders as plain LoRA
    assert not any(layer.lora_B.abs().sum() > 0 for layer in loaded.policy.lora_layers.values())

    model.learn(8 * N_STEPS * N_ENVS)  # EVA finishes: the saved model trains again
    model.save(tmp_path / "done.zip")
    done = loader.load(tmp_path / "done.zip", env=env, device="cpu")
    assert not done.policy.eva_pending and "eva_pending" not in done.policy_kwargs
    done.learn(2 * N_STEPS * N_ENVS)


def test_eva_seconds_on_ppo_rollouts_count_eva_not_the_time_around_it() -> None:
    import time

    base = make_pretrained("mlp-discrete")
    eva = EvaConfig(batch_size=BATCH, max_batches=60, on_max_batches="warn", data_source="ppo")
    env = make_vec_env(VARIANTS["mlp-discrete"][0], n_envs=N_ENVS, seed=0)
    model = eva_rl.adapt(base, env, "eva", LoraConfig(r=2), eva, n_steps=N_STEPS, batch_size=64, n_epochs=2)
    time.sleep(1.0)  # idle between adapt() and learn(): before the fix, EVA's clock ran from adapt()
    started = time.perf_counter()
    model.learn(6 * N_STEPS * N_ENVS)
    learning = time.perf_counter() - started
    report = model.policy.eva_report
    assert report is not None and 0 < report.seconds < learning  # a part of learn(), none of the sleep


def test_every_rollout_eva_read_is_trained_on_with_its_own_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """The updates that waited for EVA read the rollouts they were collected for, oldest first, then the converging
    one: not the last rollout's buffer again."""
    base = make_pretrained("mlp-discrete")
    eva = EvaConfig(batch_size=BATCH, max_batches=60, on_max_batches="warn", data_source="ppo")
    env = make_vec_env(VARIANTS["mlp-discrete"][0], n_envs=N_ENVS, seed=0)
    model = eva_rl.adapt(base, env, "eva", LoraConfig(r=2), eva, n_steps=N_STEPS, batch_size=64, n_epochs=1)
    trained_on: list[np.ndarray] = []
    plain_train = PPO.train

    def recording_train(self: PPO) -> None:
        trained_on.append(self.rollout_buffer.observations.copy())
        plain_train(self)

    monkeypatch.setattr(PPO, "train", recording_train)
    recorder = RecordRollouts()
    rollouts = 5
    model.learn(rollouts * N_STEPS * N_ENVS, callback=recorder)
    assert model.policy.eva_report.deferred_steps >= N_STEPS * N_ENVS, "the test needs EVA to read two rollouts"
    assert len(trained_on) == len(recorder.observations) == rollouts
    for got, collected in zip(trained_on, recorder.observations):
        np.testing.assert_array_equal(got, collected)


class KeepDumps(KVWriter):
    """An SB3 logger output that keeps every dumped set of values."""

    def __init__(self) -> None:
        self.dumps: list[dict] = []

    def write(self, key_values: dict, key_excluded: dict, step: int = 0) -> None:
        self.dumps.append(dict(key_values))


def test_the_catch_up_rows_first_and_largest_kl_are_logged_beside_its_last(monkeypatch: pytest.MonkeyPatch) -> None:
    """``train/approx_kl`` keeps only the row's last update; ``init/`` gets its first and largest and its length."""
    base = make_pretrained("mlp-discrete")
    eva = EvaConfig(batch_size=BATCH, max_batches=60, on_max_batches="warn", data_source="ppo")
    env = make_vec_env(VARIANTS["mlp-discrete"][0], n_envs=N_ENVS, seed=0)
    model = eva_rl.adapt(base, env, "eva", LoraConfig(r=2), eva, n_steps=N_STEPS, batch_size=64, n_epochs=2)
    output = KeepDumps()
    model.set_logger(Logger(None, [output]))
    kls: list[float] = []
    plain_train = PPO.train

    def recording_train(self: PPO) -> None:
        plain_train(self)
        kls.append(self.logger.name_to_value["train/approx_kl"])

    monkeypatch.setattr(PPO, "train", recording_train)
    model.learn(5 * N_STEPS * N_ENVS)
    row = model.policy.eva_report.deferred_steps // (N_STEPS * N_ENVS) + 1
    assert row >= 2, "the test needs EVA to read two rollouts"
    assert len(set(kls[:row])) == row, "the row's updates must differ for the test to tell them apart"
    logged = [d for d in output.dumps if "init/catch_up_updates" in d]
    assert len(logged) == 1
    assert logged[0]["init/catch_up_updates"] == row
    assert logged[0]["init/catch_up_first_approx_kl"] == pytest.approx(kls[0])
    assert logged[0]["init/catch_up_max_approx_kl"] == pytest.approx(max(kls[:row]))
    assert logged[0]["train/approx_kl"] == pytest.approx(kls[row - 1])


@pytest.mark.parametrize(
    ("algorithm", "n_steps", "reads_rollouts_of_the_algorithm"),
    [("ppo", N_STEPS, True), ("a2c", 5, False), ("sac", None, False)],
)
def test_auto_reads_the_algorithms_rollouts_where_it_is_on_policy_and_a_rollout_holds_a_batch(
    algorithm: str, n_steps: int | None, reads_rollouts_of_the_algorithm: bool
) -> None:
    from eva_rl.adapt import reads_algorithm_rollouts
    from eva_rl.loading import ALGORITHMS

    eva = EvaConfig(batch_size=BATCH, data_source="auto")
    decided = reads_algorithm_rollouts(eva, ALGORITHMS[algorithm], n_steps, N_ENVS)
    assert decided == reads_rollouts_of_the_algorithm
    assert reads_algorithm_rollouts(EvaConfig(data_source="rollouts"), ALGORITHMS[algorithm], n_steps, N_ENVS) is False


def test_auto_eva_on_ppo_takes_no_env_steps_of_its_own() -> None:
    base = make_pretrained("mlp-discrete")
    env = make_vec_env(VARIANTS["mlp-discrete"][0], n_envs=N_ENVS, seed=0)
    model = eva_rl.adapt(
        base,
        env,
        "eva",
        LoraConfig(r=2),
        EvaConfig(batch_size=BATCH, max_batches=60, on_max_batches="warn", data_source="auto"),
        n_steps=N_STEPS,
    )
    assert isinstance(model, EvaPPO) and model.eva_pending
    model.learn(4 * N_STEPS * N_ENVS)
    assert model.policy.eva_report.env_steps == 0 and model.policy.eva_report.skipped_steps == 0


def test_a_run_writes_no_checkpoint_while_eva_reads_its_rollouts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EVA's session and kept rollouts are not saved, so a checkpoint written then could not resume: the first one
    waits until EVA is done."""
    from eva_rl.experiments.environments import import_packages
    from eva_rl.experiments.runs import RunSpec, run
    from eva_rl.experiments.tasks import find_task
    from eva_rl.experiments.training import RunCallback

    base = find_task("PointGoal")
    import_packages(base.env_packages)  # as a run's worker does
    # a 128-step EVA batch and a 512-step rollout: EVA reads several rollouts past the 512-step checkpoint schedule
    task = base.with_overrides(
        {"eva_data": "ppo", "eva.batch_size": 128, "tau": 0.999, "total_timesteps": 4096, "checkpoint_freq": 512}
    )
    pending_at_checkpoint: list[bool] = []
    save = RunCallback.save_checkpoint

    def recording_save(self: RunCallback) -> None:
        pending_at_checkpoint.append(self.model.eva_pending)
        save(self)

    monkeypatch.setattr(RunCallback, "save_checkpoint", recording_save)
    result = run(RunSpec(task, "eva", 0, tmp_path, base.agent_path, "cpu"), progress=False)
    report = json.loads((tmp_path / "PointGoal" / "eva" / "seed0" / "eva.json").read_text())
    assert report["deferred_steps"] >= 512, "the test needs EVA to read a rollout past a checkpoint's step"
    assert pending_at_checkpoint and not any(pending_at_checkpoint)
    assert result.final_return is not None


@pytest.mark.parametrize("on_max_batches", ["raise", "warn"])
def test_a_budget_that_ends_before_eva_converges_trains_on_every_rollout_with_evas_estimate(
    on_max_batches: str,
) -> None:
    base = make_pretrained("mlp-discrete")
    # tau this close to 1 keeps EVA from converging within the three rollouts of the budget
    eva = EvaConfig(batch_size=BATCH, max_batches=60, tau=0.999999, on_max_batches=on_max_batches, data_source="ppo")
    env = make_vec_env(VARIANTS["mlp-discrete"][0], n_envs=N_ENVS, seed=0)
    model = eva_rl.adapt(base, env, "eva", LoraConfig(r=2), eva, n_steps=N_STEPS, batch_size=64, n_epochs=2)
    rollouts = 3
    with pytest.warns(UserWarning, match="the training budget ended after 6 batches"):
        model.learn(rollouts * N_STEPS * N_ENVS)
    report = model.policy.eva_report
    assert not model.eva_pending and report.batches_used == 2 * rollouts
    assert not all(report.converged.values())
    assert report.deferred_steps == (rollouts - 1) * N_STEPS * N_ENVS and report.skipped_steps == 0
    assert model._n_updates == 2 * rollouts, "every rollout of the budget is trained on"
    assert any(layer.lora_B.abs().sum() > 0 for layer in model.policy.lora_layers.values())


def test_stop_training_on_eva_done_stops_at_the_first_step_after_evas_updates() -> None:
    base = make_pretrained("mlp-discrete")
    eva = EvaConfig(batch_size=BATCH, max_batches=60, on_max_batches="warn", data_source="ppo")
    env = make_vec_env(VARIANTS["mlp-discrete"][0], n_envs=N_ENVS, seed=0)
    model = eva_rl.adapt(base, env, "eva", LoraConfig(r=2), eva, n_steps=N_STEPS, batch_size=64, n_epochs=1)
    model.learn(100 * N_STEPS * N_ENVS, callback=eva_rl.StopTrainingOnEvaDone())
    read = math.ceil(model.policy.eva_report.batches_used / 2)  # rollouts EVA read, each trained on once
    assert not model.eva_pending and model._n_updates == read
    assert model.num_timesteps == read * N_STEPS * N_ENVS + N_ENVS  # one step into the next rollout


@pytest.mark.parametrize("data_source", ["ppo", "rollouts"])
def test_the_agents_hyperparameters_carry_over_whatever_evas_data_source(data_source: str) -> None:
    """EvaPPO's constructor takes ``*args, **kwargs``: its hyperparameters are read from PPO's own signature
    (before the fix a gSDE agent got EvaPPO without gSDE, and every setting took SB3's default)."""
    agent = dict(gamma=0.93, gae_lambda=0.8, ent_coef=0.02, max_grad_norm=0.3, vf_coef=0.7, use_sde=True)
    base = PPO("MlpPolicy", "Pendulum-v1", n_steps=64, batch_size=32, seed=0, device="cpu", **agent)
    eva = EvaConfig(batch_size=BATCH, data_source=data_source)
    model = eva_rl.adapt(base, make_vec_env("Pendulum-v1", n_envs=N_ENVS, seed=0), "eva", LoraConfig(r=2), eva)
    assert isinstance(model, EvaPPO) == (data_source == "ppo")
    assert {name: getattr(model, name) for name in agent} == agent
    assert model.policy.log_std.shape == base.policy.log_std.shape  # gSDE's (latent, action) matrix
