"""``eva-rl inspect``: what EVA would do to a policy, without training."""

from __future__ import annotations

from pathlib import Path

from eva_rl.adapt import _run_eva, wrap_target_env
from eva_rl.environments import env_factory, import_packages, make_vec
from eva_rl.eva import EvaResult
from eva_rl.finetune import load_agent
from eva_rl.policies import HEADS
from eva_rl.tasks import TaskConfig
from eva_rl.training import rank_bar_chart


def inspect_eva(task: TaskConfig, agent_path: Path, device: str = "cpu", progress: bool = True) -> EvaResult:
    """Run EVA for ``task``'s LoRA/EVA settings on rollouts of the agent in the target env."""
    import_packages(task.env_packages)
    agent = load_agent(agent_path, device=device)
    env = wrap_target_env(agent, make_vec(env_factory(task.target_env, task.wrappers, task.env_kwargs), task.n_envs, 0))
    exclude = HEADS if task.lora.train_heads else ()
    result = _run_eva(agent, env, task.lora, task.eva, exclude, progress)
    env.close()
    return result


def allocation_table(result: EvaResult) -> str:
    """One row per layer: fan-in, allocated rank, variance captured by it, components tracked, batches."""
    header = f"{'layer':<32} {'fan-in':>6} {'rank':>4} {'captured':>8} {'tracked':>7} {'batches':>7}"
    rows = [
        f"{name:<32} {result.fan_in[name]:>6} {rank:>4} {result.captured_variance(name):>8.3f} "
        f"{result.max_components.get(name, 0):>7} {result.converged_at.get(name, '-'):>7}"
        for name, rank in result.ranks.items()
    ]
    footer = (
        f"rank budget {sum(result.ranks.values())}, {result.batches_used} batches, {result.env_steps} env steps, "
        f"{result.seconds:.2f} s"
    )
    return "\n".join([header, "-" * len(header), *rows, footer])


def save_allocation_png(result: EvaResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, rank_bar_chart(result.ranks))
    return path
