"""Measurements of EVA's own cost and accuracy on a task's bundled agent (``scripts/bench.py`` / ``eva-rl bench``
print them as one JSON object on the last line)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from stable_baselines3 import PPO

from eva_rl.adapt import adapt, wrap_target_env
from eva_rl.environments import env_factory, import_packages, make_vec
from eva_rl.eva import layer_input_rows
from eva_rl.finetune import load_agent
from eva_rl.rollouts import RolloutBatches, policy_forward
from eva_rl.tasks import ConfigError, TaskConfig, find_task


class _RecordingBatches:
    """Wraps an iterable and keeps what it yields, to rebuild the exact stream EVA consumed."""

    def __init__(self, batches: RolloutBatches) -> None:
        self.batches = batches
        self.seen: list[Any] = []

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batches:
            self.seen.append(batch)
            yield batch


def ipca_min_cos(model: PPO, ranks: dict[str, int], stream: list[Any], directions: dict[str, torch.Tensor]) -> float:
    """Lowest ``|cos|`` between EVA's directions and exact SVD directions of the same activation stream."""
    rows: dict[str, list[torch.Tensor]] = {name: [] for name, rank in ranks.items() if rank > 0}
    policy = model.policy
    handles = [
        policy.get_submodule(name).register_forward_pre_hook(
            lambda layer, args, name=name: rows[name].append(layer_input_rows(layer, args[0]).double())
        )
        for name in rows
    ]
    with torch.no_grad():
        for batch in stream:
            policy_forward(policy, batch)
    for handle in handles:
        handle.remove()
    worst = 1.0
    for name, parts in rows.items():
        data = torch.cat(parts)
        _, _, vt = torch.linalg.svd(data - data.mean(0), full_matrices=False)
        rank = ranks[name]
        cos = torch.nn.functional.cosine_similarity(directions[name].double().cpu(), vt[:rank].cpu(), dim=1).abs()
        worst = min(worst, float(cos.min()))
    return worst


def measure_lora_throughput(
    model: PPO, task: TaskConfig, steps: int = 2048, repeats: int = 3, seed: int = 0
) -> dict[str, Any]:
    """PPO steps/s of a LoRA-adapted copy of ``model`` against the plain policy, interleaved in one process.

    Both learn on their own copy of the task's target env with its PPO settings; the plain one trains every
    weight, the adapted one only its adapters.
    """
    factory = env_factory(task.target_env, task.wrappers, task.env_kwargs)
    settings = {**task.ppo, "seed": seed, "device": model.device, "verbose": 0}
    adapted = adapt(model, make_vec(factory, task.n_envs, seed), method="lora", lora=task.lora, **settings)
    plain = PPO(type(model.policy), make_vec(factory, task.n_envs, seed), policy_kwargs=model.policy_kwargs, **settings)
    plain.policy.load_state_dict(model.policy.state_dict())
    rates: dict[str, list[float]] = {"plain": [], "lora": []}
    for _ in range(repeats):
        for name, agent in (("plain", plain), ("lora", adapted)):
            start = time.perf_counter()
            agent.learn(steps, reset_num_timesteps=False)
            rates[name].append(steps / (time.perf_counter() - start))
    return {
        "plain_steps_per_s": round(sum(rates["plain"]) / repeats, 1),
        "lora_steps_per_s": round(sum(rates["lora"]) / repeats, 1),
        "lora_ppo_throughput_ratio": round(sum(rates["lora"]) / sum(rates["plain"]), 3),
    }


def measure_eva_cost(
    task_name: str = "MiniGrid-DoorKey", seed: int = 0, device: str = "cpu", throughput_steps: int = 2048
) -> dict[str, Any]:
    """EVA on the task's bundled agent in its target env, with the task's LoRA/EVA settings.

    :return: Batches, env steps and seconds of EVA, the allocation, the lowest ``|cos|`` to exact SVD directions
        of the same stream, PPO throughput of a LoRA policy relative to the plain one (skipped when
        ``throughput_steps`` is 0), the fractions of the task's fine-tuning budget EVA costs, and the machine.
    """
    task = find_task(task_name)
    if task is None or task.agent_path is None:
        raise ConfigError(f"bench needs a task with a bundled agent; {task_name!r} is not one")
    import_packages(task.env_packages)
    source = load_agent(task.agent_path, device=device)
    factory = env_factory(task.target_env, task.wrappers, task.env_kwargs)
    target = make_vec(factory, task.n_envs, seed + 1)
    eva = dataclasses.replace(task.eva, seed=seed)
    start = time.perf_counter()
    adapted = adapt(source, target, method="eva", lora=task.lora, eva=eva, device=device)
    adapt_seconds = time.perf_counter() - start
    report = adapted.policy.eva_report

    # Replay the same stream (same seeds) with a recorder, to compare against exact SVDs of it.
    recorder = _RecordingBatches(
        RolloutBatches(source.policy, wrap_target_env(source, target), eva.batch_size, seed=seed)
    )
    iterator = iter(recorder)
    for _ in range(report["batches_used"]):
        next(iterator)
    directions = {
        name: layer.lora_A.detach().reshape(layer.r, -1) for name, layer in adapted.policy.lora_layers.items()
    }
    min_cos = ipca_min_cos(source, report["ranks"], recorder.seen, directions)
    figures: dict[str, Any] = {
        "task": task.name,
        "target_env": task.target_env,
        "n_envs": task.n_envs,
        "r": task.lora.r,
        "rho": eva.rho,
        "tau": eva.tau,
        "batch_size": eva.batch_size,
        "eva_batches": report["batches_used"],
        "eva_env_steps": report["env_steps"],
        "eva_seconds": round(report["seconds"], 3),
        "adapt_seconds": round(adapt_seconds, 3),
        "ranks": report["ranks"],
        "captured_variance": {k: round(v, 3) for k, v in report["captured_variance"].items()},
        "ipca_min_cos": round(min_cos, 5),
        "finetune_timesteps": task.total_timesteps,
        "eva_env_step_fraction": round(report["env_steps"] / task.total_timesteps, 5),
    }
    if throughput_steps:
        figures.update(measure_lora_throughput(source, task, steps=throughput_steps, seed=seed))
        # The fine-tuning wall time at the measured adapted-policy throughput (evaluations excluded).
        finetune_seconds = task.total_timesteps / figures["lora_steps_per_s"]
        figures["eva_init_fraction"] = round(report["seconds"] / finetune_seconds, 5)
    figures.update(
        device=device,
        torch_threads=torch.get_num_threads(),
        machine=f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__}".strip(),
        numpy=np.__version__,
    )
    return figures


def bench_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eva-rl bench", description=__doc__)
    parser.add_argument("--task", default="MiniGrid-DoorKey", help="a task with a bundled agent")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--throughput-steps", type=int, default=2048, help="PPO steps per timing round; 0 skips")
    parser.add_argument("--quick", action="store_true", help="512 PPO steps per timing round (a smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for small nets)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = 512 if args.quick else args.throughput_steps
    print(json.dumps(measure_eva_cost(args.task, args.seed, args.device, steps)))
    return 0
