"""The adapter bank: one base agent, many task adapters, switched at run time; outputs identical to each task's
own fine-tuned model, in this process and in a fresh one after save and load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import PPO

import eva_rl
from eva_rl import EvaConfig, LoraConfig
from eva_rl.bank import AdapterBank
from eva_rl.checkpoints import load_adapter, save_adapter
from eva_rl.errors import CheckpointError, ConfigError
from tests.conftest import VARIANTS, make_pretrained

pytestmark = pytest.mark.filterwarnings("ignore:EVA:UserWarning", "ignore:(pissa|olora):UserWarning")
ROOT = Path(__file__).resolve().parents[1]
# Methods that differ in what a task replaces: LoRA factors at EVA's ranks, base weights rewritten as residuals
# (PiSSA), DoRA magnitudes, and no adapters but trained heads.
METHODS = ("eva", "pissa", "eva+dora", "head", "lora")


def fine_tuned(base: PPO, variant: str, method: str, seed: int) -> PPO:
    """``base`` adapted with ``method`` and its trainable tensors moved, as fine-tuning would."""
    model = eva_rl.adapt(
        base, VARIANTS[variant][0](), method=method, lora=LoraConfig(r=2 + seed % 2), eva=EvaConfig(batch_size=64)
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.policy.trainable_parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    return model


def outputs(model: PPO, observations: np.ndarray, actions: np.ndarray) -> list[torch.Tensor]:
    """Values, log-probabilities and entropies of fixed actions: every output of the policy."""
    with torch.no_grad():
        tensor = model.policy.obs_to_tensor(observations)[0]
        values, log_prob, entropy = model.policy.evaluate_actions(tensor, torch.as_tensor(actions))
    return [values, log_prob, entropy]


def samples(variant: str, n: int = 16) -> tuple[np.ndarray, np.ndarray]:
    env = VARIANTS[variant][0]()
    env.observation_space.seed(0)
    env.action_space.seed(0)
    observations = np.stack([env.observation_space.sample() for _ in range(n)])
    return observations, np.stack([env.action_space.sample() for _ in range(n)])


@pytest.fixture(params=["mlp-box", "cnn-discrete"])
def library(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path, dict[str, Path]]:
    """A saved base agent and one saved adapter per method, each fine-tuned differently."""
    variant = request.param
    base = make_pretrained(variant)
    base.save(tmp_path / "base.zip")
    folders = {}
    for seed, method in enumerate(METHODS):
        folders[method] = save_adapter(fine_tuned(base, variant, method, seed), tmp_path / "adapters" / method)
    return variant, tmp_path / "base.zip", folders


def assert_same(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_switching_tasks_gives_each_tasks_own_fine_tuned_outputs(library) -> None:
    variant, base_zip, folders = library
    observations, actions = samples(variant)
    base = PPO.load(base_zip, device="cpu")
    before = {k: v.clone() for k, v in base.policy.state_dict().items()}
    bank = AdapterBank(base, base_zip)
    for name, folder in folders.items():
        bank.add(name, folder, info={"method": name})
    assert bank.active is None and list(bank.tasks) == list(METHODS)
    own = {
        name: outputs(
            load_adapter(PPO.load(base_zip, device="cpu"), folder, env=VARIANTS[variant][0]()), *samples(variant)
        )
        for name, folder in folders.items()
    }
    # every order of switching: each task, then back and forth, including after a task that rewrote base weights
    for name in [*METHODS, "lora", "pissa", "head", "eva", "pissa", "eva+dora", "eva"]:
        bank.activate(name)
        assert_same(outputs(bank.model, observations, actions), own[name])
        action, _ = bank.predict(observations, task=name, deterministic=True)
        np.testing.assert_array_equal(action, own_model_action(folders[name], base_zip, variant, observations))
    # the outputs differ between tasks (the test would pass trivially otherwise)
    assert not torch.equal(own["eva"][1], own["lora"][1])
    bank.deactivate()
    after = base.policy.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, atol=0, rtol=0, msg=key)


def own_model_action(folder: Path, base_zip: Path, variant: str, observations: np.ndarray) -> np.ndarray:
    model = load_adapter(PPO.load(base_zip, device="cpu"), folder, env=VARIANTS[variant][0]())
    return model.predict(observations, deterministic=True)[0]


def test_a_bank_round_trips_in_a_fresh_process(library, tmp_path: Path) -> None:
    variant, base_zip, folders = library
    bank = AdapterBank(PPO.load(base_zip, device="cpu"), base_zip)
    for name, folder in folders.items():
        bank.add(name, folder)
    saved = bank.save(tmp_path / "bank")
    config = json.loads((saved / "bank.json").read_text())
    assert set(config["tasks"]) == set(METHODS) and config["base"]["sha256"]
    assert sorted(p.name for p in (saved / "adapters").iterdir()) == sorted(f"{m}.safetensors" for m in METHODS)
    assert not list(saved.rglob("*.pkl")) and not list(saved.rglob("*.zip")), "no pickle in a bank"
    observations, actions = samples(variant)
    np.save(tmp_path / "obs.npy", observations)
    np.save(tmp_path / "act.npy", actions)
    script = (
        "import sys, numpy as np, torch\n"
        "torch.set_num_threads(int(sys.argv[5]))\n"  # as here: a convolution's sums follow the thread count
        "from eva_rl.bank import AdapterBank\n"
        "bank = AdapterBank.load(sys.argv[1], device='cpu')\n"
        "obs, act = np.load(sys.argv[2]), np.load(sys.argv[3])\n"
        "out = {}\n"
        "for name in bank.tasks:\n"
        "    bank.activate(name)\n"
        "    t = bank.model.policy.obs_to_tensor(obs)[0]\n"
        "    with torch.no_grad():\n"
        "        out[name] = [x.numpy() for x in bank.model.policy.evaluate_actions(t, torch.as_tensor(act))]\n"
        "np.savez(sys.argv[4], **{f'{k}-{i}': v for k, vs in out.items() for i, v in enumerate(vs)})\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(saved), str(tmp_path / "obs.npy"), str(tmp_path / "act.npy"),
         str(tmp_path / "out.npz"), str(torch.get_num_threads())],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    fresh = np.load(tmp_path / "out.npz")
    for name, folder in folders.items():
        model = load_adapter(PPO.load(base_zip, device="cpu"), folder, env=VARIANTS[variant][0]())
        for i, expected in enumerate(outputs(model, observations, actions)):
            np.testing.assert_array_equal(fresh[f"{name}-{i}"], expected.numpy())


def test_a_task_costs_a_small_fraction_of_a_full_copy(tmp_path: Path) -> None:
    base = make_pretrained("cnn-discrete")
    bank = AdapterBank(make_pretrained("cnn-discrete"))
    bank.add("eva", fine_tuned(base, "cnn-discrete", "eva", 0))
    task = bank.tasks["eva"]
    full = bank.base_nbytes()
    expected_full = sum(p.numel() * 4 for p in base.policy.parameters())
    assert full == expected_full  # every parameter once, float32
    assert sum(np.prod(v.shape) * 4 for v in task.tensors.values()) == task.nbytes
    assert task.nbytes < full / 5


def test_bad_names_foreign_adapters_and_changed_bases_are_clear_errors(tmp_path: Path) -> None:
    base = make_pretrained("mlp-box")
    base.save(tmp_path / "base.zip")
    bank = AdapterBank(PPO.load(tmp_path / "base.zip", device="cpu"), tmp_path / "base.zip")
    bank.add("a", fine_tuned(base, "mlp-box", "lora", 0))
    with pytest.raises(ConfigError, match="task 'a' is already in the bank"):
        bank.add("a", fine_tuned(base, "mlp-box", "lora", 1))
    with pytest.raises(ConfigError, match="task name 'x/y' is invalid"):
        bank.add("x/y", fine_tuned(base, "mlp-box", "lora", 1))
    with pytest.raises(ConfigError, match=r"task 'b' is not in the bank; it has \['a'\]"):
        bank.activate("b")
    foreign = save_adapter(fine_tuned(make_pretrained("mlp-discrete"), "mlp-discrete", "lora", 0), tmp_path / "f")
    with pytest.raises(CheckpointError, match="'foreign'"):
        bank.add("foreign", foreign)
    assert list(bank.tasks) == ["a"] and bank.active is None
    with pytest.raises(ConfigError, match="already has adapters"):
        AdapterBank(fine_tuned(base, "mlp-box", "lora", 0))
    bank.save(tmp_path / "bank")
    make_pretrained("mlp-box", seed=3).save(tmp_path / "base.zip")  # the base file changes under the bank
    with pytest.raises(CheckpointError, match="is not the one the bank was saved with"):
        AdapterBank.load(tmp_path / "bank")
    with pytest.raises(CheckpointError, match="is not an eva-rl adapter bank"):
        AdapterBank.load(tmp_path)
    saved = json.loads((tmp_path / "bank" / "bank.json").read_text())
    broken_bases = [(None, r"base=None is invalid: expected \{'path'"), ({"path": "gone.zip"}, "is not there")]
    for recorded, message in broken_bases:
        (tmp_path / "broken").mkdir(exist_ok=True)
        (tmp_path / "broken" / "bank.json").write_text(json.dumps({**saved, "base": recorded}))
        with pytest.raises(CheckpointError, match=message):
            AdapterBank.load(tmp_path / "broken")
    # a task whose file holds other tensors than bank.json lists
    (tmp_path / "bank" / "bank.json").write_text(
        (tmp_path / "bank" / "bank.json").read_text().replace('"keys": [', '"keys": ["extra", ')
    )
    with pytest.raises(CheckpointError, match="holds other tensors than bank.json lists for task 'a'"):
        AdapterBank.load(tmp_path / "bank", base=PPO.load(tmp_path / "base.zip", device="cpu"))


def test_evaluate_runs_each_task_and_the_base(tmp_path: Path) -> None:
    base = make_pretrained("mlp-discrete")
    bank = AdapterBank(PPO.load(_saved(base, tmp_path), device="cpu"))
    bank.add("t", fine_tuned(base, "mlp-discrete", "lora", 0))
    env = gym.make("CartPole-v1")
    mean, std = bank.evaluate("t", env, n_eval_episodes=2)
    assert bank.active == "t" and np.isfinite(mean) and std >= 0
    bank.evaluate(None, env, n_eval_episodes=1)
    assert bank.active is None


def _saved(model: PPO, folder: Path) -> Path:
    model.save(folder / "base.zip")
    return folder / "base.zip"


def probabilities(model: PPO, observations: np.ndarray) -> np.ndarray:
    """The policy's action probabilities (PointGoal's actions are discrete: a small shift moves no argmax)."""
    with torch.no_grad():
        tensor = model.policy.obs_to_tensor(observations)[0]
        return model.policy.get_distribution(tensor).distribution.probs.numpy()


def test_a_task_whose_run_moved_its_observation_statistics_acts_as_that_run(
    normalized_agent: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A run with update_obs_stats ends with its own VecNormalize statistics: through the bank (and after save and
    load), the task acts on observations as that run's model does, which it does not with the base agent's
    statistics."""
    from stable_baselines3.common.vec_env import unwrap_vec_normalize

    from eva_rl.experiments.environments import agent_env
    from eva_rl.experiments.runs import RunSpec, run
    from eva_rl.experiments.tasks import find_task
    from eva_rl.loading import load_agent, load_pretrained

    task = find_task("PointGoal").with_overrides(
        {"total_timesteps": 1024, "n_envs": 2, "ppo.n_steps": 128, "update_obs_stats": True, "eval_episodes": 4}
    )
    run(RunSpec(task, "lora", 0, tmp_path, normalized_agent, "cpu"), progress=False)
    run_dir = tmp_path / "PointGoal" / "lora" / "seed0"
    agent = load_pretrained(normalized_agent, device="cpu")
    space = agent.model.observation_space
    space.seed(0)
    raw = np.stack([space.sample() for _ in range(32)])
    # the run's own model, with the statistics it ended with
    env = agent_env(task, agent, 1, 0, evaluation=True, stats=run_dir / "vecnormalize.pkl")
    model = load_agent(run_dir / "model.zip", device="cpu")
    expected = probabilities(model, unwrap_vec_normalize(env).normalize_obs(raw))

    def actions(bank: AdapterBank, prepared: bool = True) -> np.ndarray:
        env = agent_env(task, agent, 1, 0, evaluation=True)
        bank.activate("goal")
        if prepared:
            bank.prepare_env("goal", env)
        return probabilities(bank.model, unwrap_vec_normalize(env).normalize_obs(raw))

    bank = AdapterBank(load_agent(normalized_agent, device="cpu"), normalized_agent)
    bank.add("goal", run_dir / "adapter")
    assert bank.tasks["goal"].normalization is not None
    np.testing.assert_allclose(actions(bank), expected, atol=1e-6)
    assert np.abs(actions(bank, prepared=False) - expected).max() > 1e-4, "the base agent's statistics differ"
    np.testing.assert_allclose(
        actions(AdapterBank.load(bank.save(tmp_path / "bank"), device="cpu")), expected, atol=1e-6
    )

    # damaged statistics: one error line through the command line, no traceback
    from eva_rl.experiments.cli import main
    from tests.test_bad_input import one_error_line

    saved = (tmp_path / "bank" / "bank.json").read_text()
    bad_count = saved.replace('"normalization_count": ', '"normalization_count": "many", "was": ')
    for text, damage, message in [
        (bad_count, None, "normalization_count='many' is invalid: expected a number >= 0"),
        (saved, b"not safetensors", "cannot be read as safetensors"),
    ]:
        (tmp_path / "bank" / "bank.json").write_text(text)
        if damage is not None:
            (tmp_path / "bank" / "normalization" / "goal.safetensors").write_bytes(damage)
        assert main(["inspect", str(tmp_path / "bank")]) == 2
        assert message in one_error_line(capsys.readouterr().err)
