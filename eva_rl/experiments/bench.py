"""Measurements of EVA's own cost and accuracy on a task's bundled agent (``scripts/bench.py`` / ``eva-rl bench``
print them as one JSON object on the last line)."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing as closing_env
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.vec_env import VecEnv

from eva_rl.adapt import adapt
from eva_rl.callbacks import CachedAdapterWeights, StopTrainingOnEvaDone
from eva_rl.config import EvaConfig
from eva_rl.errors import ConfigError
from eva_rl.eva import layer_input_rows
from eva_rl.experiments.environments import env_factory, import_packages, make_vec
from eva_rl.experiments.execute import in_fresh_process
from eva_rl.experiments.tasks import TaskConfig, find_task, known_tasks
from eva_rl.experiments.training import eval_mode, evaluate
from eva_rl.inject import lora_layers
from eva_rl.layers import LoraLinear, cached_adapter_weights, keep_adapted_weights
from eva_rl.loading import algorithm_name, load_agent
from eva_rl.models import wrap_target_env
from eva_rl.rollouts import RolloutBatches, policy_forward


class _RecordingBatches:
    """Wraps an iterable and keeps what it yields, to rebuild the exact stream EVA consumed."""

    def __init__(self, batches: RolloutBatches) -> None:
        self.batches = batches
        self.seen: list[Any] = []

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batches:
            self.seen.append(batch)
            yield batch


def ipca_min_cos(
    model: PPO,
    ranks: dict[str, int],
    stream: list[Any],
    directions: dict[str, torch.Tensor],
    batches_fed: dict[str, list[int]] | None = None,
) -> float:
    """Lowest ``|cos|`` between EVA's directions and exact SVD directions of the same activation stream.

    :param batches_fed: ``{layer: batch numbers (from 1)}`` its PCA consumed (EVA's report); each layer is then
        compared with an SVD of exactly its own rows. ``None`` compares every layer with the whole ``stream``.
    """
    # Every adapted layer's input rows over the stream, hooked as EVA hooks them.
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
    # The oracle: an exact SVD of the centred rows each layer's PCA consumed.
    worst = 1.0
    for name, parts in rows.items():
        if batches_fed is not None:
            parts = [parts[number - 1] for number in batches_fed[name]]
        data = torch.cat(parts)
        _, _, vt = torch.linalg.svd(data - data.mean(0), full_matrices=False)
        rank = ranks[name]
        cos = torch.nn.functional.cosine_similarity(directions[name].double().cpu(), vt[:rank].cpu(), dim=1).abs()
        worst = min(worst, float(cos.min()))
    return worst


def _target_ppo(task: TaskConfig, seed: int, device: Any, env_seed: int | None = None) -> tuple[Any, dict[str, Any]]:
    """A fresh vectorized copy of the task's target env (seeded ``env_seed``, default ``seed``) and the task's PPO
    settings with ``seed`` and ``device``."""
    factory = env_factory(task.target_env, task.wrappers, task.env_kwargs)
    env = make_vec(factory, task.n_envs, seed if env_seed is None else env_seed)
    return env, {**task.ppo, "seed": seed, "device": device, "verbose": 0}


def _bundled_agent(task_name: str, device: Any) -> tuple[TaskConfig, BaseAlgorithm]:
    """The task ``task_name`` and its bundled agent, loaded on ``device`` (its env packages imported).

    :raises ConfigError: for a name that is not a task with a bundled agent.
    """
    task = find_task(task_name)
    if task is None or task.agent_path is None:
        with_agents = [name for name in known_tasks() if getattr(find_task(name), "agent_path", None) is not None]
        raise ConfigError(f"bench: {task_name!r} is not a task with a bundled agent; these are: {with_agents}")
    import_packages(task.env_packages)
    return task, load_agent(task.agent_path, device=device)


def measure_lora_throughput(
    model: BaseAlgorithm,
    task: TaskConfig,
    steps: int = 2048,
    repeats: int = 3,
    seed: int = 0,
    cached_weights: bool = True,
    path: str = "auto",
) -> dict[str, Any]:
    """Training steps/s of a LoRA-adapted copy of ``model`` against the plain policy, interleaved in one process.

    Both learn on their own copy of the task's target env with its settings, with ``model``'s algorithm; the plain
    one (full fine-tuning) trains every weight, the adapted one only its adapters. The ratio's key names the
    algorithm (``lora_ppo_throughput_ratio``, ``lora_sac_throughput_ratio``).

    :param cached_weights: The adapted policy keeps its weights between calls without gradients (its default) and
        both learn with :class:`~eva_rl.callbacks.CachedAdapterWeights`, as eva-rl's runs do (it changes nothing for
        the plain policy); ``False``: every call computes ``W + s B A``.
    :param path: How the LoRA layers compute (:meth:`~eva_rl.layers.LoraLayer.set_path`).
    """
    env, settings = _target_ppo(task, seed, model.device)
    adapted = adapt(model, env, method="lora", lora=task.lora, **settings)
    layers = lora_layers(adapted.policy).values()
    for layer in layers:
        layer.set_path(path)
    if not cached_weights:  # every call computes W + s B A again (eva-rl's policies keep it by default)
        keep_adapted_weights(layers, keep=False)
    plain_env, _ = _target_ppo(task, seed, model.device)
    plain = adapt(model, plain_env, method="full", **settings)
    algorithm = algorithm_name(model)
    # Interleaved rounds, so a slower stretch of the machine weighs on both alike.
    rates: dict[str, list[float]] = {"plain": [], "lora": []}
    for _ in range(repeats):
        for name, agent in (("plain", plain), ("lora", adapted)):
            start = time.perf_counter()
            agent.learn(steps, callback=CachedAdapterWeights() if cached_weights else None, reset_num_timesteps=False)
            rates[name].append(steps / (time.perf_counter() - start))
    return {
        "plain_steps_per_s": round(sum(rates["plain"]) / repeats, 1),
        "lora_steps_per_s": round(sum(rates["lora"]) / repeats, 1),
        f"lora_{algorithm}_throughput_ratio": round(sum(rates["lora"]) / sum(rates["plain"]), 3),
    }


def measure_offpolicy_throughput(
    task_name: str, seed: int = 0, device: str = "cpu", steps: int = 1000
) -> dict[str, Any]:
    """:func:`measure_lora_throughput` for the off-policy agent a task bundles (LoRA-SAC against plain SAC)."""
    task, model = _bundled_agent(task_name, device)
    return {"task": task.name, "algorithm": type(model).__name__, "steps": steps,
            **measure_lora_throughput(model, task, steps=steps, repeats=3, seed=seed)}  # fmt: skip


_PROFILE_PARTS = {
    "collect_rollouts": ("on_policy_algorithm.py", "collect_rollouts"),
    "env_step": ("dummy_vec_env.py", "step_wait"),
    "train": ("ppo.py", "train"),
    "backward": ("_tensor.py", "backward"),
    "optimizer_step": ("adam.py", "step"),
    "lora_adapted_weight": ("layers.py", "adapted_weight"),
}


def profile_lora_ppo(model: PPO, task: TaskConfig, steps: int = 4096, seed: int = 0) -> dict[str, float]:
    """Where a LoRA-adapted PPO spends its time: cumulative seconds of the main parts, from ``cProfile``.

    :return: ``{part: seconds}`` for :data:`_PROFILE_PARTS` plus ``total``; ``lora_adapted_weight`` is the
        adapter's own overhead (``W + s B A``, once per Linear/Conv2d call).
    """
    import cProfile
    import pstats

    env, settings = _target_ppo(task, seed, model.device)
    adapted = adapt(model, env, method="lora", lora=task.lora, **settings)
    adapted.learn(task.ppo.get("n_steps", 2048) * task.n_envs)  # warm-up
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(adapted.learn, steps, reset_num_timesteps=False)
    figures = {"total": time.perf_counter() - start}
    stats = pstats.Stats(profiler).stats  # {(file, line, function): (calls, prims, tottime, cumtime, callers)}
    for part, (file_suffix, function) in _PROFILE_PARTS.items():
        figures[part] = sum(v[3] for k, v in stats.items() if k[0].endswith(file_suffix) and k[2] == function)
    return {part: round(seconds, 3) for part, seconds in figures.items()}


def measure_eva_from_ppo(model: PPO, task: TaskConfig, eva: EvaConfig, device: str = "cpu") -> dict[str, Any]:
    """EVA on PPO's own first rollouts (``data_source="ppo"``): no env steps of its own and no update lost; the
    rollouts before the one where EVA converged wait for their updates (``ppo_source_deferred_steps``)."""
    env, settings = _target_ppo(task, eva.seed, device, env_seed=eva.seed + 1)
    eva = dataclasses.replace(eva, data_source="ppo")
    adapted = adapt(model, env, method="eva", lora=task.lora, eva=eva, **settings)
    # the task's whole budget is EVA's to converge in, and learning stops at the first step after it has
    adapted.learn(task.total_timesteps, callback=StopTrainingOnEvaDone())
    report = adapted.policy.eva_report
    return {
        "ppo_source_eva_batches": report.batches_used,
        "ppo_source_skipped_steps": report.skipped_steps,
        "ppo_source_deferred_steps": report.deferred_steps,
        "ppo_source_eva_env_step_fraction": round(report.skipped_steps / task.total_timesteps, 5),
        "ppo_source_ranks": report.ranks,
    }


EXTRA_COMPONENTS = 16
"""``EvaConfig.extra_components`` of bench's accuracy comparison."""


