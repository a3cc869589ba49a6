"""``eva-rl inspect``: what EVA would do to a policy, without training."""

from __future__ import annotations

from contextlib import closing
from pathlib import Path

from eva_rl.adapt import adapter_plan, eva_from_rollouts
from eva_rl.bank import AdapterBank
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


def bank_table(bank: AdapterBank, returns: dict[str, float] | None = None) -> str:
    """One row per task of ``bank``: method, adapted layers, rank budget, bytes and the fraction of a full copy."""
    full = bank.base_nbytes()
    header = f"{'task':<24} {'method':<10} {'layers':>6} {'ranks':>5} {'bytes':>10} {'of a copy':>9}"
    header += f" {'return':>8}" if returns else ""
    rows = []
    for name, task in bank.tasks.items():
        row = (
            f"{name:<24} {task.method or '-':<10} {len(task.ranks):>6} {sum(task.ranks.values()):>5} "
            f"{task.nbytes:>10,} {task.nbytes / full:>9.3f}"
        )
        rows.append(row + (f" {returns[name]:>8.3f}" if returns else ""))
    total = sum(task.nbytes for task in bank.tasks.values())
    footer = (
        f"base agent {full:,} bytes ({bank.base_path}); {len(bank.tasks)} tasks {total:,} bytes in all: the bank holds "
        f"{(full + total) / full:.2f} networks' worth where one full copy per task would hold {len(bank.tasks)}"
    )
    return "\n".join([header, "-" * len(header), *rows, footer])
