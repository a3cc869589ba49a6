"""``eva-rl inspect``: what EVA would do to a policy, without training."""

from __future__ import annotations

from contextlib import closing
from pathlib import Path

from eva_rl.adapt import adapter_plan, eva_from_rollouts
from eva_rl.eva import EvaResult
from eva_rl.eva_logging import allocation_chart
from eva_rl.experiments.environments import agent_env, import_packages
from eva_rl.experiments.tasks import TaskConfig
from eva_rl.loading import load_pretrained
from eva_rl.methods import get_method
from eva_rl.models import wrap_target_env


def inspect_eva(task: TaskConfig, agent_path: Path, device: str = "cpu", progress: bool = True) -> EvaResult:
    """Run EVA for ``task``'s LoRA/EVA settings on rollouts of the agent in the target env (as ``eva`` would)."""
    import_packages(task.env_packages)
    agent = load_pretrained(agent_path, device=device)
    method = get_method("eva")
    lora = method.lora_config(task.lora)
    plan = adapter_plan(agent.model, method, lora, task.eva)
    with closing(agent_env(task, agent, task.n_envs, 0)) as env:
        return eva_from_rollouts(agent.model, wrap_target_env(agent.model, env), plan, task.eva, progress)


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
    captured = {name: result.captured_variance(name) for name in result.ranks}
    plt.imsave(path, allocation_chart(result.ranks, captured))
    return path