def _replayed_min_cos(source: PPO, target: VecEnv, adapted: PPO, eva: EvaConfig) -> tuple[float, float]:
    """Replay the stream EVA consumed (same seeds) with a recorder and compare to exact SVDs: of the rows each
    layer's PCA consumed (the incremental SVD's accuracy), and of the whole stream (what stopping a layer once it
    converged leaves out)."""
    report = adapted.policy.eva_report
    recorder = _RecordingBatches(
        RolloutBatches(source.policy, wrap_target_env(source, target), eva.batch_size, seed=eva.seed)
    )
    iterator = iter(recorder)
    for _ in range(report.batches_used):
        next(iterator)
    directions = {
        name: layer.lora_A.detach().reshape(layer.r, -1) for name, layer in adapted.policy.lora_layers.items()
    }
    return (
        ipca_min_cos(source, report.ranks, recorder.seen, directions, report.batches_fed),
        ipca_min_cos(source, report.ranks, recorder.seen, directions),
    )


def measure_eva_cost(
    task_name: str = "MiniGrid-DoorKey", seed: int = 0, device: str = "cpu", throughput_steps: int = 2048
) -> dict[str, Any]:
    """EVA on the task's bundled agent in its target env, with the task's LoRA/EVA settings.

    :return: Batches, env steps and seconds of EVA, the allocation, the lowest ``|cos|`` to exact SVD directions
        of the same stream, PPO throughput of a LoRA policy relative to the plain one (skipped when
        ``throughput_steps`` is 0), the fractions of the task's fine-tuning budget EVA costs, and the machine.
    """
    task, source = _bundled_agent(task_name, device)
    factory = env_factory(task.target_env, task.wrappers, task.env_kwargs)
    target = make_vec(factory, task.n_envs, seed + 1)
    # EVA on its own rollouts, whose env steps, seconds and accuracy are measured here (measure_eva_from_ppo measures
    # EVA on PPO's first rollouts, the task's own setting)
    eva = dataclasses.replace(task.eva, seed=seed, data_source="rollouts")
    start = time.perf_counter()
    adapted = adapt(source, target, method="eva", lora=task.lora, eva=eva, device=device)
    adapt_seconds = time.perf_counter() - start
    report = adapted.policy.eva_report
    min_cos, stream_min_cos = _replayed_min_cos(source, target, adapted, eva)
    # The same with extra tracked components (less truncation in the incremental SVD), and what they cost.
    accurate = dataclasses.replace(eva, extra_components=EXTRA_COMPONENTS)
    adapted_accurate = adapt(source, target, method="eva", lora=task.lora, eva=accurate, device=device)
    accurate_report = adapted_accurate.policy.eva_report
    accurate_min_cos, accurate_stream_min_cos = _replayed_min_cos(source, target, adapted_accurate, accurate)
    figures: dict[str, Any] = {
        "task": task.name,
        "target_env": task.target_env,
        "n_envs": task.n_envs,
        "r": task.lora.r,
        "rho": eva.rho,
        "tau": eva.tau,
        "batch_size": eva.batch_size,
        "eva_batches": report.batches_used,
        "eva_env_steps": report.env_steps,
        "eva_seconds": round(report.seconds, 3),
        "adapt_seconds": round(adapt_seconds, 3),
        "ranks": report.ranks,
        "captured_variance": {k: round(v, 3) for k, v in report.captured_variance.items()},
        "ipca_min_cos": round(min_cos, 5),
        "stream_min_cos": round(stream_min_cos, 5),
        f"ipca_min_cos_extra{EXTRA_COMPONENTS}": round(accurate_min_cos, 5),
        f"stream_min_cos_extra{EXTRA_COMPONENTS}": round(accurate_stream_min_cos, 5),
        f"eva_seconds_extra{EXTRA_COMPONENTS}": round(accurate_report.seconds, 3),
        f"eva_batches_extra{EXTRA_COMPONENTS}": accurate_report.batches_used,
        "finetune_timesteps": task.total_timesteps,
        "eva_env_step_fraction": round(report.env_steps / task.total_timesteps, 5),
    }
    figures.update(measure_eva_from_ppo(source, task, eva, device))
    if throughput_steps:
        figures.update(measure_lora_throughput(source, task, steps=throughput_steps, seed=seed))
        # The fine-tuning wall time at the measured adapted-policy throughput (evaluations excluded).
        finetune_seconds = task.total_timesteps / figures["lora_steps_per_s"]
        figures["eva_init_fraction"] = round(report.seconds / finetune_seconds, 5)
        figures["lora_ppo_profile_seconds"] = profile_lora_ppo(source, task, steps=2 * throughput_steps, seed=seed)
    figures.update(
        device=device,
        torch_threads=torch.get_num_threads(),
        machine=f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__}".strip(),
        numpy=np.__version__,
    )
    return figures


