"""Measurements of EVA's own cost and accuracy on a MiniGrid transfer (``scripts/bench.py`` / ``eva-rl bench``
print them as one JSON object on the last line)."""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Iterator, Sequence
from typing import Any

import gymnasium as gym
import minigrid  # noqa: F401  (registers the MiniGrid ids)
import numpy as np
import torch
from minigrid.wrappers import ImgObsWrapper
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env

from eva_rl.adapt import adapt, wrap_target_env
from eva_rl.config import EvaConfig, LoraConfig
from eva_rl.eva import layer_input_rows
from eva_rl.extractors import MinigridCNN
from eva_rl.rollouts import RolloutBatches, policy_forward


def minigrid_vec_env(env_id: str, n_envs: int, seed: int) -> Any:
    """``n_envs`` copies of a MiniGrid env reduced to its 7x7x3 egocentric image."""
    return make_vec_env(env_id, n_envs=n_envs, seed=seed, wrapper_class=ImgObsWrapper)


def pretrain_cnn_agent(env_id: str, steps: int, seed: int = 0, device: str = "cpu") -> PPO:
    """A PPO CnnPolicy agent (MiniGrid-docs CNN) trained for ``steps`` on ``env_id``."""
    model = PPO(
        "CnnPolicy",
        minigrid_vec_env(env_id, 8, seed),
        n_steps=128,
        batch_size=64,
        ent_coef=0.01,
        learning_rate=2.5e-4,
        seed=seed,
        device=device,
        policy_kwargs={"features_extractor_class": MinigridCNN, "features_extractor_kwargs": {"features_dim": 128}},
    )
    return model.learn(steps) if steps > 0 else model


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
    model: PPO, env_id: str, steps: int = 2048, repeats: int = 3, r: int = 4, seed: int = 0
) -> dict[str, Any]:
    """PPO steps/s of a LoRA-adapted copy of ``model`` against the plain policy, interleaved in one process.

    Both learn on their own copy of the same env; the plain one is fully trained (every weight has a gradient),
    the adapted one trains only its adapters.
    """
    adapted = adapt(model, minigrid_vec_env(env_id, model.n_envs, seed), method="lora", lora=LoraConfig(r=r))
    plain = PPO(
        type(model.policy),
        minigrid_vec_env(env_id, model.n_envs, seed),
        policy_kwargs=model.policy_kwargs,
        **{k: getattr(model, k) for k in ("n_steps", "batch_size", "n_epochs", "learning_rate", "ent_coef")},
        seed=seed,
        device=model.device,
    )
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
    source_env: str = "MiniGrid-DoorKey-5x5-v0",
    target_env: str = "MiniGrid-DoorKey-8x8-v0",
    pretrain_steps: int = 20_000,
    n_envs: int = 8,
    r: int = 4,
    rho: float = 2.0,
    tau: float = 0.99,
    batch_size: int = 256,
    seed: int = 0,
    device: str = "cpu",
    throughput_steps: int = 2048,
) -> dict[str, Any]:
    """Pretrain briefly on ``source_env``, run EVA on rollouts in ``target_env``, and report its cost.

    :return: Batches, env steps and seconds of EVA (``adapt`` end to end and the EVA part alone), the rank
        allocation, the lowest ``|cos|`` to exact SVD directions of the same stream, the PPO throughput of a
        LoRA policy relative to the plain one (skipped when ``throughput_steps`` is 0), and the machine.
    """
    start = time.perf_counter()
    source = pretrain_cnn_agent(source_env, pretrain_steps, seed, device)
    pretrain_seconds = time.perf_counter() - start

    target = minigrid_vec_env(target_env, n_envs, seed + 1)
    eva = EvaConfig(rho=rho, tau=tau, batch_size=batch_size, seed=seed)
    start = time.perf_counter()
    adapted = adapt(source, target, method="eva", lora=LoraConfig(r=r), eva=eva)
    adapt_seconds = time.perf_counter() - start
    report = adapted.policy.eva_report

    # Replay the same stream (same seeds) with a recorder, to compare against exact SVDs of it.
    recorder = _RecordingBatches(RolloutBatches(source.policy, wrap_target_env(source, target), batch_size, seed=seed))
    iterator = iter(recorder)
    for _ in range(report["batches_used"]):
        next(iterator)
    directions = {
        name: layer.lora_A.detach().reshape(layer.r, -1) for name, layer in adapted.policy.lora_layers.items()
    }
    min_cos = ipca_min_cos(source, report["ranks"], recorder.seen, directions)
    throughput = (
        measure_lora_throughput(source, target_env, steps=throughput_steps, r=r, seed=seed) if throughput_steps else {}
    )
    return {
        "source_env": source_env,
        "target_env": target_env,
        "pretrain_steps": pretrain_steps,
        "pretrain_seconds": round(pretrain_seconds, 2),
        "n_envs": n_envs,
        "r": r,
        "rho": rho,
        "tau": tau,
        "batch_size": batch_size,
        "eva_batches": report["batches_used"],
        "eva_env_steps": report["env_steps"],
        "eva_seconds": round(report["seconds"], 3),
        "adapt_seconds": round(adapt_seconds, 3),
        "ranks": report["ranks"],
        "captured_variance": {k: round(v, 3) for k, v in report["captured_variance"].items()},
        "ipca_min_cos": round(min_cos, 5),
        **throughput,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.__version__}".strip(),
        "numpy": np.__version__,
        "gymnasium": gym.__version__,
    }


def bench_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eva-rl bench", description=__doc__)
    parser.add_argument("--source-env", default="MiniGrid-DoorKey-5x5-v0")
    parser.add_argument("--target-env", default="MiniGrid-DoorKey-8x8-v0")
    parser.add_argument("--pretrain-steps", type=int, default=20_000)
    parser.add_argument("--n-envs", type=int, default=8)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--rho", type=float, default=2.0)
    parser.add_argument("--tau", type=float, default=0.99)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--throughput-steps", type=int, default=2048, help="PPO steps per timing round; 0 skips")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for small nets)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    figures = measure_eva_cost(
        args.source_env,
        args.target_env,
        args.pretrain_steps,
        args.n_envs,
        args.rank,
        args.rho,
        args.tau,
        args.batch_size,
        args.seed,
        args.device,
        args.throughput_steps,
    )
    print(json.dumps(figures))
    return 0
