"""``eva-rl compare --suite S --anatomy``: where each adapter method's completed runs moved the pretrained agent's
layers (:mod:`eva_rl.anatomy`), measured on the pretrained agent's own activations in each task's target env.

Beside the layers, the first PPO updates each run logged: how far each moved the policy (SB3's ``train/approx_kl``,
read from the run's TensorBoard log). A method whose updates wait for EVA (EVA on PPO's rollouts, ``lora-deferred``)
makes them in a row once EVA converges, in one ``train()``, and SB3's logger keeps a tag's last value: its first KL
logged is the last update of that row's, on a rollout the pretrained policy collected, so it measures how far the
whole row moved the policy. The page says which update each method's first logged KL is; ``compare --first-update``
(:mod:`~eva_rl.experiments.studies.first_update`) measures a single first update from one shared rollout.

Each run's figures are kept in its folder (``anatomy.json``, read back by ``--report-only``, committed with the
run's ``result.json``); the suite's page is ``anatomy.md`` and ``anatomy.json`` beside its ``results.md``. DoRA
methods are left out: their update is not ``scaling * B A``.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path
from statistics import fmean
from typing import Any

import torch
from stable_baselines3.common.save_util import load_from_zip_file

from eva_rl.adapt import adapter_plan
from eva_rl.anatomy import InputMoments, adapter_update, collect_input_moments, layer_anatomy
from eva_rl.checkpoints import read_tensors
from eva_rl.errors import ConfigError
from eva_rl.experiments.environments import agent_env, import_packages
from eva_rl.experiments.markdown import table, table_row
from eva_rl.experiments.plots import read_scalars
from eva_rl.experiments.run_folder import RunFolder
from eva_rl.experiments.stats import mean_interval
from eva_rl.experiments.suites import Suite
from eva_rl.experiments.tasks import TaskConfig
from eva_rl.files import atomic_write_json, atomic_write_text
from eva_rl.loading import load_pretrained
from eva_rl.methods import get_method
from eva_rl.models import wrap_target_env
from eva_rl.plan import AdapterPlan
from eva_rl.rollouts import RolloutBatches, policy_forward

ANATOMY = "anatomy.json"
STEPS = 4096
"""Env steps of the pretrained agent's rollouts the input moments are taken over (sampled actions, as PPO's)."""
SEED = 0
BATCH = 256
METRICS = ("change", "update_top_share", "a_top_share", "a_signal")
UPDATES = 5
"""The first PPO updates whose approximate KL each run's figures keep."""
HEADINGS = {
    "change": "RMS output change relative to the layer's RMS output, sqrt(E|dW x|^2 / E|W x|^2)",
    "update_top_share": "share of the update dW on the inputs' top-k principal subspace, |dW U_k|^2 / |dW|^2",
    "a_top_share": "share of A's rows in the inputs' top-k principal subspace, |A U_k|^2 / |A|^2",
    "a_signal": "RMS output of an A row on the inputs relative to a Kaiming-uniform row's, "
    "sqrt((E|A x|^2 / r) / (E|x|^2 / (3 fan_in))): the input B sees (LoRA's start: about 1)",
}
SHARES = ("update_top_share", "a_top_share")
"""The figures a random direction scores ``k / fan_in`` on (the pages' "random" column)."""