def _synthetic_batches(width: int, batch_size: int, count: int, device: str, seed: int) -> Iterator[torch.Tensor]:
    """Activations with a decaying spectrum (variance 1/i along axis i), generated lazily like a rollout stream."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.arange(1, width + 1, dtype=torch.float32).rsqrt()
    for _ in range(count):
        yield (torch.randn(batch_size, width, generator=generator) * scales).to(device)


def _reset_peak(device: str) -> int:
    """Reset the peak-memory mark and return the memory in use now (bytes)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets the peak resident set (VmHWM) to the current one
    return _proc_status_bytes("VmRSS")


def _peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_bytes("VmHWM")


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _scaling_point(width: int, batch_size: int, batches: int, r: int, device: str, seed: int) -> dict[str, Any]:
    """EVA on one ``width x width`` Linear layer; run in a fresh process, so the CPU peak-RSS mark is its own."""
    import warnings

    from eva_rl.eva import compute_eva

    torch.set_num_threads(1)
    layer = torch.nn.Linear(width, width).to(device)
    # A tiny EVA first, so lazily loaded kernels and allocator pools do not count as EVA's memory.
    compute_eva(torch.nn.Linear(16, 16).to(device), _synthetic_batches(16, 64, 3, device, seed), r=2, tau=0.0)
    before = _reset_peak(device)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tau=1 never converges on purpose: every point runs all its batches
        result = compute_eva(
            layer,
            _synthetic_batches(width, batch_size, batches, device, seed),
            r=r,
            tau=1.0,
            max_batches=batches,
            on_max_batches="warn",
            seed=seed,
        )
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "width": width,
        "batch_size": batch_size,
        "batches": result.batches_used,
        "ms_per_batch": round(1000 * seconds / result.batches_used, 3),
        "peak_mib": round((_peak_bytes(device) - before) / 2**20, 2),
    }


