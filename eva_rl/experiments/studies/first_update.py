"""``eva-rl compare --suite S --first-update``: the first PPO update each adapter init makes from one and the same
rollout, at the method's rate and at fractions of it.

A run's first update (``compare --anatomy`` reads it from the run's log) mixes what the init does with what the
run's own rollout held. Here every method of a seed updates on one rollout, collected once by the pretrained policy
(which every adapter method is at step 0), with the same minibatch order, so the inits alone differ. Each update is
measured by:

- the KL from the pretrained policy to the updated one, ``E_s KL(pi_0(.|s) || pi_1(.|s))`` over the rollout's
  states, exactly (SB3's ``train/approx_kl``, which the runs log, is kept beside it);
- the same KL with one adapted layer's update alone kept (the others' adapters, and the heads, back at their init):
  which layer carries the step;
- each layer's B path straightness, ``|B_T - B_0| / sum_t |B_t+1 - B_t|`` over the update's optimizer steps: 1 where
  Adam's steps all point one way and add up, near 0 where they cancel;
- each layer's A on the rollout's inputs ``x``: its signal at init (``a_signal``, the anatomy's: its rows' RMS output
  relative to a Kaiming-uniform row's), and its update's output relative to its start,
  ``sqrt(E|(A_T - A_0) x|^2 / E|A_0 x|^2)`` (``a_update_signal``): how much of what B reads after the update A's own
  training put there (0 where A is frozen).

Each method updates at its rate times each of :data:`FACTORS`; the page gives, for each method, the fraction of its
rate at which its first update moves the policy as far as LoRA's does at LoRA's rate. EVA reads what it reads in a
run: the pretrained policy's rollouts from the first on, until it converges (the task's ``EvaConfig``); its first
update is then, as in a run, on the first rollout.

Each method's figures are kept per seed (``<log_dir>/<suite>/first-update/<task>/<method>/seed<k>.json``, so the
study resumes); the page is ``first_update.md``, ``.json`` and ``.png`` beside the suite's ``results.md``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, nullcontext
from pathlib import Path
from statistics import fmean
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.distributions import kl_divergence
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm

from eva_rl.adapt import adapt
from eva_rl.anatomy import InputMoments, collect_input_moments, row_signal
from eva_rl.errors import ConfigError
from eva_rl.eva_ppo import EvaRolloutsMixin
from eva_rl.experiments.environments import agent_env, import_packages
from eva_rl.experiments.machine import describe_platform, platform_line
from eva_rl.experiments.markdown import table, table_row
from eva_rl.experiments.plots import method_color, method_label, method_linestyle, new_figure, save_figure
from eva_rl.experiments.runs import RunSpec, check_algorithm_settings, run_algorithm
from eva_rl.experiments.stats import mean_interval
from eva_rl.experiments.suites import Suite
from eva_rl.files import atomic_write_json, atomic_write_text
from eva_rl.loading import PretrainedAgent, load_pretrained

FACTORS = (1.0, 0.25, 0.0625, 0.015625)
"""The fractions of each method's rate its first update is made at."""
REFERENCE = "lora"
"""The method whose first update, at its own rate, the others' rates are matched to."""
HEADS = "heads"
"""The component of the trainable parameters outside the adapters (action and value heads, ``log_std``)."""
FOLDER = "first-update"
LAYER_METRICS = {
    "kl_alone": "the KL with that layer's update alone kept (the rest at their init)",
    "straightness": "B's path straightness, |B_T - B_0| over the summed lengths of the optimizer's steps",
    "a_signal": "A's signal at init, its rows' RMS output on the rollout's inputs relative to a Kaiming-uniform row's",
    "a_update_signal": "the RMS output of A's update on the rollout's inputs relative to A's at init (0: A frozen)",
}
"""Each layer's figures at the method's rate, as the page heads their tables."""


def record_path(out: Path, task: str, method: str, seed: int) -> Path:
    return out / FOLDER / task / method / f"seed{seed}.json"