def base_layers(task: TaskConfig) -> tuple[dict[str, torch.Tensor], dict[str, InputMoments]]:
    """The pretrained agent's weight of each layer ``task``'s adapters target, and its input moments over
    :data:`STEPS` env steps of the agent's rollouts in the target env."""
    import_packages(task.env_packages)
    agent = load_pretrained(task.agent_path, device="cpu")
    method = get_method("lora")
    plan = adapter_plan(agent.model, method, method.lora_config(task.lora), task.eva)
    layers = {name: agent.model.policy.get_submodule(name) for name in plan.layers}
    with closing(agent_env(task, agent, task.n_envs, SEED)) as env:
        batches = RolloutBatches(agent.model.policy, wrap_target_env(agent.model, env), BATCH, seed=SEED)
        moments = collect_input_moments(
            agent.model.policy, layers, itertools.islice(batches, STEPS // BATCH), policy_forward
        )
    return {name: layer.weight.detach().cpu() for name, layer in layers.items()}, moments


def run_anatomy(
    folder: RunFolder, weights: dict[str, torch.Tensor], moments: dict[str, InputMoments], k: int
) -> dict[str, dict[str, float]]:
    """``{layer: {metric: value}}`` for the adapter a completed run saved (its rank-0 layers left out)."""
    config = json.loads((folder.adapter_dir / "adapter_config.json").read_text())
    plan = AdapterPlan.from_dict(config["lora_plan"])
    tensors = read_tensors(folder.adapter_dir / "adapter.safetensors")
    if any(f"{name}.lora_A" not in tensors for name, layer in plan.layers.items() if layer.rank):
        # a frozen-A adapter saved before checkpoints kept A: the run's zip has it (its weights, nothing unpickled)
        _, params, _ = load_from_zip_file(folder.model_file, load_data=False, device="cpu")
        tensors = params["policy"]
    figures = {}
    for name, layer in plan.layers.items():
        if layer.rank == 0:
            continue
        scaling = layer.alpha / (math.sqrt(layer.rank) if plan.use_rslora else layer.rank)
        delta, lora_a = adapter_update(tensors, name, scaling, weights[name])
        figures[name] = {**layer_anatomy(weights[name], delta, lora_a, moments[name], k), "fan_in": layer.fan_in}
    return figures


def first_updates_kl(folder: RunFolder) -> list[float] | None:
    """SB3's ``train/approx_kl`` of the run's first :data:`UPDATES` PPO updates (each the mean over the update's
    minibatches), from its TensorBoard log; ``None`` where the log is not kept (a committed run) or holds no PPO
    update."""
    if not folder.event_files():
        return None
    _, values = read_scalars(folder.path, "train/approx_kl")
    return [float(v) for v in values[:UPDATES]] or None


def first_logged_update(folder: RunFolder) -> int | None:
    """Which update the run's first logged KL is: 1, or for a run whose updates waited for EVA the last of the row
    it made once EVA converged (the rollouts EVA read before the one it converged on, plus that one); ``None`` for a
    run that waited whose settings were not recorded."""
    eva = folder.read_eva()
    if eva is None or not eva.deferred_steps:
        return 1
    settings = folder.recorded_settings()
    if settings is None:
        return None
    return 1 + eva.deferred_steps // (settings["hyperparameters"]["n_steps"] * settings["n_envs"])


def _adapter_runs(folders: Sequence[tuple[str, RunFolder]]) -> dict[str, list[RunFolder]]:
    """Of ``(method, folder)`` pairs in seed order, the completed runs that saved an adapter (or were measured before
    their adapter was dropped: committed runs), by method."""
    runs: dict[str, list[RunFolder]] = {}
    for method, folder in folders:
        saved = folder.result_file.is_file() and (folder.adapter_dir / "adapter_config.json").is_file()
        if saved or (folder.path / ANATOMY).is_file():
            runs.setdefault(method, []).append(folder)
    return runs


def suite_anatomy(
    suite: Suite,
    log_dir: Path,
    methods: list[str] | None = None,
    report_only: bool = False,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure every completed adapter run of ``suite`` (kept per run), then write the suite's ``anatomy.json``
    and ``anatomy.md``; with ``report_only``, only the runs measured before.

    :param echo: Receives a line per task and method (what was measured, what was read back).

    :return: ``{task: {method: {"seeds", "final_return", "layers": {layer: {metric: mean over seeds}}}}}``.
    """
    out = Path(log_dir) / suite.name
    # the suite's own folders, or the shared suite's where a run is its (Suite.shares), planned once
    planned = suite.run_specs(log_dir, methods)
    report: dict[str, Any] = {}
    for suite_task in suite.tasks:
        task = suite.task(suite_task)
        adapters = suite.low_rank_methods(suite_task, methods)
        specs = [spec for t, spec in planned if t is suite_task and spec.method in adapters]
        runs = _adapter_runs([(spec.method, spec.folder) for spec in sorted(specs, key=lambda spec: spec.seed)])
        base: tuple[dict[str, torch.Tensor], dict[str, InputMoments]] | None = None
        per_method: dict[str, Any] = {}
        # the pretrained agent's rollouts are taken once per task, and only if a run is not measured yet
        for method, folders in runs.items():
            measured, new = [], 0
            for folder in folders:
                if not (folder.path / ANATOMY).is_file():
                    if report_only:
                        continue
                    if base is None:
                        echo(f"{suite_task.task}: the pretrained agent's activations ({STEPS} env steps)")
                        base = base_layers(task)
                    figures = run_anatomy(folder, *base, task.lora.r)
                    atomic_write_json(folder.path / ANATOMY, {"steps": STEPS, "seed": SEED, "layers": figures})
                    new += 1
                _add_first_updates(folder)
                measured.append(folder)
            if measured:
                per_method[method] = _method_summary(measured)
                echo(f"{suite_task.task} {method}: {new} runs measured, {len(measured) - new} read back")
        report[suite_task.task] = per_method
    if not any(report.values()):
        raise ConfigError(
            f"no completed adapter run of suite {suite.name} under {out}"
            + (" has an anatomy.json yet: drop --report-only" if report_only else ": run the suite first")
        )
    ranks = {t.task: suite.task(t).lora.r for t in suite.tasks}
    atomic_write_json(out / ANATOMY, {"steps": STEPS, "seed": SEED, "k": ranks, "tasks": report})
    atomic_write_text(out / "anatomy.md", anatomy_markdown(suite.name, report, ranks, STEPS))
    return report


def _add_first_updates(folder: RunFolder) -> None:
    """Keep the run's first updates' KL in its ``anatomy.json`` (measured before they were kept: added, nothing
    else changed), where its TensorBoard log has them."""
    record = json.loads((folder.path / ANATOMY).read_text())
    if "approx_kl" in record:
        return
    kl = first_updates_kl(folder)
    if kl is not None:
        atomic_write_json(folder.path / ANATOMY, {**record, "approx_kl": kl})


def _method_summary(folders: list[RunFolder]) -> dict[str, Any]:
    records = [json.loads((f.path / ANATOMY).read_text()) for f in folders]
    runs = [record["layers"] for record in records]
    layers = list(dict.fromkeys(name for run in runs for name in run))
    kl = [record["approx_kl"] for record in records if "approx_kl" in record]
    logged = [first_logged_update(f) for f, record in zip(folders, records, strict=True) if "approx_kl" in record]
    return {
        "seeds": len(runs),
        "first_logged_update": logged,
        "final_return": fmean(f.read_result().final_return for f in folders),
        # the runs whose TensorBoard log was kept: KL of update 1, and the mean of updates 1-UPDATES
        "approx_kl": {"first": [run[0] for run in kl], "early": [fmean(run) for run in kl]},
        # each run's mean over its layers, for the summary's CIs over seeds (runs measured before a figure was
        # kept lack it: they are left out of that figure)
        "runs": {m: [fmean(f[m] for f in run.values()) for run in runs if _has(run, m)] for m in METRICS},
        "layers": {
            name: {
                **{m: _mean_or_none([run[name][m] for run in runs if m in run.get(name, {})]) for m in METRICS},
                "fan_in": next(run[name]["fan_in"] for run in runs if name in run),
            }
            for name in layers
        },
    }


def _has(run: dict[str, dict[str, float]], metric: str) -> bool:
    return all(metric in figures for figures in run.values())


def _mean_or_none(values: list[float]) -> float | None:
    return fmean(values) if values else None


def anatomy_markdown(suite: str, report: dict[str, Any], k: dict[str, int], steps: int) -> str:
    """The page: per task, one summary row per method, then one table per figure (layers x methods)."""
    lines = [
        f"# Anatomy of the updates: suite {suite}",
        "",
        "Where fine-tuning moved each adapted layer of the pretrained agent, measured on the pretrained agent's own "
        f"activations in the target env ({steps} env steps, actions sampled, seed {SEED}); each figure is a mean over "
        "the method's seeds. k is the task's LoRA rank r; a random direction's share of the top-k subspace is "
        "k / fan-in. The runs, their returns and the platform they ran on: results.md beside this page. Made by "
        f"`eva-rl compare --suite {suite} --anatomy` (module eva_rl.anatomy).",
        "",
        "KL, first logged: how far the run's first logged PPO update moved the policy, SB3's `train/approx_kl` (the "
        "mean over the last epoch's minibatches) read from the run's TensorBoard log; KL, first "
        f"{UPDATES} logged: the mean of the first {UPDATES}. Which update: the update the first logged KL is. A "
        "method whose updates wait for EVA makes them in a row once EVA converges, and SB3's logger keeps the last "
        "value, so its first KL logged is the last update of that row's (the n-th), on a rollout the pretrained policy "
        "collected: how far the whole row of n updates moved the policy, where LoRA's is one update's. A single "
        "first update from one shared rollout: `compare --first-update`. Where some runs' logs were not kept (runs "
        "made on another machine), the figure says over how many runs it is taken, as it does for a figure some runs "
        "were measured before it was kept.",
    ]
    for task, methods in report.items():
        if not methods:
            continue
        names = list(methods)
        metrics = [m for m in METRICS if any(s["runs"][m] for s in methods.values())]
        columns = ["method", "seeds", "final return (mean)", *metrics]
        columns += ["which update", "KL, first logged", f"KL, first {UPDATES} logged"]
        lines += ["", f"## {task}", "", *table(columns)]
        for method, summary in methods.items():
            cells = [_interval_cell(summary["runs"][m], summary["seeds"]) for m in metrics]
            cells.append(_range_cell(summary["first_logged_update"]))
            cells += [_interval_cell(summary["approx_kl"][which], summary["seeds"]) for which in ("first", "early")]
            lines.append(table_row([method, str(summary["seeds"]), f"{summary['final_return']:.3f}", *cells]))
        lines += ["", "Above: each run's mean over its layers, then the mean over seeds [95% CI]; below: per layer."]
        layers = list(dict.fromkeys(name for summary in methods.values() for name in summary["layers"]))
        fan_in = {name: s["layers"][name]["fan_in"] for s in methods.values() for name in s["layers"]}
        for metric in metrics:
            chance = metric in SHARES  # a random direction's share: k / fan-in
            lines += ["", f"**{metric}**: {HEADINGS[metric]}", ""]
            lines += table(["layer", *(["random"] if chance else []), *names])
            for layer in layers:
                cells = [f"{min(k[task], fan_in[layer]) / fan_in[layer]:.3f}"] if chance else []
                figures = [methods[m]["layers"].get(layer) for m in names]
                cells += ["-" if f is None or f[metric] is None else f"{f[metric]:.3f}" for f in figures]
                lines.append(table_row([layer, *cells]))
    return "\n".join(lines) + "\n"


def _interval_cell(values: list[float], seeds: int) -> str:
    if not values:
        return "-"
    cell = mean_interval(values).format()
    return cell if len(values) == seeds else f"{cell} ({len(values)} of {seeds} runs)"


def _range_cell(values: list[int | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    low, high = min(known), max(known)
    cell = str(low) if low == high else f"{low}-{high}"
    return cell if len(known) == len(values) else f"{cell} ({len(known)} of {len(values)} runs)"