def measure_eva_scaling(
    widths: Sequence[int] = (64, 256, 1024, 4096),
    batch_sizes: Sequence[int] = (256, 1024),
    batches: int = 10,
    r: int = 4,
    device: str = "cpu",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """EVA's time per batch and peak memory on one Linear layer against its width and the batch size.

    Each point runs in a fresh process. Peak memory is the peak during EVA above what was in use before it (a batch
    of activations included): on CPU from the process's peak resident set (Linux ``VmHWM``, reset first), on CUDA
    from the allocator's peak.

    :param batches: Batches per point (``tau=1`` keeps EVA from stopping early).
    :param r: LoRA rank; EVA tracks ``round(r * 2)`` components (rho 2).
    """
    return [
        in_fresh_process(_scaling_point, width, batch_size, batches, r, device, seed)
        for width in widths
        for batch_size in batch_sizes
    ]


def _eva_against_peft_point(width: int, device: str, batch_size: int, batches: int, r: int, seed: int) -> dict:
    """One width of :func:`measure_eva_against_peft`, in a fresh process (one torch thread)."""
    import warnings

    from peft import EvaConfig as PeftEvaConfig
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.lora.eva import get_eva_state_dict

    from eva_rl.eva import compute_eva

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width), torch.nn.ReLU()
    ).to(device)
    stream = list(_synthetic_batches(width, batch_size, batches, device, seed))
    targets = ["0", "2"]

    def ours() -> Any:  # peft seeds its randomized SVD with 42
        return compute_eva(model, stream, r=r, rho=2.0, tau=0.99, target_modules=targets, max_batches=None, seed=42)

    def peft() -> Any:
        config = PeftLoraConfig(
            r=r, target_modules=targets, init_lora_weights="eva", eva_config=PeftEvaConfig(rho=2.0, tau=0.99)
        )
        return get_eva_state_dict(
            model,
            dataloader=stream,
            peft_config=config,
            forward_fn=lambda module, batch: module(batch),
            prepare_model_inputs_fn=None,
            prepare_layer_inputs_fn=None,
            show_progress_bar=False,
        )

    seconds: dict[str, list[float]] = {"ours": [], "peft": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):  # interleaved, the best of three each
            for name, function in (("ours", ours), ("peft", peft)):
                start = time.perf_counter()
                function()
                if device.startswith("cuda"):
                    torch.cuda.synchronize(device)
                seconds[name].append(time.perf_counter() - start)
    ours_s, peft_s = min(seconds["ours"]), min(seconds["peft"])
    return {
        "width": width,
        "batches": ours().batches_used,
        "ours_s": round(ours_s, 4),
        "peft_s": round(peft_s, 4),
        "ratio": round(ours_s / peft_s, 3),
    }