def measure_seed(specs: dict[str, RunSpec], seed: int) -> dict[str, dict[str, Any]]:
    """``{method: record}`` for one seed of one task: each method's first update from the pretrained policy's first
    rollout of that seed, at its rate times each of :data:`FACTORS`."""
    spec = next(iter(specs.values()))
    import_packages(spec.task.env_packages)
    agent = load_pretrained(spec.agent_path, device="cpu")
    check_algorithm_settings(spec.task, agent)
    records = {}
    with closing(_Rollouts(spec, agent, seed)) as rollouts:
        for method, method_spec in specs.items():
            model = _adapted(method_spec, agent)
            read = _finish_eva(model, rollouts, method_spec.task.total_timesteps)
            rate = float(model.lr_schedule(1.0))
            inputs = layer_inputs(model, rollouts[0])  # at the init every factor's update starts from
            records[method] = {
                "seed": seed,
                "platform": describe_platform("cpu", spec.task.target_env),
                "learning_rate": rate,
                "ranks": model.policy.lora_ranks,
                "eva_rollouts": read,
                "factors": {str(f): _first_update(model, rollouts[0], rate * f, seed, inputs) for f in FACTORS},
            }
    return records


class _Rollouts:
    """The pretrained policy's rollouts in the task's env, one after another as a run collects them, kept; the
    collector is a LoRA model at step 0 that never trains, so it acts as the pretrained policy."""

    def __init__(self, spec: RunSpec, agent: PretrainedAgent, seed: int) -> None:
        task = spec.task
        self.env = agent_env(task, agent, task.n_envs, seed, training=task.update_obs_stats)
        lora = dataclasses.replace(spec, method="lora")
        self.collector = _adapted(lora, agent, self.env)
        self.generator_states: tuple[torch.Tensor, Any] | None = None
        with self._own_generators():
            self.collector.set_random_seed(seed)  # the env's resets and the sampled actions: the same every time
            _, self.callback = self.collector._setup_learn(self.steps, callback=None)
        self.callback.on_training_start(locals(), globals())
        self.kept: list[RolloutBuffer] = []

    def __getitem__(self, i: int) -> RolloutBuffer:
        collector = self.collector
        while len(self.kept) <= i:
            # in the collector's own random streams: what runs between two rollouts (a model's init) moves neither
            with self._own_generators():
                collector.collect_rollouts(collector.env, self.callback, collector.rollout_buffer, collector.n_steps)
            self.kept.append(copy.deepcopy(collector.rollout_buffer))
        return self.kept[i]

    @property
    def steps(self) -> int:
        """Env steps of one rollout."""
        return self.collector.n_steps * self.collector.n_envs

    def close(self) -> None:
        self.env.close()

    @contextmanager
    def _own_generators(self) -> Iterator[None]:
        """torch's and numpy's global generators in the states the collector left them in last (the process's
        states restored after)."""
        with torch.random.fork_rng(devices=[]):
            outside = np.random.get_state()
            if self.generator_states is not None:
                torch.set_rng_state(self.generator_states[0])
                np.random.set_state(self.generator_states[1])
            try:
                yield
            finally:
                self.generator_states = (torch.get_rng_state(), np.random.get_state())
                np.random.set_state(outside)


def _adapted(spec: RunSpec, agent: PretrainedAgent, env: Any = None) -> OnPolicyAlgorithm:
    """The model a run of ``spec`` starts from (EVA, where the method runs it, still to read the rollouts)."""
    task = spec.task
    hyperparameters = {**task.ppo, "seed": spec.seed, "device": "cpu", "verbose": 0, "tensorboard_log": None}
    eva = dataclasses.replace(task.eva, seed=spec.seed)
    with closing(agent_env(task, agent, task.n_envs, spec.seed)) if env is None else nullcontext(env) as model_env:
        algorithm = run_algorithm(task, agent)
        model = adapt(agent.model, model_env, spec.method, task.lora, eva, False, algorithm, **hyperparameters)
    if not isinstance(model, OnPolicyAlgorithm):
        raise ConfigError(
            f"--first-update measures PPO's (or A2C's) first update; {task.name} trains with {type(model).__name__}"
        )
    model.set_logger(Logger(None, []))
    return model


