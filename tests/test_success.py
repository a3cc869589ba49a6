"""Success rates: an episode succeeds if the env set ``info["success"]`` at any of its steps (Continual World)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import DummyVecEnv

from eva_rl.errors import ConfigError
from eva_rl.experiments.run_folder import RunResult
from eva_rl.experiments.studies.suite import aggregate, results_markdown
from eva_rl.experiments.suites import Suite, SuiteTask
from eva_rl.experiments.training import evaluate


class Flicker(gym.Env):
    """Five-step episodes whose success shows at step 2 only, in every other episode (``every=2``) or every one."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, every: int = 2, report: bool = True) -> None:
        self.every, self.report, self.episode, self.t = every, report, -1, 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.episode, self.t = self.episode + 1, 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        info = {"success": float(self.t == 2 and self.episode % self.every == 0)} if self.report else {}
        return np.zeros(2, np.float32), 1.0, self.t == 5, False, info


@pytest.mark.parametrize(("every", "report", "expected"), [(1, True, 1.0), (2, True, 4 / 6), (1, False, None)])
def test_the_success_rate_counts_success_at_any_step_of_each_episode(every: int, report: bool, expected) -> None:
    env = DummyVecEnv([lambda: Flicker(every, report)] * 2)
    model = PPO("MlpPolicy", env, n_steps=16, batch_size=16, seed=0, device="cpu")
    # 3 episodes per copy: episodes 0 and 2 of each succeed at step 2 (and never at their last step, 5)
    evaluation = evaluate(model, env, episodes=6, seed=0)
    assert evaluation.mean == 5.0 and evaluation.success_rate == expected


def _run(method: str, seed: int, returns: list[float], rates: list[float] | None) -> RunResult:
    curve = [[1000 * k, value] for k, value in enumerate(returns)]
    return RunResult(
        task="A",
        method=method,
        seed=seed,
        total_timesteps=1000 * (len(returns) - 1),
        jumpstart=returns[0],
        final_return=returns[-1],
        best_return=max(returns),
        eval_curve=curve,
        trainable_params=10,
        total_params=10,
        wall_seconds=1.0,
        success_curve=None if rates is None else [[1000 * k, rate] for k, rate in enumerate(rates)],
    )


def test_a_success_scored_task_compares_success_rates_not_returns() -> None:
    task = SuiteTask("A", threshold=0.5, score="success")
    suite = Suite("s", [task], methods=["eva", "lora"])
    # lora ends with the higher return, eva with the higher success rate: the page must rank by success
    runs = [(task, _run("eva", s, [100.0, 150.0, 200.0], [0.0, 0.4, 0.9]).scored("success")) for s in range(3)]
    runs += [(task, _run("lora", s, [100.0, 400.0, 900.0], [0.0, 0.1, 0.2]).scored("success")) for s in range(3)]
    report = aggregate(suite, runs)
    rows = report.tasks["A"].methods
    assert rows["eva"].final.estimate == pytest.approx(0.9) and rows["lora"].final.estimate == pytest.approx(0.2)
    assert rows["eva"].reached_threshold == 3 and rows["lora"].reached_threshold == 0
    assert report.aggregate["lora"].p_reference_better.estimate == 1.0
    assert "final success" in results_markdown(report) and report.to_dict()["tasks"]["A"]["score"] == "success"


def test_a_run_without_success_cannot_be_scored_by_it() -> None:
    run = _run("eva", 0, [1.0, 2.0], None)
    assert run.scored("return") is run
    with pytest.raises(ConfigError, match="score 'success' needs an env that sets info\\['success'\\]"):
        run.scored("success")


def test_a_suite_task_names_a_bad_score() -> None:
    with pytest.raises(ConfigError, match="score='successes' is invalid: expected one of \\['return', 'success'\\]"):
        SuiteTask("A", threshold=0.5, score="successes")
