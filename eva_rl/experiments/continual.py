"""Continual fine-tuning: a sequence of tasks learned one after the other from one base agent, and what each
approach keeps.

Approaches, per seed:

- a bank per adapter method (``eva``, ``lora``): each stage fine-tunes an adapter from the frozen base agent, and
  the adapters go into one :class:`~eva_rl.bank.AdapterBank` (every earlier task kept, base weights stored once);
- ``full-copies``: each stage fine-tunes all weights from the base agent and keeps the copy (nothing forgotten,
  a whole network per task);
- ``full-seq``: one network fine-tuned stage after stage, each from the previous stage's model (it forgets).

Every stage is an ordinary resumable run (:func:`~eva_rl.experiments.runs.run`); a sequence file in
``configs/sequences/`` names the base task (its agent and settings), the stages, the adapter methods and the seeds.
After the runs, every approach is evaluated on every task after every stage: the average return after the last
stage, forgetting (best minus final return per task), forward transfer (a stage's normalized AUC minus that of
full fine-tuning from the base on it) and the memory each approach holds.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eva_rl.bank import AdapterBank
from eva_rl.errors import ConfigError
from eva_rl.experiments.compare import run_local
from eva_rl.experiments.environments import agent_env, import_packages
from eva_rl.experiments.finetune import check_agent_fits
from eva_rl.experiments.runs import RunDirError, RunResult, RunSpec, run_settings, settings_differences
from eva_rl.experiments.stats import Interval, normalized_auc, stratified_iqm
from eva_rl.experiments.tasks import CONFIG_DIR, TaskConfig, build_config, check_seeds, find_task, load_named_config
from eva_rl.experiments.training import evaluate
from eva_rl.files import atomic_write_json, atomic_write_text, check_writable
from eva_rl.loading import load_agent, load_pretrained
from eva_rl.methods import get_method, method_names
from eva_rl.selection import layer_activations, select_task, subspace_signature

SEQUENCE_DIR = CONFIG_DIR / "sequences"
FULL_COPIES, FULL_SEQ = "full-copies", "full-seq"
SIGNATURE_SEED = 20_000  # apart from training (0..), evaluation (the task's eval seed) and tuning seeds
# The registry's full fine-tuning of the pretrained weights: the copies, the sequential network, the reference.
_FULL = next(m for m in method_names() if get_method(m).trains == "all" and get_method(m).pretrained)


@dataclass
class Stage:
    """One task of a sequence.

    :param env: The stage's env (a registered id); the base task's wrappers and algorithm settings apply.
    :param total_timesteps: Fine-tuning budget of the stage.
    :param name: Short name (default: the id without ``MiniGrid-`` and the version).
    :param env_kwargs: The env's keyword arguments.
    """

    env: str
    total_timesteps: int
    name: str | None = None
    env_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.env, str) or not self.env:
            raise ConfigError(f"stage env={self.env!r} is invalid: expected an env id")
        value = self.total_timesteps
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"stage {self.env}: total_timesteps={value!r} is invalid: expected an integer >= 1")
        if self.name is None:
            self.name = re.sub(r"^MiniGrid-|-v\d+$", "", self.env)
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", self.name):
            raise ConfigError(f"stage name={self.name!r} is invalid: expected letters, digits and '_.+-'")
        if not isinstance(self.env_kwargs, dict):
            raise ConfigError(f"stage {self.env}: env_kwargs={self.env_kwargs!r} is invalid: expected a mapping")


@dataclass
class ContinualSequence:
    """A continual benchmark.

    :param name: Results go to ``<log-dir>/<name>/``.
    :param base_task: Task in ``configs/`` whose agent is the base and whose settings every stage uses.
    :param stages: The tasks, in order.
    :param methods: Adapter methods, each building a bank.
    :param seeds: Number of seeds (0..n-1) or a list.
    :param sequential: Also fine-tune one network stage after stage (``full-seq``).
    :param eval_episodes: Episodes per evaluation (default: the base task's).
    :param method_settings: Per-method ``learning_rate``, ``r`` ... as in suites (``full`` included).
    :param signature_steps: Env steps of the base policy in each stage's env that make the stage's signature
        (:meth:`~eva_rl.bank.AdapterBank.set_signature`).
    :param selection_steps: Unlabelled env steps :meth:`~eva_rl.bank.AdapterBank.identify` is measured with.
    :param selection_trials: Rollouts (other seeds than the signature's) per stage and step count.
    """

    name: str
    base_task: str
    stages: list[Stage]
    methods: list[str] = field(default_factory=lambda: ["eva", "lora"])
    seeds: int | list[int] = 5
    sequential: bool = True
    eval_episodes: int | None = None
    method_settings: dict[str, dict[str, float]] = field(default_factory=dict)
    signature_steps: int = 1024
    selection_steps: list[int] = field(default_factory=lambda: [16, 64, 256])
    selection_trials: int = 4

    def __post_init__(self) -> None:
        for name in ("signature_steps", "selection_trials"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} is invalid: expected an integer >= 1")
        steps = self.selection_steps
        if (
            not isinstance(steps, list)
            or not steps
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in steps)
        ):
            raise ConfigError(f"selection_steps={steps!r} is invalid: expected a list of integers >= 1")
        if not isinstance(self.stages, list) or len(self.stages) < 2:
            raise ConfigError(f"stages={self.stages!r} is invalid: expected a list of at least two stages")
        self.stages = [
            s if isinstance(s, Stage) else build_config(Stage, s, f"sequence {self.name} stage") for s in self.stages
        ]
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stage names {names} repeat; give the stages distinct names")
        adapters = [m for m in method_names() if get_method(m).adapters]
        if not isinstance(self.methods, list) or not self.methods or set(self.methods) - set(adapters):
            raise ConfigError(f"methods={self.methods!r} is invalid: expected a non-empty list out of {adapters}")
        check_seeds(self.seeds, "seeds")
        if not isinstance(self.sequential, bool):
            raise ConfigError(f"sequential={self.sequential!r} is invalid: expected true or false")
        value = self.eval_episodes
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"eval_episodes={value!r} is invalid: expected an integer >= 1")

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    @property
    def approaches(self) -> list[str]:
        return [*self.methods, FULL_COPIES, *([FULL_SEQ] if self.sequential else [])]


def load_sequence(name_or_path: str) -> ContinualSequence:
    """A sequence by name (``configs/sequences/<name>.yaml``) or path."""
    return load_named_config(ContinualSequence, SEQUENCE_DIR, name_or_path, "sequence")


class ContinualPlan:
    """Every run of a sequence, and where it goes."""

    def __init__(self, sequence: ContinualSequence, log_dir: Path, device: str = "cpu") -> None:
        base = find_task(sequence.base_task)
        if base is None or base.agent_path is None:
            raise ConfigError(f"sequence {sequence.name}: base_task {sequence.base_task!r} is not a task with an agent")
        self.sequence, self.base, self.root, self.device = sequence, base, log_dir / sequence.name, device
        self.signatures: dict[str, dict[str, Any]] = {}

    def stage_task(self, stage: Stage, method: str) -> TaskConfig:
        task = self.base.for_method(method, self.sequence.method_settings.get(method))
        eval_settings = task.eval
        if self.sequence.eval_episodes is not None:
            eval_settings = dataclasses.replace(task.eval, episodes=self.sequence.eval_episodes)
        return task.override(
            name=stage.name,
            target_env=stage.env,
            source_env=None,
            env_kwargs={**task.env_kwargs, **stage.env_kwargs},
            total_timesteps=stage.total_timesteps,
            checkpoint_freq=min(task.checkpoint_freq, stage.total_timesteps),
            eval=dataclasses.replace(eval_settings, freq=min(eval_settings.freq, stage.total_timesteps)),
        )

    def from_base(self, stage: Stage, method: str, seed: int) -> RunSpec:
        """A stage fine-tuned from the base agent (a bank's adapter, or a full copy)."""
        return RunSpec(self.stage_task(stage, method), method, seed, self.root, self.base.agent_path, self.device)

    def sequential(self, index: int, seed: int) -> RunSpec:
        """Stage ``index`` of the one network fine-tuned stage after stage (stage 0 is the full copy's run)."""
        stage = self.sequence.stages[index]
        if index == 0:
            return self.from_base(stage, _FULL, seed)
        previous = self.sequential(index - 1, seed).run_dir / "model.zip"
        task = self.stage_task(stage, _FULL)
        return RunSpec(task, _FULL, seed, self.root / "sequential", previous, self.device)

    def independent_specs(self) -> list[RunSpec]:
        return [
            self.from_base(stage, method, seed)
            for seed in self.sequence.seed_list
            for stage in self.sequence.stages
            for method in [*self.sequence.methods, _FULL]
        ]

    def bank_dir(self, method: str, seed: int) -> Path:
        return self.root / "banks" / method / f"seed{seed}"

    def check_stages(self) -> None:
        """Stop before the first run when a stage cannot run (an unknown env id, spaces other than the base agent's,
        a budget below one rollout), not after the stages before it have run."""
        for stage in self.sequence.stages:
            check_agent_fits(self.stage_task(stage, _FULL), self.base.agent_path, self.sequence.methods)


def evaluate_model(plan: ContinualPlan, model: Any, agent_path: Path, stage: Stage) -> float:
    """The return of ``model`` (acting with the observation pipeline of the agent at ``agent_path``) on ``stage``,
    with the base task's evaluation settings: the protocol of every run's own evaluations."""
    task = plan.stage_task(stage, _FULL)
    agent = load_pretrained(agent_path, device="cpu")
    env = agent_env(task, agent, task.eval.env_count, task.eval.seed, evaluation=True)
    with closing(env):
        return evaluate(model, env, task.eval.episodes, task.eval.seed, task.eval.deterministic)[0]


def evaluate_bank(bank: AdapterBank, episodes: int | None = None) -> dict[str, float]:
    """Each task's return through ``bank``, on the env its ``info`` names (``task``: the task file whose wrappers and
    evaluation settings apply, ``env``, ``env_kwargs``, ``eval_episodes``; banks made by :func:`run_sequence` record
    them).

    :param episodes: Episodes per task (default: the number the task's info records, else its task file's).

    :raises ConfigError: for a task whose info does not say where to evaluate it.
    """
    returns = {}
    agents: dict[str, Any] = {}  # the env wrappers need the base agent (its VecNormalize); load it once per file
    for name, adapter in bank.tasks.items():
        task = find_task(str(adapter.info.get("task")))
        if task is None or not isinstance(adapter.info.get("env"), str):
            raise ConfigError(
                f"bank task {name!r} records no task file and env to evaluate on (info {adapter.info}); banks made "
                "by eva-rl continual do"
            )
        import_packages(task.env_packages)
        episodes_here = episodes or adapter.info.get("eval_episodes") or task.eval.episodes
        eval_settings = dataclasses.replace(task.eval, episodes=episodes_here)
        task = task.override(
            target_env=adapter.info["env"], env_kwargs={**task.env_kwargs, **adapter.info.get("env_kwargs", {})},
            eval=eval_settings,
        )  # fmt: skip
        agent_path = str(bank.base_path or task.agent_path)
        if agent_path not in agents:
            agents[agent_path] = load_pretrained(agent_path, device="cpu")
        agent = agents[agent_path]
        bank.activate(name)
        with closing(agent_env(task, agent, task.eval.env_count, task.eval.seed, evaluation=True)) as env:
            returns[name] = evaluate(bank.model, env, task.eval.episodes, task.eval.seed, task.eval.deterministic)[0]
    bank.deactivate()
    return returns


def _cached(path: Path, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    data = compute()
    atomic_write_json(path, data)
    return data


def build_bank(plan: ContinualPlan, method: str, seed: int) -> tuple[AdapterBank, dict[str, float]]:
    """The bank of ``method``'s stage adapters for ``seed`` (saved to its folder) and each task's return through it.

    Where the stage runs' ``adapter/`` folders are gone (a clone of results that keeps only each run's
    ``result.json``), the bank saved beside them stands in: the page regenerates without training anything.
    """
    folder = plan.bank_dir(method, seed)
    adapters = [plan.from_base(stage, method, seed).run_dir / "adapter" for stage in plan.sequence.stages]
    if not all((path / "adapter.safetensors").is_file() for path in adapters) and (folder / "bank.json").is_file():
        bank = AdapterBank.load(folder, device="cpu")
    else:
        bank = AdapterBank(load_agent(plan.base.agent_path, device="cpu"), plan.base.agent_path)
        for stage in plan.sequence.stages:
            spec = plan.from_base(stage, method, seed)
            info = {
                "task": plan.base.name,
                "env": stage.env,
                "env_kwargs": stage.env_kwargs,
                "eval_episodes": spec.task.eval.episodes,
                "run": str(spec.run_dir),
            }
            bank.add(stage.name, spec.run_dir / "adapter", info=info)
            bank.tasks[stage.name].signature = stage_signature(plan, stage)
        bank.save(folder)
    return bank, _cached(folder / "returns.json", lambda: _bank_returns(plan, bank))


def _bank_returns(plan: ContinualPlan, bank: AdapterBank) -> dict[str, float]:
    values = {}
    for stage in plan.sequence.stages:
        bank.activate(stage.name)
        values[stage.name] = evaluate_model(plan, bank.model, plan.base.agent_path, stage)
    return values


def _base_activations(plan: ContinualPlan, stage: Stage, steps: int, seed: int) -> dict[str, Any]:
    """The base policy's layer inputs over ``steps`` steps in ``stage``'s env (envs and actions seeded by ``seed``)."""
    task = plan.stage_task(stage, _FULL)
    agent = load_pretrained(plan.base.agent_path, device="cpu")
    with closing(agent_env(task, agent, task.n_envs, seed)) as env:
        return layer_activations(agent.model.policy, env, steps, seed)


def stage_signature(plan: ContinualPlan, stage: Stage) -> dict[str, Any]:
    """The stage's signature: the base policy's input subspaces in its env (the same for every method and seed)."""
    if stage.name not in plan.signatures:
        activations = _base_activations(plan, stage, plan.sequence.signature_steps, SIGNATURE_SEED)
        plan.signatures[stage.name] = subspace_signature(activations, plan.base.lora.r)
    return plan.signatures[stage.name]


def selection_accuracy(plan: ContinualPlan) -> dict[str, Any]:
    """How often :func:`~eva_rl.selection.select_task` names the right stage from ``selection_steps`` unlabelled steps
    of the base policy in a stage's env (``selection_trials`` rollouts per stage, seeds apart from the signatures')."""
    signatures = {stage.name: stage_signature(plan, stage) for stage in plan.sequence.stages}
    longest = max(plan.sequence.selection_steps)
    picks: dict[int, list[dict[str, str]]] = {n: [] for n in plan.sequence.selection_steps}
    for stage in plan.sequence.stages:
        for trial in range(plan.sequence.selection_trials):
            activations = _base_activations(plan, stage, longest, SIGNATURE_SEED + 1 + trial)
            for n in plan.sequence.selection_steps:
                # the first n env steps' rows: every layer sees the same number of rows per env step
                prefix = {k: v[: v.shape[0] * n // longest] for k, v in activations.items()}
                picks[n].append({"stage": stage.name, "picked": select_task(prefix, signatures)[0]})
    return {
        "accuracy": {str(n): sum(p["stage"] == p["picked"] for p in rows) / len(rows) for n, rows in picks.items()},
        "trials": plan.sequence.selection_trials,
        "picks": {str(n): rows for n, rows in picks.items()},
    }


def sequential_returns(plan: ContinualPlan, seed: int) -> list[dict[str, float]]:
    """``[after stage k][task]``: the sequentially fine-tuned network's return on every task after every stage."""
    return [_sequential_row(plan, index, seed) for index in range(len(plan.sequence.stages))]


def _sequential_row(plan: ContinualPlan, index: int, seed: int) -> dict[str, float]:
    """The network after stage ``index`` on every task (cached in its run folder)."""
    spec = plan.sequential(index, seed)

    def row() -> dict[str, float]:
        model = load_agent(spec.run_dir / "model.zip", device="cpu")
        # its own task: the run's last evaluation, which used this protocol
        own = _sequential_result(plan, index, seed).final_return
        stages = plan.sequence.stages
        return {
            s.name: own if i == index else evaluate_model(plan, model, spec.run_dir / "model.zip", s)
            for i, s in enumerate(stages)
        }

    return _cached(spec.run_dir / "returns_on_every_task.json", row)


def _sequential_row_in_worker(plan: ContinualPlan, index: int, seed: int) -> None:
    import torch

    torch.set_num_threads(1)
    import_packages(plan.base.env_packages)
    _sequential_row(plan, index, seed)


def evaluate_sequential(plan: ContinualPlan, workers: int = 1) -> None:
    """Evaluate every stage of the sequential network on every task, ``workers`` processes at a time (each row is
    cached in its run folder, so :func:`sequential_returns` then only reads)."""
    jobs = [
        (index, seed)
        for seed in plan.sequence.seed_list
        for index in range(len(plan.sequence.stages))
        if not (plan.sequential(index, seed).run_dir / "returns_on_every_task.json").is_file()
    ]
    if workers <= 1 or len(jobs) < 2:
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        for future in [pool.submit(_sequential_row_in_worker, plan, index, seed) for index, seed in jobs]:
            future.result()


@dataclass
class ApproachStats:
    """One approach over its seeds: IQM with 95% stratified-bootstrap CIs.

    :ivar returns: ``[after stage k][task]``: mean return over seeds (k = 0 is the base agent).
    :ivar average_final: Mean return over the tasks after the last stage.
    :ivar forgetting: Mean over tasks of best minus final return.
    :ivar forgetting_per_task: ``{task: IQM forgetting}``.
    :ivar forward_transfer: Mean over tasks of the stage's normalized AUC minus full fine-tuning's from the base.
    :ivar memory_bytes: What the approach holds after the sequence (parameters and buffers, float32).
    """

    seeds: int
    returns: list[dict[str, float]]
    average_final: Interval
    forgetting: Interval
    forgetting_per_task: dict[str, float]
    forward_transfer: Interval
    memory_bytes: int


def _approach_seed(
    plan: ContinualPlan, approach: str, seed: int, results: dict[tuple[str, str, int], RunResult], base_bytes: int
) -> tuple[list[dict[str, float]], int]:
    """``[after stage k][task]`` for k = 0 (the base) ... K, and the bytes the approach holds after the sequence."""
    stages = plan.sequence.stages
    base_row = {s.name: results[(s.name, _FULL, seed)].jumpstart for s in stages}
    if approach == FULL_SEQ:
        return [base_row, *sequential_returns(plan, seed)], base_bytes
    if approach == FULL_COPIES:
        final = {s.name: results[(s.name, _FULL, seed)].final_return for s in stages}
        memory = base_bytes * len(stages)
    else:
        bank, final = build_bank(plan, approach, seed)
        memory = base_bytes + sum(task.nbytes for task in bank.tasks.values())
    rows = [
        {s.name: final[s.name] if i <= k else base_row[s.name] for i, s in enumerate(stages)}
        for k in range(len(stages))
    ]
    return [base_row, *rows], memory


def _stage_aucs(
    plan: ContinualPlan, approach: str, seed: int, auc: dict[tuple[str, str, int], float], horizon: dict[str, float]
) -> list[float]:
    """The normalized AUC of each stage's run as ``approach`` made it."""
    stages = plan.sequence.stages
    if approach != FULL_SEQ:
        method = _FULL if approach == FULL_COPIES else approach
        return [auc[(s.name, method, seed)] for s in stages]
    return [
        normalized_auc(*_sequential_result(plan, i, seed).sample_curve(), horizon=horizon[s.name])
        for i, s in enumerate(stages)
    ]


def continual_report(plan: ContinualPlan, results: dict[tuple[str, str, int], RunResult]) -> dict[str, ApproachStats]:
    """Every approach's statistics (runs must be complete)."""
    stages = plan.sequence.stages
    horizon = {s.name: max(r.sample_curve()[0][-1] for (n, _, _), r in results.items() if n == s.name) for s in stages}
    auc = {key: normalized_auc(*r.sample_curve(), horizon=horizon[key[0]]) for key, r in results.items()}
    base_bytes = AdapterBank(load_agent(plan.base.agent_path, device="cpu")).base_nbytes()
    report = {}
    for approach in plan.sequence.approaches:
        matrices, memory, averages, forgetting, transfer = [], [], [], [], []
        per_task: dict[str, list[float]] = {s.name: [] for s in stages}
        for seed in plan.sequence.seed_list:
            matrix, held = _approach_seed(plan, approach, seed, results, base_bytes)
            matrices.append(matrix)
            memory.append(held)
            averages.append(float(np.mean([matrix[-1][s.name] for s in stages])))
            # best over the rows after the task's own stage (row i + 1), minus the last row
            drops = [max(row[s.name] for row in matrix[i + 1 :]) - matrix[-1][s.name] for i, s in enumerate(stages)]
            for s, drop in zip(stages, drops):
                per_task[s.name].append(drop)
            forgetting.append(float(np.mean(drops)))
            own = _stage_aucs(plan, approach, seed, auc, horizon)
            transfer.append(float(np.mean([o - auc[(s.name, _FULL, seed)] for o, s in zip(own, stages)])))
        report[approach] = ApproachStats(
            seeds=len(matrices),
            returns=[
                {name: float(np.mean([m[k][name] for m in matrices])) for name in matrices[0][k]}
                for k in range(len(matrices[0]))
            ],
            average_final=stratified_iqm([averages]),
            forgetting=stratified_iqm([forgetting]),
            forgetting_per_task={name: float(np.mean(values)) for name, values in per_task.items()},
            forward_transfer=stratified_iqm([transfer]),
            memory_bytes=int(np.mean(memory)),
        )
    return report


def _kept_without_start(plan: ContinualPlan, spec: RunSpec) -> bool:
    """Whether ``spec`` is a sequential stage kept as a result whose starting model (the previous stage's, not kept
    in a clone of results) is gone: it counts as complete if every other setting matches the one recorded.

    :raises RunDirError: for such a run recorded with other settings (it cannot be rerun without that model).
    """
    result_path = spec.run_dir / "result.json"
    if spec.agent_path.is_file() or not result_path.is_file():
        return False
    recorded = dict(RunResult.read(result_path).settings or {})
    current = run_settings(dataclasses.replace(spec, agent_path=plan.base.agent_path))
    recorded.pop("agent_sha256", None)
    current.pop("agent_sha256", None)
    differences = settings_differences(recorded, current)
    if differences:
        raise RunDirError(
            f"{spec.run_dir} holds a completed run made with other settings ({'; '.join(differences)}) and its "
            f"starting model {spec.agent_path} is gone: rerun the sequence from its first stage in another --log-dir"
        )
    return True


def _sequential_result(plan: ContinualPlan, index: int, seed: int) -> RunResult:
    spec = plan.sequential(index, seed)
    return RunResult.from_dict(json.loads((spec.run_dir / "result.json").read_text()))


def run_sequence(
    sequence: ContinualSequence, log_dir: Path, workers: int = 1, echo: Callable[[str], None] = print
) -> dict[str, ApproachStats]:
    """Run (or resume) every stage of every approach, build the banks, evaluate, and write ``continual.json``,
    ``continual.md`` and ``continual.png`` to ``<log_dir>/<name>/``."""
    base = find_task(sequence.base_task)
    if base is not None:
        import_packages(base.env_packages)
    plan = ContinualPlan(sequence, log_dir)
    check_writable(plan.root)
    plan.check_stages()
    specs = plan.independent_specs()
    results: dict[tuple[str, str, int], RunResult] = {}
    for spec, result in zip(specs, run_local(specs, workers, echo)):
        results[(spec.task.name, spec.method, spec.seed)] = result
    if sequence.sequential:
        for index in range(1, len(sequence.stages)):
            stage_runs = [plan.sequential(index, seed) for seed in sequence.seed_list]
            run_local([spec for spec in stage_runs if not _kept_without_start(plan, spec)], workers, echo)
        evaluate_sequential(plan, workers)
    report = continual_report(plan, results)
    selection = _cached(plan.root / "selection.json", lambda: selection_accuracy(plan))
    atomic_write_json(
        plan.root / "continual.json",
        {"approaches": {a: dataclasses.asdict(s) for a, s in report.items()}, "selection": selection["accuracy"]},
    )
    atomic_write_text(plan.root / "continual.md", continual_markdown(sequence, report, selection))
    plot_continual(sequence, report, plan.root / "continual.png")
    return report


def continual_markdown(
    sequence: ContinualSequence, report: dict[str, ApproachStats], selection: dict[str, Any] | None = None
) -> str:
    def cell(interval: Interval) -> str:
        return f"{interval.estimate:.3f} [{interval.low:.3f}, {interval.high:.3f}]"

    full_bytes = report[FULL_COPIES].memory_bytes / len(sequence.stages)
    lines = [
        f"# Continual sequence `{sequence.name}`",
        "",
        f"Stages: {' -> '.join(f'{s.name} ({s.total_timesteps:,})' for s in sequence.stages)}; base: the agent of "
        f"`{sequence.base_task}`. IQM over {len(sequence.seed_list)} seeds with 95% stratified-bootstrap CIs.",
        "",
        "| approach | average return after the sequence | forgetting | forward transfer (AUC vs full) | memory "
        "| vs one network |",
        "|---|---|---|---|---|---|",
    ]
    for approach, stats in report.items():
        lines.append(
            f"| {approach} | {cell(stats.average_final)} | {cell(stats.forgetting)} | {cell(stats.forward_transfer)} | "
            f"{stats.memory_bytes / 1024:,.0f} KiB | {stats.memory_bytes / full_bytes:.2f}x |"
        )
    lines += ["", "Forgetting per task (mean over seeds, best minus final return):", ""]
    names = [s.name for s in sequence.stages]
    lines += ["| approach | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for approach, stats in report.items():
        lines.append(f"| {approach} | " + " | ".join(f"{stats.forgetting_per_task[n]:.3f}" for n in names) + " |")
    if selection:
        accuracy = selection["accuracy"]
        lines += [
            "",
            f"Picking the adapter for an unlabelled env (the base policy's layer-input subspaces, "
            f"{sequence.signature_steps} steps per signature; {selection['trials']} rollouts per stage): share of "
            "rollouts whose stage was named right.",
            "",
            "| unlabelled env steps | " + " | ".join(accuracy) + " |",
            "|---|" + "---|" * len(accuracy),
            "| accuracy | " + " | ".join(f"{value:.2f}" for value in accuracy.values()) + " |",
        ]
    return "\n".join(lines) + "\n"


def plot_continual(sequence: ContinualSequence, report: dict[str, ApproachStats], path: Path) -> Path:
    """``continual.png``: per approach, every task's mean return after each stage (0: the base agent)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s.name for s in sequence.stages]
    figure, axes = plt.subplots(1, len(report), figsize=(3.6 * len(report), 3.4), dpi=120, sharey=True)
    for axis, (approach, stats) in zip(np.atleast_1d(axes), report.items()):
        for name in names:
            axis.plot(range(len(stats.returns)), [row[name] for row in stats.returns], marker="o", ms=3, label=name)
        axis.set_title(approach, fontsize=9)
        axis.set_xticks(range(len(stats.returns)), ["base", *[str(i) for i in range(1, len(names) + 1)]])
        axis.set_xlabel("after stage")
        axis.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel(f"eval return (mean of {len(sequence.seed_list)} seeds)")
    np.atleast_1d(axes)[-1].legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


__all__: Sequence[str] = ["ContinualSequence", "Stage", "load_sequence", "run_sequence"]