def _finish_eva(model: OnPolicyAlgorithm, rollouts: _Rollouts, total_timesteps: int) -> int:
    """EVA, where ``model`` runs it on PPO's rollouts, fed the rollouts a run feeds it (from the first, until it
    converges or the budget's last); the number of rollouts it read."""
    if not isinstance(model, EvaRolloutsMixin):
        return 0
    read = 0
    while model.eva_pending:
        model.rollout_buffer = copy.deepcopy(rollouts[read])
        read += 1
        model._feed_eva(last=read * rollouts.steps >= total_timesteps)
    return read


def _components(model: BaseAlgorithm) -> dict[str, list[torch.nn.Parameter]]:
    """The trainable parameters by what they belong to: each adapted layer, then :data:`HEADS`."""
    layers = {name: [layer.lora_A, layer.lora_B] for name, layer in model.policy.lora_layers.items() if layer.r}
    taken = {id(p) for params in layers.values() for p in params}
    heads = [p for p in model.policy.parameters() if p.requires_grad and id(p) not in taken]
    return {**layers, HEADS: heads} if heads else layers


def layer_inputs(model: OnPolicyAlgorithm, rollout: RolloutBuffer) -> dict[str, InputMoments]:
    """The input moments of each adapted layer of ``model`` over ``rollout``'s observations."""
    adapted = {name: layer for name, layer in model.policy.lora_layers.items() if layer.r}
    return collect_input_moments(model.policy, adapted, [_observations(rollout)], _policy_and_value)


def _observations(rollout: RolloutBuffer) -> torch.Tensor:
    return torch.as_tensor(rollout.observations).reshape(-1, *rollout.obs_shape)


def _first_update(
    model: OnPolicyAlgorithm, rollout: RolloutBuffer, rate: float, seed: int, inputs: dict[str, InputMoments]
) -> dict[str, Any]:
    """One PPO update of ``model`` on ``rollout`` at ``rate`` from its init (restored after); ``inputs``: its
    layers' input moments at that init (:func:`layer_inputs`)."""
    policy = model.policy
    components = _components(model)
    initial = {name: [p.detach().clone() for p in params] for name, params in components.items()}
    optimizer_state = copy.deepcopy(policy.optimizer.state_dict())
    observations = _observations(rollout)
    with torch.no_grad():
        # SB3 hands back its one distribution object, refilled at every call: keep this call's
        before = copy.copy(policy.get_distribution(observations))
    model.rollout_buffer = copy.deepcopy(rollout)
    model.lr_schedule = lambda _: rate
    layers = {name: params[1] for name, params in components.items() if name != HEADS}
    np.random.seed(seed)  # the minibatches' order: one for every method
    with _path_lengths(policy.optimizer, layers) as path:
        model.train()
    # approx_kl is a numpy scalar in SB3's logger
    figures: dict[str, Any] = {
        "kl": _kl(policy, before, observations),
        "approx_kl": float(model.logger.name_to_value["train/approx_kl"]),
        "layers": {},
    }
    trained = {name: [p.detach().clone() for p in params] for name, params in components.items()}
    for name, params in components.items():
        # this component's update alone: every other one back at its init
        _load(components, initial)
        _load({name: params}, {name: trained[name]})
        alone = _kl(policy, before, observations)
        figures["layers"][name] = {"kl_alone": alone}
        if name in layers:
            displacement = float((trained[name][1] - initial[name][1]).norm())
            figures["layers"][name]["straightness"] = displacement / path[name] if path[name] else 0.0
            figures["layers"][name].update(_a_signals(initial[name][0], trained[name][0], inputs[name].second_moment))
    _load(components, initial)
    policy.optimizer.load_state_dict(optimizer_state)
    return figures


def _policy_and_value(policy: Any, observations: torch.Tensor) -> None:
    """Both heads' forward: every adapted layer, the value network's too, sees its inputs."""
    policy.get_distribution(observations)
    policy.predict_values(observations)