def measure_eva_against_peft(
    widths: Sequence[int] = (256, 1024, 4096),
    device: str = "cpu",
    batch_size: int = 256,
    batches: int = 40,
    r: int = 4,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """``compute_eva``'s time over peft's ``get_eva_state_dict`` on the same two-layer MLP of each width and the same
    batches (a decaying spectrum), the same rank, rho and tau (the parity test checks that both stop at the same
    batch with the same directions): the issue's goal is a ratio of at most 0.5."""
    return [in_fresh_process(_eva_against_peft_point, w, device, batch_size, batches, r, seed) for w in widths]


def _ppo_steps_per_second(width: int, device: str, steps: int, seed: int) -> dict[str, Any]:
    """PPO (collection and updates) on Pendulum with a ``[width, width]`` policy and value net, in a fresh process."""
    from stable_baselines3.common.env_util import make_vec_env

    torch.set_num_threads(1)
    env = make_vec_env("Pendulum-v1", n_envs=8, seed=seed)
    arch = {"net_arch": {"pi": [width, width], "vf": [width, width]}}
    model = PPO("MlpPolicy", env, n_steps=128, batch_size=64, n_epochs=4, seed=seed, device=device, policy_kwargs=arch)
    model.learn(1024)  # warm-up: lazy kernels, allocator pools
    start = time.perf_counter()
    model.learn(steps, reset_num_timesteps=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    parameters = sum(p.numel() for p in model.policy.parameters())
    return {"parameters": parameters, "steps_per_second": round(steps / (time.perf_counter() - start), 1)}


def measure_device_crossover(
    widths: Sequence[int] = (64, 256, 512, 1024, 2048), devices: Sequence[str] = ("cpu", "cuda"), steps: int = 4096
) -> dict[str, Any]:
    """PPO steps per second on each device against the policy's size (the run's ``--device auto`` rule,
    :data:`~eva_rl.devices.CUDA_MIN_PARAMETERS`): each width in a fresh process, one torch thread.

    :return: ``points`` (width, parameters, steps/s per device), and ``crossover_parameters``: the smallest policy
        on which the last device was faster than the first (``None`` if none was).
    """
    points = []
    for width in widths:
        point: dict[str, Any] = {"width": width}
        for device in devices:
            measured = in_fresh_process(_ppo_steps_per_second, width, device, steps, 0)
            point["parameters"] = measured["parameters"]
            point[f"{device}_steps_per_second"] = measured["steps_per_second"]
        points.append(point)
    first, last = (f"{d}_steps_per_second" for d in (devices[0], devices[-1]))
    faster = [p["parameters"] for p in points if p[last] > p[first]]
    return {"points": points, "crossover_parameters": min(faster) if faster else None}


def measure_bank(task_name: str, seed: int = 0, tasks: int = 5, switches: int = 100) -> dict[str, Any]:
    """An adapter bank of ``tasks`` LoRA adapters (the task's rank) on its bundled agent: milliseconds per task
    switch against loading the agent's zip, and bytes per task (in memory and on disk) against a full copy."""
    import tempfile

    from eva_rl.bank import AdapterBank

    task, base = _bundled_agent(task_name, "cpu")
    bank = AdapterBank(load_agent(task.agent_path, device="cpu"), task.agent_path)
    generator = torch.Generator().manual_seed(seed)
    with closing_env(make_vec(env_factory(task.target_env, task.wrappers, task.env_kwargs), 1, seed)) as env:
        for i in range(tasks):
            model = adapt(base, env, method="lora", lora=task.lora)
            with torch.no_grad():  # a fine-tuned adapter: B is not zero
                for parameter in model.policy.trainable_parameters():
                    parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
            bank.add(f"task{i}", model)
    names = list(bank.tasks)
    timings = []
    for i in range(switches):
        start = time.perf_counter()
        bank.activate(names[i % len(names)])
        timings.append(time.perf_counter() - start)
    loads = []
    for _ in range(5):
        start = time.perf_counter()
        load_agent(task.agent_path, device="cpu")
        loads.append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as folder:
        bank.save(folder)
        adapter_files = [p.stat().st_size for p in (Path(folder) / "adapters").iterdir()]
    full = bank.base_nbytes()
    per_task = float(np.mean([t.nbytes for t in bank.tasks.values()]))
    return {
        "tasks": tasks,
        "switch_ms_median": 1000 * float(np.median(timings)),
        "load_zip_ms_median": 1000 * float(np.median(loads)),
        "task_bytes": per_task,
        "full_copy_bytes": full,
        "task_fraction_of_copy": per_task / full,
        "task_file_bytes": float(np.mean(adapter_files)),
        "agent_zip_bytes": task.agent_path.stat().st_size,
    }


def _interleaved(rate: Callable[[Any], float], variants: Sequence[Any], rounds: int) -> list[float]:
    """The median of ``rate(variant)`` for each variant over ``rounds`` rounds, taking the variants in turn within
    each round, so that all see the machine's load alike."""
    timings: list[list[float]] = [[] for _ in variants]
    for _ in range(rounds):
        for timing, variant in zip(timings, variants):
            timing.append(rate(variant))
    return [float(np.median(timing)) for timing in timings]


def _interleaved_medians(rate: Callable[[bool], float], rounds: int) -> tuple[float, float]:
    """The medians of ``rate(False)`` and ``rate(True)`` (:func:`_interleaved`)."""
    slow, fast = _interleaved(rate, (False, True), rounds)
    return slow, fast


def measure_minigrid_view(
    env_id: str = "MiniGrid-DoorKey-8x8-v0", steps: int = 5000, rounds: int = 3
) -> dict[str, Any]:
    """Env steps per second of ``env_id`` (random actions) with MiniGrid's own view and with
    :func:`eva_rl.minigrid_view.speed_up_view`, in interleaved rounds (median of each)."""
    import gymnasium as gym
    import minigrid  # noqa: F401  (registers the ids)

    from eva_rl.minigrid_view import speed_up_view

    def steps_per_second(fast: bool) -> float:
        env = gym.make(env_id)
        if fast:
            speed_up_view(env)
        env.reset(seed=0)
        actions = np.random.default_rng(0).integers(0, env.action_space.n, steps)
        start = time.perf_counter()
        for action in actions:
            _, _, terminated, truncated, _ = env.step(int(action))
            if terminated or truncated:
                env.reset()
        return steps / (time.perf_counter() - start)

    minigrid_rate, fast_rate = _interleaved_medians(steps_per_second, rounds)
    return {
        "env": env_id,
        "minigrid_steps_per_s": minigrid_rate,
        "fast_view_steps_per_s": fast_rate,
        "speedup": fast_rate / minigrid_rate,
    }


def _meta_world_experts() -> dict[str, Any]:
    """Meta-World's scripted experts by task (``metaworld.policies.ENV_POLICY_MAP``), the project's Meta-World ids
    registered as its task files load them.

    :raises ConfigError: if Meta-World is not installed.
    """
    try:
        from metaworld.policies import ENV_POLICY_MAP
    except ImportError as error:
        raise ConfigError('Meta-World is not installed: pip install -e ".[metaworld]"') from error
    import_packages(["envs"])
    return ENV_POLICY_MAP


def measure_meta_world_contacts(task: str = "push", steps: int = 2000, rounds: int = 3) -> dict[str, Any]:
    """Env steps per second of a Meta-World task (``envs.meta_world``, its scripted expert acting, noised so that the
    gripper also misses) as Meta-World makes it, with :class:`envs.meta_world.TouchingObject` in place of its own
    ``touching_object``, and with :class:`envs.meta_world.ObjectQuaternion` in place of its ``_get_quat_objects``
    too (the project's env), in interleaved rounds (median of each).

    :raises ConfigError: if Meta-World is not installed.
    """
    import gymnasium as gym

    experts = _meta_world_experts()

    def steps_per_second(own: tuple[str, ...]) -> float:
        env, expert = gym.make(f"MetaWorld-{task}-v3"), experts[f"{task}-v3"]()
        for method in own:  # Meta-World's own method back in place of the instance's
            delattr(env.unwrapped, method)
        noise = np.random.default_rng(0)
        observation, _ = env.reset(seed=0)
        start = time.perf_counter()
        for _ in range(steps):
            action = np.clip(expert.get_action(observation) + noise.normal(0.0, 0.3, 4), -1.0, 1.0)
            observation, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                observation, _ = env.reset()
        return steps / (time.perf_counter() - start)

    variants = (("touching_object", "_get_quat_objects"), ("_get_quat_objects",), ())
    own_rate, fast_rate, project_rate = _interleaved(steps_per_second, variants, rounds)
    return {
        "env": f"MetaWorld-{task}-v3",
        "meta_world_steps_per_s": own_rate,
        "fast_contacts_steps_per_s": fast_rate,
        "speedup": fast_rate / own_rate,
        "fast_contacts_and_quaternion_steps_per_s": project_rate,
        "quaternion_speedup": project_rate / fast_rate,
        "total_speedup": project_rate / own_rate,
    }


def measure_meta_world_builds(task: str = "push", envs: int = 18, rounds: int = 3) -> dict[str, Any]:
    """Seconds to build ``envs`` envs of a Meta-World task (a CW10 run builds 18: 8 to train on, 10 to evaluate),
    each parsing the task's XML (Meta-World's way) and from the model parsed once
    (:class:`envs.meta_world.ParsedModel`), in interleaved rounds (median of each).

    :raises ConfigError: if Meta-World is not installed.
    """
    import gymnasium as gym

    _meta_world_experts()
    from envs import meta_world

    gym.make(f"MetaWorld-{task}-v3").close()  # the imports a first build pays: none timed below

    def seconds(each_parses: bool) -> float:
        meta_world._PARSED_MODELS.clear()
        start = time.perf_counter()
        for _ in range(envs):
            if each_parses:
                meta_world._PARSED_MODELS.clear()
            gym.make(f"MetaWorld-{task}-v3").close()
        return time.perf_counter() - start

    parsing, parsed_once = _interleaved(seconds, (True, False), rounds)
    return {"env": f"MetaWorld-{task}-v3", "envs": envs, "each_parses_s": parsing, "parsed_once_s": parsed_once,
            "speedup": parsing / parsed_once}  # fmt: skip


def measure_acting(task_name: str, seed: int = 0, device: str = "cpu", calls: int = 3000) -> dict[str, Any]:
    """``predict`` calls per second, one observation at a time as an off-policy agent acts, of the task's bundled
    agent (plain), of a LoRA copy keeping its adapted weights between calls (eva-rl's default) and of one computing
    ``W + s B A`` at every call; three interleaved rounds."""
    task, model = _bundled_agent(task_name, device)
    env, _ = _target_ppo(task, seed, device)
    agents = {"plain": model, "lora": adapt(model, env, method="lora", lora=task.lora, device=device)}
    agents["lora_uncached"] = adapt(model, env, method="lora", lora=task.lora, device=device)
    keep_adapted_weights(lora_layers(agents["lora_uncached"].policy).values(), keep=False)
    observation = env.reset()
    rates: dict[str, list[float]] = {name: [] for name in agents}
    for _ in range(3):
        for name, agent in agents.items():
            start = time.perf_counter()
            for _ in range(calls):
                agent.predict(observation, deterministic=True)
            rates[name].append(calls / (time.perf_counter() - start))
    mean = {name: float(np.mean(values)) for name, values in rates.items()}
    return {
        "task": task.name,
        **{f"{name}_predicts_per_s": round(value, 1) for name, value in mean.items()},
        "lora_acting_ratio": round(mean["lora"] / mean["plain"], 3),
        "lora_uncached_acting_ratio": round(mean["lora_uncached"] / mean["plain"], 3),
    }


def measure_evaluation(task_name: str, seed: int = 0, device: str = "cpu", rounds: int = 3) -> dict[str, Any]:
    """Eval episodes per second of a LoRA copy of the task's bundled agent, evaluated as runs evaluate (the task's
    eval envs, episodes and seed, the adapted weights cached), with the policy switched to eval mode at every
    ``predict`` as SB3 does and once per evaluation (:func:`~eva_rl.experiments.training.eval_mode`); interleaved
    rounds, median of each. Both sides must score the same return. The time of one ``predict`` call on the eval
    envs' first observation, both ways, comes with it: the part of an evaluation that the switch changes."""
    task, model = _bundled_agent(task_name, device)
    train_env, settings = _target_ppo(task, seed, device)
    adapted = adapt(model, train_env, method="lora", lora=task.lora, **settings)
    env = make_vec(env_factory(task.target_env, task.wrappers, task.env_kwargs), task.eval.env_count, task.eval.seed)
    returns: dict[bool, set[float]] = {False: set(), True: set()}

    def episodes_per_second(once: bool) -> float:
        start = time.perf_counter()
        result = evaluate(adapted, env, task.eval.episodes, task.eval.seed, task.eval.deterministic, switch_once=once)
        elapsed = time.perf_counter() - start
        returns[once].add(round(result.mean, 9))
        return task.eval.episodes / elapsed

    # The switch costs each predict call a fixed time; env steps, the rest of an evaluation, dilute it.
    observation = env.reset()

    def predicts_per_second(once: bool, calls: int = 200) -> float:
        with cached_adapter_weights(adapted.policy), eval_mode(adapted.policy) if once else nullcontext():
            start = time.perf_counter()
            for _ in range(calls):
                adapted.predict(observation, deterministic=True)
            return calls / (time.perf_counter() - start)

    every_predict, once = _interleaved_medians(episodes_per_second, rounds)
    predict_every, predict_once = _interleaved_medians(predicts_per_second, 3 * rounds)
    return {
        "task": task.name,
        "episodes": task.eval.episodes,
        "switch_every_predict_episodes_per_s": round(every_predict, 2),
        "switch_once_episodes_per_s": round(once, 2),
        "speedup": round(once / every_predict, 3),
        "predict_us_switch_every": round(1e6 / predict_every, 1),
        "predict_us_switch_once": round(1e6 / predict_once, 1),
        "predict_speedup": round(predict_once / predict_every, 3),
        "same_returns": len(returns[False] | returns[True]) == 1,
    }


def measure_weight_cache(task_name: str, seed: int = 0, device: str = "cpu", steps: int = 2048) -> dict[str, Any]:
    """:func:`measure_lora_throughput` on a task's bundled agent with the LoRA layers' no-grad weight cache and
    without it (every call computing ``W + s B A`` again), twice each, interleaved."""
    task, model = _bundled_agent(task_name, device)
    key = f"lora_{algorithm_name(model)}_throughput_ratio"
    ratios: dict[str, list[float]] = {"cached": [], "uncached": []}
    for _ in range(2):
        for cached in (True, False):
            measured = measure_lora_throughput(model, task, steps=steps, seed=seed, cached_weights=cached)
            ratios["cached" if cached else "uncached"].append(measured[key])
    return {
        "task": task.name,
        f"{key}_cached": ratios["cached"],
        f"{key}_uncached": ratios["uncached"],
        "cache_gain": float(np.mean(ratios["cached"]) / np.mean(ratios["uncached"])),
    }


def measure_lora_path(task_name: str, seed: int = 0, device: str = "cpu", steps: int = 2048) -> dict[str, Any]:
    """:func:`measure_lora_throughput` on a task's bundled agent with the LoRA layers' path chosen per call (``auto``,
    the default) and with the one-call ``W + s B A`` path everywhere (``merged``), twice each, interleaved."""
    task, model = _bundled_agent(task_name, device)
    key = f"lora_{algorithm_name(model)}_throughput_ratio"
    ratios: dict[str, list[float]] = {"auto": [], "merged": []}
    for _ in range(2):
        for path in ratios:
            ratios[path].append(measure_lora_throughput(model, task, steps=steps, seed=seed, path=path)[key])
    return {
        "task": task.name,
        "parameters": sum(p.numel() for p in model.policy.parameters()),
        f"{key}_auto": ratios["auto"],
        f"{key}_merged": ratios["merged"],
        "auto_gain": float(np.mean(ratios["auto"]) / np.mean(ratios["merged"])),
    }


def _lora_step_seconds(layer: torch.nn.Module, x: torch.Tensor, calls: int) -> float:
    """Mean seconds of one forward and backward pass of ``layer`` on ``x``."""
    start = time.perf_counter()
    for _ in range(calls):
        layer(x).sum().backward()
    return (time.perf_counter() - start) / calls


def measure_lora_paths(
    widths: Sequence[int] = (64, 128, 256, 512, 1024),
    batch_sizes: Sequence[int] = (64, 256),
    r: int = 4,
    rounds: int = 5,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """A training step (forward and backward) of one ``width x width`` LoRA Linear, a hidden layer whose input needs
    its gradient, on each path: the one-call ``W + s B A`` (``merged``) and ``base(x) + s B A x`` (``low-rank``).

    Per point, the best of ``rounds`` interleaved rounds, against which :data:`~eva_rl.layers.LOW_RANK_PATH_MIN_WEIGHTS`
    was set.
    """
    torch.manual_seed(seed)
    points = []
    for width, batch_size in itertools.product(widths, batch_sizes):
        layer = LoraLinear(torch.nn.Linear(width, width), r, 2 * r)
        torch.nn.init.normal_(layer.lora_B)
        x = torch.randn(batch_size, width, requires_grad=True)
        calls = max(10, (1 << 27) // (batch_size * width * width))
        best = {path: float("inf") for path in ("merged", "low-rank")}
        for _ in range(rounds):
            for path in best:
                layer.set_path(path)
                _lora_step_seconds(layer, x, 3)
                best[path] = min(best[path], _lora_step_seconds(layer, x, calls))
        points.append({
            "width": width, "batch_size": batch_size,
            "merged_us": round(best["merged"] * 1e6, 1), "low_rank_us": round(best["low-rank"] * 1e6, 1),
            "merged_over_low_rank": round(best["merged"] / best["low-rank"], 3),
        })  # fmt: skip
    return points


def bench(args: argparse.Namespace) -> int:
    """``eva-rl bench``: the figures its flags ask for, as one JSON line. ``--device auto`` measures on the CPU, and on
    CUDA too where present."""
    args.task = args.env or "MiniGrid-DoorKey"
    args.seed = 0 if args.seed is None else args.seed
    args.device = "cpu" if args.device == "auto" else args.device
    torch.set_num_threads(args.threads)
    steps = 512 if args.quick else args.throughput_steps
    # One group of figures only, when a flag asks for it.
    if args.weight_cache_only:
        print(json.dumps({"weight_cache": measure_weight_cache(args.task, args.seed, args.device, steps)}))
        return 0
    if args.lora_path_only:
        # the agent's PPO first, so that a bad --env is an error before the minutes of the layer scan
        figures: dict[str, Any] = {}
        if args.env:
            figures["ppo"] = measure_lora_path(args.task, args.seed, args.device, steps)
        scan = {"widths": (64, 256), "batch_sizes": (64,), "rounds": 1} if args.quick else {}
        figures["layers"] = measure_lora_paths(seed=args.seed, **scan)
        print(json.dumps({"lora_path": figures}))
        return 0
    if args.evaluation_only:
        print(json.dumps({"evaluation": measure_evaluation(args.task, args.seed, args.device, 1 if args.quick else 3)}))
        return 0
    if args.view_only:
        print(json.dumps({"minigrid_view": measure_minigrid_view(steps=1000 if args.quick else 5000)}))
        return 0
    if args.meta_world_only:
        contacts = measure_meta_world_contacts(steps=400 if args.quick else 2000)
        builds = measure_meta_world_builds(envs=4 if args.quick else 18)
        print(json.dumps({"meta_world_contacts": contacts, "meta_world_builds": builds}))
        return 0
    if args.device_crossover:
        if not torch.cuda.is_available():
            raise ConfigError("--device-crossover compares the CPU with CUDA, and CUDA is not available here")
        widths = (64, 1024) if args.quick else (64, 256, 512, 1024, 2048)
        print(json.dumps({"device_crossover": measure_device_crossover(widths, steps=1024 if args.quick else 4096)}))
        return 0
    if args.peft_only:
        widths = (256, 1024) if args.quick else (256, 1024, 4096)
        print(json.dumps({"eva_vs_peft": measure_eva_against_peft(widths, args.device, seed=args.seed)}))
        return 0
    if args.bank_only:
        print(json.dumps({"bank": measure_bank(args.task, args.seed, switches=20 if args.quick else 200)}))
        return 0
    # Everything: EVA's cost on each device, then off-policy throughput, the bank and the MiniGrid view.
    scaling = {"widths": (64, 1024), "batch_sizes": (256,), "batches": 3} if args.quick else {}
    devices = [args.device]
    if args.device == "cpu" and torch.cuda.is_available():
        devices.append("cuda")
    figures: dict[str, Any] = {}
    for device in devices:
        measured = measure_eva_cost(args.task, args.seed, device, steps)
        measured["eva_scaling"] = measure_eva_scaling(device=device, seed=args.seed, **scaling)
        if device == args.device:
            figures.update(measured)
        else:
            figures[device] = measured
    if args.offpolicy_task:
        figures["offpolicy"] = measure_offpolicy_throughput(args.offpolicy_task, args.seed, args.device, steps // 2)
        figures["acting"] = measure_acting(args.offpolicy_task, args.seed, args.device, 300 if args.quick else 3000)
    figures["bank"] = measure_bank(args.task, args.seed, switches=20 if args.quick else 200)
    figures["minigrid_view"] = measure_minigrid_view(steps=1000 if args.quick else 5000)
    print(json.dumps(figures))
    return 0
