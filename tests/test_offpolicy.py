"""SAC, TD3 and DQN agents get adapters like PPO's: on the actor and the critics, mirrored into the target networks;
every method but scratch acts as the pretrained agent at step 0; plain ``SAC.load`` round trips; EVA sees the
critics' (observation, action) inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import DQN, SAC, TD3

import eva_rl
from eva_rl import EvaConfig, LoraConfig
from eva_rl.offpolicy import PretrainedSAC
from eva_rl.policies import target_pairs
from eva_rl.rollouts import RolloutBatches

pytestmark = pytest.mark.filterwarnings("ignore:(EVA|eva|lora|pissa|olora|head):UserWarning")

ALGORITHMS = {"sac": (SAC, "Pendulum-v1"), "td3": (TD3, "Pendulum-v1"), "dqn": (DQN, "CartPole-v1")}
FAST_EVA = EvaConfig(batch_size=64, max_batches=60, on_max_batches="warn")


def pretrained(name: str, seed: int = 0):
    """A small agent whose weights look trained, with its targets lagging behind (as a trained agent's do)."""
    algorithm, env_id = ALGORITHMS[name]
    kwargs = {"policy_kwargs": {"net_arch": [32, 32]}, "buffer_size": 2000, "learning_starts": 50, "seed": seed}
    model = algorithm("MlpPolicy", env_id, device="cpu", **kwargs)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.policy.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def observations(name: str, n: int = 16) -> np.ndarray:
    space = gym.make(ALGORITHMS[name][1]).observation_space
    space.seed(3)
    return np.stack([space.sample() for _ in range(n)])


def outputs(model, obs: np.ndarray) -> list[torch.Tensor]:
    """The actor's greedy actions and every Q-value the policy computes (online and target)."""
    policy = model.policy
    tensor, _ = policy.obs_to_tensor(obs)
    with torch.no_grad():
        if hasattr(policy, "q_net"):
            return [policy.q_net(tensor), policy.q_net_target(tensor)]
        actions = policy._predict(tensor, deterministic=True)
        return [actions, *policy.critic(tensor, actions), *policy.critic_target(tensor, actions)]


def adapt(name: str, method: str, **kwargs):
    base = pretrained(name)
    env = gym.make(ALGORITHMS[name][1])
    return base, eva_rl.adapt(base, env, method, LoraConfig(r=2), FAST_EVA, **kwargs)


@pytest.mark.parametrize("name", list(ALGORITHMS))
@pytest.mark.parametrize("method", ["eva", "lora", "pissa", "dora", "head", "full"])
def test_every_method_acts_as_the_pretrained_agent_at_step_zero(name: str, method: str) -> None:
    base, model = adapt(name, method)
    obs = observations(name)
    online_base = outputs(base, obs)[: len(outputs(base, obs)) // 2 + (0 if name == "dqn" else 1)]
    online_model = outputs(model, obs)[: len(online_base)]
    for got, want in zip(online_model, online_base):
        assert (got - want).abs().max() < 1e-5, method
    assert isinstance(model, ALGORITHMS[name][0])
    # Targets start as copies of the online networks, adapters included.
    for online, target in target_pairs(model.policy):
        online_state, target_state = (
            getattr(model.policy, online).state_dict(),
            getattr(model.policy, target).state_dict(),
        )
        assert online_state.keys() == target_state.keys()
        assert all(torch.equal(online_state[k], target_state[k]) for k in online_state)
        assert not any(p.requires_grad for p in getattr(model.policy, target).parameters()) or method == "full"


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_adapters_cover_actor_and_critics_and_targets_follow_by_polyak(name: str) -> None:
    _, model = adapt(name, "lora", **({"target_update_interval": 50} if name == "dqn" else {}))
    layers = model.policy.lora_layers
    if name == "dqn":
        assert {n for n in layers} == {"q_net.q_net.0", "q_net.q_net.2", "q_net.q_net.4"}
    else:
        assert any(n.startswith("actor.") for n in layers) and any(n.startswith("critic.qf1.") for n in layers)
    assert not any("target" in n for n in layers)
    trainable = {n for n, p in model.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.endswith("log_std") for n in trainable), trainable
    before = {n: p.detach().clone() for n, p in model.policy.named_parameters() if "target" in n and "lora_B" in n}
    model.learn(200)
    moved = [n for n, p in model.policy.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert moved, "the targets' adapters follow the online adapters"


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_plain_load_in_a_fresh_process_merge_and_adapter_checkpoint(name: str, tmp_path: Path) -> None:
    base, model = adapt(name, "eva")
    model.learn(150)  # non-zero B
    obs = observations(name)
    expected = outputs(model, obs)[0].numpy()
    model.save(tmp_path / "model.zip")
    np.save(tmp_path / "obs.npy", obs)
    algorithm = ALGORITHMS[name][0].__name__
    script = (
        f"import numpy as np, torch\nfrom stable_baselines3 import {algorithm}\n"
        f"m = {algorithm}.load({str(tmp_path / 'model.zip')!r}, device='cpu')\n"
        f"obs = np.load({str(tmp_path / 'obs.npy')!r})\n"
        "t, _ = m.policy.obs_to_tensor(obs)\n"
        "with torch.no_grad():\n"
        "    out = m.policy.q_net(t) if hasattr(m.policy, 'q_net') else m.policy._predict(t, deterministic=True)\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, out.numpy())\n"
        "print(type(m.policy).__name__, sorted(m.policy.lora_ranks.items()))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-6)
    assert done.stdout.startswith(type(model.policy).__name__)

    merged = eva_rl.merge(model)
    assert type(merged.policy).__module__.startswith("stable_baselines3")
    np.testing.assert_allclose(outputs(merged, obs)[0].numpy(), expected, atol=1e-5)

    folder = eva_rl.save_adapter(model, tmp_path / "adapter")
    restored = eva_rl.load_adapter(base, folder, env=gym.make(ALGORITHMS[name][1]))
    np.testing.assert_allclose(outputs(restored, obs)[0].numpy(), expected, atol=1e-6)
    assert json.loads((folder / "adapter_config.json").read_text())["policy_class"] == type(model.policy).__name__


def test_eva_sees_the_critics_observation_action_inputs() -> None:
    """The critic's first layer sees [observation, scaled action]; tracking all 4 components makes EVA exact, so its
    directions must match an SVD of exactly those rows (the rollout's observations and actions)."""
    base = pretrained("sac")
    eva = EvaConfig(batch_size=64, rho=2.0, tau=0.999, max_batches=40, on_max_batches="warn", seed=5)
    env = gym.make("Pendulum-v1")
    model = eva_rl.adapt(base, env, "eva", LoraConfig(r=2), eva)
    report = model.policy.eva_report
    assert report.fan_in["critic.qf0.0"] == 3 + 1 and report.shared_inputs.get("critic.qf1.0") == "critic.qf0.0"
    assert any(n.startswith("actor.") and r > 0 for n, r in report.ranks.items())

    vec_env = eva_rl.models.wrap_target_env(base, gym.make("Pendulum-v1"))
    stream = RolloutBatches(base.policy, vec_env, 64, seed=5, with_actions=True)
    batches = []
    for batch in stream:
        batches.append(batch)
        if len(batches) == report.batches_used:
            break
    rows = [np.concatenate(batches[i - 1], axis=1) for i in report.batches_fed["critic.qf0.0"]]
    data = torch.as_tensor(np.concatenate(rows), dtype=torch.float64)
    assert data[:, 3].abs().max() <= 1.0  # actions scaled to [-1, 1], as the replay buffer stores them
    _, _, vt = torch.linalg.svd(data - data.mean(0), full_matrices=False)
    layer = model.policy.lora_layers["critic.qf0.0"]
    directions = layer.lora_A.detach().double()
    cos = torch.nn.functional.cosine_similarity(directions, vt[: layer.r], dim=1).abs()
    assert cos.min() > 0.999, cos


def test_dqn_explores_as_fine_tuning_will() -> None:
    base = pretrained("dqn")
    base.exploration_final_eps = 0.3
    model = eva_rl.adapt(base, gym.make("CartPole-v1"), "lora", LoraConfig(r=2))
    assert model.exploration_initial_eps == 0.3
    scratch = eva_rl.adapt(base, gym.make("CartPole-v1"), "scratch")
    assert scratch.exploration_initial_eps == 1.0
    vec_env = eva_rl.models.wrap_target_env(base, gym.make("CartPole-v1"))
    for rate, expected in ((0.0, 0.0), (0.5, 0.25)):  # half the random actions agree with the greedy one
        stream = RolloutBatches(base.policy, vec_env, 2000, deterministic=True, seed=1, exploration_rate=rate)
        obs = next(iter(stream))
        greedy = base.policy.predict(obs, deterministic=True)[0]
        stream = RolloutBatches(base.policy, vec_env, 2000, deterministic=True, seed=1, exploration_rate=rate,
                                with_actions=True)  # fmt: skip
        obs, taken = next(iter(stream))
        disagree = float(np.mean(taken != base.policy.predict(obs, deterministic=True)[0]))
        assert abs(disagree - expected) < 0.05, (rate, disagree)
        assert greedy.shape == taken.shape


def test_the_warm_up_acts_with_the_pretrained_policy() -> None:
    base = pretrained("td3")
    model = eva_rl.adapt(base, gym.make("Pendulum-v1"), "lora", LoraConfig(r=2))
    scratch = eva_rl.adapt(base, gym.make("Pendulum-v1"), "scratch")
    assert isinstance(model, eva_rl.offpolicy.PretrainedTD3) and type(scratch) is TD3
    model._setup_learn(100)
    _, chosen = model._sample_action(learning_starts=100)  # a warm-up step, as the replay buffer stores it
    greedy = model.policy.scale_action(model.predict(model._last_obs, deterministic=True)[0])
    np.testing.assert_allclose(chosen, np.clip(greedy, -1, 1), atol=1e-6)


def test_sac_learns_with_adapters_only() -> None:
    base, model = adapt("sac", "eva")
    assert isinstance(model, PretrainedSAC)
    frozen = {n: p.detach().clone() for n, p in model.policy.named_parameters() if not p.requires_grad}
    model.learn(300)
    online_frozen = [n for n in frozen if "target" not in n]
    changed = [n for n in online_frozen if not torch.equal(frozen[n], model.policy.get_parameter(n))]
    assert changed == [], changed


@pytest.mark.filterwarnings("ignore:EVA:UserWarning")
@pytest.mark.parametrize("method", ["eva", "lora", "full", "scratch"])
def test_sac_continues_with_the_entropy_coefficient_it_learned(method: str, tmp_path: Path) -> None:
    """SAC learns alpha beside its weights: fine-tuning starts from the agent's value (scratch from SB3's 1.0), keeps
    optimizing the same tensor, and a saved and merged model keeps it too."""
    base = pretrained("sac")
    with torch.no_grad():
        base.log_ent_coef.fill_(float(np.log(0.0118)))  # what rl-zoo3's HalfCheetah SAC ends at
    model = eva_rl.adapt(base, gym.make("Pendulum-v1"), method, LoraConfig(r=2), FAST_EVA)
    expected = 0.0 if method == "scratch" else float(np.log(0.0118))
    assert model.log_ent_coef.item() == pytest.approx(expected, abs=1e-7)
    assert model.ent_coef_optimizer.param_groups[0]["params"][0] is model.log_ent_coef, "the optimizer's tensor"
    if method == "lora":
        assert eva_rl.merge(model).log_ent_coef.item() == pytest.approx(expected, abs=1e-7)
        model.save(tmp_path / "model.zip")
        assert SAC.load(tmp_path / "model.zip", device="cpu").log_ent_coef.item() == pytest.approx(expected, abs=1e-7)


def test_a_fixed_entropy_coefficient_given_for_the_run_is_kept() -> None:
    base = pretrained("sac")
    model = eva_rl.adapt(base, gym.make("Pendulum-v1"), "full", ent_coef=0.2)
    assert getattr(model, "log_ent_coef", None) is None
    assert float(model.ent_coef_tensor) == pytest.approx(0.2)


def test_a_budget_inside_learning_starts_is_an_error_and_the_run_says_how_many_updates_it_makes(
    tmp_path: Path,
) -> None:
    from eva_rl.errors import ConfigError
    from eva_rl.experiments.runs import check_algorithm_settings, updates_in_budget
    from eva_rl.experiments.tasks import TaskConfig
    from eva_rl.loading import load_pretrained

    pretrained("sac").save(tmp_path / "sac.zip")  # learning_starts 50, train_freq 1 step, gradient_steps 1
    agent = load_pretrained(tmp_path / "sac.zip", device="cpu")
    task = TaskConfig(name="p", target_env="Pendulum-v1", n_envs=1, total_timesteps=1000)
    assert updates_in_budget(task, agent)[0] == 950
    assert updates_in_budget(task.with_overrides({"n_envs": 2, "ppo.gradient_steps": 3}), agent)[0] == 475 * 3
    check_algorithm_settings(task, agent)
    with pytest.raises(ConfigError, match=r"total_timesteps=40 makes no update of SAC \(after learning_starts=50"):
        check_algorithm_settings(task.with_overrides({"total_timesteps": 40}), agent)
    with pytest.raises(ConfigError, match="critic_warmup=3 is invalid for SAC: the warm-up is for on-policy"):
        check_algorithm_settings(task.with_overrides({"critic_warmup": 3}), agent)


def test_sacs_replay_buffer_keeps_evas_steps_as_pendulum_computes_them() -> None:
    """EVA's own rollouts go into the replay buffer: the observations and scaled actions EVA's stream took, and
    rewards as Pendulum defines them (computed here from each step's observation and action, not read back)."""
    base = pretrained("sac")
    model = eva_rl.adapt(base, gym.make("Pendulum-v1"), "eva", LoraConfig(r=2), FAST_EVA)
    report = model.policy.eva_report
    buffer = model.replay_buffer
    assert report.replayed_steps == report.env_steps == buffer.size() > 0 and model.num_timesteps == 0
    n = buffer.size()
    obs, next_obs = buffer.observations[:n, 0], buffer.next_observations[:n, 0]
    actions, rewards = buffer.actions[:n, 0], buffer.rewards[:n, 0]
    np.testing.assert_array_equal(obs[1:], next_obs[:-1])  # one unbroken episode (Pendulum truncates at 200)
    assert np.abs(actions).max() <= 1.0  # scaled to [-1, 1], as SAC stores them
    theta = np.arctan2(obs[:, 1], obs[:, 0])
    torque = 2.0 * actions[:, 0]  # unscaled to Pendulum's [-2, 2]
    np.testing.assert_allclose(rewards, -(theta**2 + 0.1 * obs[:, 2] ** 2 + 0.001 * torque**2), rtol=1e-5, atol=1e-5)


def test_dqns_replay_buffer_keeps_the_terminal_observation_of_each_episode_evas_rollouts_ended() -> None:
    base = pretrained("dqn")
    model = eva_rl.adapt(base, gym.make("CartPole-v1"), "eva", LoraConfig(r=2), FAST_EVA)
    buffer = model.replay_buffer
    n = buffer.size()
    assert n == model.policy.eva_report.env_steps > 0
    dones, next_obs = buffer.dones[:n, 0].astype(bool), buffer.next_observations[:n, 0]
    timeouts = buffer.timeouts[:n, 0].astype(bool)
    ended = dones & ~timeouts
    assert ended.any(), "the test needs an episode to end inside EVA's rollouts"
    # CartPole terminates when the cart leaves [-2.4, 2.4] or the pole tilts past 12 degrees: the stored next
    # observation is the one that crossed, not the reset observation that follows
    crossed = (np.abs(next_obs[:, 0]) > 2.4) | (np.abs(next_obs[:, 2]) > 12 * 2 * np.pi / 360)
    np.testing.assert_array_equal(crossed, ended)
    np.testing.assert_array_equal(buffer.observations[1:n, 0][~dones[:-1]], next_obs[:-1][~dones[:-1]])