def _a_signals(initial: torch.Tensor, trained: torch.Tensor, second: torch.Tensor) -> dict[str, float]:
    """``a_signal`` and ``a_update_signal`` (module docstring) of a layer's A before and after the update, on inputs
    of second moment ``second``."""
    start = initial.reshape(initial.shape[0], -1).to(torch.float64)
    update = trained.reshape(trained.shape[0], -1).to(torch.float64) - start
    start_output = torch.trace(start @ second @ start.T)
    moved = torch.trace(update @ second @ update.T)
    return {
        "a_signal": row_signal(start, second),
        "a_update_signal": float(torch.sqrt(moved / start_output)) if start_output > 0 else float("nan"),
    }


def _load(components: dict[str, list[torch.nn.Parameter]], values: dict[str, list[torch.Tensor]]) -> None:
    with torch.no_grad():
        for name, params in components.items():
            for param, value in zip(params, values[name], strict=True):
                param.copy_(value)


def _kl(policy: Any, before: Any, observations: torch.Tensor) -> float:
    """``E_s KL(before(.|s) || policy(.|s))`` over ``observations``."""
    with torch.no_grad():
        kl = kl_divergence(before, policy.get_distribution(observations))
    return float((kl.sum(dim=-1) if kl.dim() > 1 else kl).mean())


@contextmanager
def _path_lengths(optimizer: torch.optim.Optimizer, params: dict[str, torch.Tensor]) -> Iterator[dict[str, float]]:
    """``{name: sum over optimizer steps of |param after - param before|}`` over the block's steps."""
    lengths = dict.fromkeys(params, 0.0)
    before: dict[str, torch.Tensor] = {}

    def pre_step(*_: Any) -> None:
        before.update({name: p.detach().clone() for name, p in params.items()})

    def post_step(*_: Any) -> None:
        for name, p in params.items():
            lengths[name] += float((p.detach() - before[name]).norm())

    handles = [optimizer.register_step_pre_hook(pre_step), optimizer.register_step_post_hook(post_step)]
    try:
        yield lengths
    finally:
        for handle in handles:
            handle.remove()


def suite_first_update(
    suite: Suite,
    log_dir: Path,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    report_only: bool = False,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure each (task, seed) not measured yet (kept per method and seed), then write the suite's
    ``first_update.json`` and ``first_update.md``; with ``report_only``, only what was measured before.

    :return: ``{task: {method: summary}}`` (:func:`_summary`).
    """
    out = Path(log_dir) / suite.name
    seeds = seeds or suite.seed_list
    # in the suite's order, whatever the command's: a page redrawn later reads the same
    chosen = [m for m in suite.methods if methods is None or m in methods]
    methods_of = {t.task: suite.low_rank_methods(t, chosen) for t in suite.tasks}
    # seed by seed, so that a study cut short has every task's first seeds
    for seed in [] if report_only else seeds:
        for suite_task in suite.tasks:
            paths = {m: record_path(out, suite_task.task, m, seed) for m in methods_of[suite_task.task]}
            missing = {m: suite.run_spec(suite_task, m, seed, out) for m, p in paths.items() if not p.is_file()}
            if not missing:
                continue
            echo(f"{suite_task.task} seed {seed}: the first update of {', '.join(missing)}")
            for method, record in measure_seed(missing, seed).items():
                atomic_write_json(paths[method], record)
                echo(f"  {method}: KL {record['factors']['1.0']['kl']:.4g} at its rate")
    report: dict[str, Any] = {}
    for task, task_methods in methods_of.items():
        paths = {m: [record_path(out, task, m, seed) for seed in seeds] for m in task_methods}
        records = {m: [json.loads(p.read_text()) for p in ps if p.is_file()] for m, ps in paths.items()}
        report[task] = {m: _summary(r) for m, r in records.items() if r}
    if not any(report.values()):
        raise ConfigError(
            f"no first update of suite {suite.name} is measured under {out / FOLDER}"
            + (": drop --report-only" if report_only else "")
        )
    for methods_report in report.values():
        _add_matched_rates(methods_report)
    atomic_write_json(out / "first_update.json", {"factors": list(FACTORS), "tasks": report})
    atomic_write_text(out / "first_update.md", first_update_markdown(suite.name, report))
    save_figure(draw_first_update(report), out / "first_update.png")
    return report


def draw_first_update(report: dict[str, Any]) -> Any:
    """One panel per task: each method's mean first-update KL against the fraction of its rate, log-log."""
    tasks = [task for task, methods in report.items() if methods]
    columns = min(5, len(tasks))
    rows = -(-len(tasks) // columns)
    figure, axes = new_figure(rows, columns, figsize=(3.2 * columns + 1.6, 2.9 * rows), dpi=110, squeeze=False)
    seeds: dict[str, set[int]] = {}
    for axis, task in zip(axes.flat, tasks, strict=False):
        for method, summary in report[task].items():
            kl = [fmean(summary["kl"][str(f)]) for f in FACTORS]
            axis.plot(FACTORS, kl, marker="o", color=method_color(method), linestyle=method_linestyle(method))
            axis.lines[-1].set_label(method)
            seeds.setdefault(method, set()).add(len(summary["seeds"]))
        axis.set(xscale="log", yscale="log", title=task, xlabel="fraction of the method's rate")
        axis.set_xticks(FACTORS, [_factor_label(f) for f in FACTORS])
    for axis in axes.flat[len(tasks) :]:
        axis.set_visible(False)
    for axis in axes[:, 0]:
        axis.set_ylabel("KL of the first update")
    # one legend beside the panels, each method once: eight methods' legend inside a panel hid its lines
    handles = {line.get_label(): line for axis in axes.flat for line in axis.lines}
    labels = [_legend_label(method, seeds[method]) for method in handles]
    # on the first row's last panel, outside it: the layout leaves it room
    axes[0, -1].legend(list(handles.values()), labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    return figure


def _legend_label(method: str, seed_counts: set[int]) -> str:
    """``lora (3 seeds)``, or ``lora (2-3 seeds)`` where tasks have different numbers of its seeds."""
    if len(seed_counts) == 1:
        return method_label(method, next(iter(seed_counts)))
    return f"{method} ({min(seed_counts)}-{max(seed_counts)} seeds)"


def _factor_label(factor: float) -> str:
    return "1" if factor == 1 else f"1/{round(1 / factor)}"


def _summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per factor, the seeds' KLs; at the method's rate (factor 1), each layer's figures averaged over seeds."""
    at_rate = [r["factors"]["1.0"] for r in records]
    layers = list(dict.fromkeys(name for r in at_rate for name in r["layers"]))
    return {
        "seeds": [r["seed"] for r in records],
        "platforms": [r.get("platform") for r in records],
        "learning_rate": records[0]["learning_rate"],
        "kl": {str(f): [r["factors"][str(f)]["kl"] for r in records] for f in FACTORS},
        "approx_kl": [r["approx_kl"] for r in at_rate],
        "layers": {
            name: {
                metric: fmean(r["layers"][name][metric] for r in at_rate if metric in r["layers"].get(name, {}))
                for metric in LAYER_METRICS
                if any(metric in r["layers"].get(name, {}) for r in at_rate)
            }
            for name in layers
        },
    }


def matched_factor(kl: dict[str, float], target: float) -> float | None:
    """The largest fraction of the rate at which the KL (``{factor: mean KL}``) would equal ``target``, interpolated
    linearly in log KL against log rate between the two factors that bracket it; ``None`` outside the factors'
    range."""
    if target <= 0:
        return None
    # from the method's own rate down: the largest fraction at which the KL comes down to the target
    points = sorted(((math.log(float(f)), math.log(v)) for f, v in kl.items() if v > 0), reverse=True)
    goal = math.log(target)
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if min(y0, y1) <= goal <= max(y0, y1):
            return math.exp(x0 + (goal - y0) * (x1 - x0) / (y1 - y0)) if y1 != y0 else math.exp(x0)
    return None


def _add_matched_rates(methods: dict[str, Any]) -> None:
    """Each method's ``matched``: the fraction of its rate at which its mean first-update KL equals the
    reference's at the reference's rate."""
    if REFERENCE not in methods:
        return
    target = fmean(methods[REFERENCE]["kl"]["1.0"])
    for summary in methods.values():
        summary["matched"] = matched_factor({f: fmean(v) for f, v in summary["kl"].items()}, target)
        summary["kl_over_reference"] = fmean(summary["kl"]["1.0"]) / target if target > 0 else None


def _factor_name(factor: float) -> str:
    return "its rate" if factor == 1 else f"rate / {round(1 / factor)}"


def first_update_markdown(suite: str, report: dict[str, Any]) -> str:
    """The page: per task, one row per method (KL at each fraction of its rate, the matched rate), then the
    per-layer figures at the method's rate."""
    lines = [
        f"# The first PPO update from one rollout: suite {suite}",
        "",
        "Each method's first update from the pretrained policy, every method of a seed on one and the same rollout "
        "(the pretrained policy's, which every adapter method is at step 0) in the same minibatch order, so the inits "
        "alone differ. KL: the exact mean KL from the pretrained policy to the updated one over the rollout's "
        "states, mean over seeds [95% CI]; SB3's `train/approx_kl` (the runs' logs' figure) at the method's rate "
        f"beside it. Matched: the fraction of the method's rate at which its mean KL equals {REFERENCE}'s at "
        f"{REFERENCE}'s rate (interpolated in log KL against log rate; '>= 1' where its own rate moves it no "
        "further). EVA reads the rollouts from the first on, as in a run, until it converges. Made by "
        f"`eva-rl compare --suite {suite} --first-update` (module eva_rl.experiments.studies.first_update).",
    ]
    platforms = [p for methods in report.values() for s in methods.values() for p in s["platforms"]]
    lines += ["", platform_line(platforms)]
    for task, methods in report.items():
        if not methods:
            continue
        # one row per method: its KL at each fraction of its rate, then the rate at which it takes LoRA's step
        lines += ["", f"## {task}", ""]
        headings = ["method", "seeds", "rate", *(f"KL at {_factor_name(f)}" for f in FACTORS)]
        headings += ["approx. KL at its rate", "matched"]
        lines += table(headings)
        for method, s in methods.items():
            cells = [method, str(len(s["seeds"])), f"{s['learning_rate']:.3g}"]
            # three significant digits: a KL spans 1e-5 (a 1M agent's first update at its small rate) to 10 and more
            cells += [mean_interval(s["kl"][str(f)]).format(".3g") for f in FACTORS]
            cells.append(mean_interval(s["approx_kl"]).format(".3g"))
            cells.append(_matched_cell(s))
            lines.append(table_row(cells))
        # then, at each method's rate, one table per layer figure (methods as rows, layers as columns)
        components = list(dict.fromkeys(c for s in methods.values() for c in s["layers"]))
        for metric, heading in LAYER_METRICS.items():
            shown = [c for c in components if any(metric in s["layers"].get(c, {}) for s in methods.values())]
            if not shown:  # records made before the figure joined the study
                continue
            lines += ["", f"At each method's rate, per layer, mean over seeds: {heading}.", ""]
            rows = [
                [method, *(_figure(s["layers"].get(c, {}).get(metric)) for c in shown)] for method, s in methods.items()
            ]
            lines += table(["method", *shown], rows)
    return "\n".join(lines) + "\n"


def _matched_cell(summary: dict[str, Any]) -> str:
    """The matched fraction; where none is in the fractions' range, which side it lies on."""
    if summary.get("matched") is not None:
        return f"1 / {1 / summary['matched']:.3g}"
    ratio = summary.get("kl_over_reference")
    if ratio is None:
        return "-"
    return ">= 1" if ratio <= 1 else f"< 1 / {round(1 / FACTORS[-1])}"


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"
