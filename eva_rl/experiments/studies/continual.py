"""The continual study (``eva-rl continual --sequence NAME``): a sequence of tasks learned one after the other from
one base agent, and what each approach keeps.

Approaches (:class:`Approach`), per seed:

- a bank per adapter method (``eva``, ``lora``): each stage fine-tunes an adapter from the frozen base agent, and
  the adapters go into one :class:`~eva_rl.bank.AdapterBank` (every earlier task kept, base weights stored once);
- ``full-copies``: each stage fine-tunes all weights from the base agent and keeps the copy (nothing forgotten,
  a whole network per task);
- ``full-seq``: one network fine-tuned stage after stage, each from the previous stage's model (it forgets).

Every stage is an ordinary resumable run. After the runs, every approach is evaluated on every task after every
stage: the average return after the last stage, forgetting (best minus final return per task), forward transfer (a
stage's normalized AUC minus that of full fine-tuning from the base on it) and the memory each approach holds.
The page is ``continual.md``, ``continual.json`` and ``continual.png`` in ``<log_dir>/<sequence>/``.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eva_rl.bank import AdapterBank
from eva_rl.errors import ConfigError
from eva_rl.experiments.environments import agent_env, import_packages
from eva_rl.experiments.execute import Executor
from eva_rl.experiments.finetune import check_agent_fits
from eva_rl.experiments.machine import platform_line
from eva_rl.experiments.markdown import table
from eva_rl.experiments.plots import new_figure, save_figure, seed_count
from eva_rl.experiments.published import SEQUENCE_METRICS, PublishedApproaches, published_notes
from eva_rl.experiments.run_folder import RunDirError, RunFolder, RunResult
from eva_rl.experiments.runs import RunSpec, run_differences, run_settings
from eva_rl.experiments.sequences import ContinualSequence, Stage
from eva_rl.experiments.stats import Interval, normalized_auc, stratified_iqm
from eva_rl.experiments.studies.base import Planned, Study
from eva_rl.experiments.suites import load_suite
from eva_rl.experiments.tasks import TaskConfig, find_task
from eva_rl.experiments.training import evaluate
from eva_rl.files import atomic_write_json, atomic_write_text, cached_json
from eva_rl.loading import load_agent, load_pretrained
from eva_rl.methods import get_method, method_names
from eva_rl.selection import layer_activations, select_task, subspace_signature

SIGNATURE_SEED = 20_000  # apart from training (0..), evaluation (the task's eval seed) and tuning seeds
# The registry's full fine-tuning of the pretrained weights: the copies, the sequential network, the reference.
FULL = next(m for m in method_names() if get_method(m).trains == "all" and get_method(m).pretrained)
# Training from scratch: Continual World's single-task reference for forward transfer.
SCRATCH = next(m for m in method_names() if not get_method(m).pretrained)


class ApproachKind(enum.Enum):
    """How an approach keeps what it learned of each stage."""

    BANK = "bank"
    """An adapter per stage, from the base agent, in one bank."""
    COPIES = "copies"
    """A fully fine-tuned copy per stage, from the base agent."""
    SEQUENTIAL = "sequential"
    """One network fine-tuned stage after stage."""


@dataclass(frozen=True)
class Approach:
    """An approach of the study: its kind and the registered method its stages are fine-tuned with."""

    kind: ApproachKind
    method: str

    @property
    def name(self) -> str:
        """The page's name: the adapter method for a bank, ``full-copies`` or ``full-seq``."""
        return {ApproachKind.BANK: self.method, ApproachKind.COPIES: "full-copies"}.get(self.kind, "full-seq")


def approaches(sequence: ContinualSequence) -> list[Approach]:
    """A bank per adapter method, the full copies, and the sequential network if the sequence has one."""
    kinds = [ApproachKind.COPIES, *([ApproachKind.SEQUENTIAL] if sequence.sequential else [])]
    return [Approach(ApproachKind.BANK, m) for m in sequence.methods] + [Approach(kind, FULL) for kind in kinds]


@dataclass
class ApproachStats:
    """One approach over its seeds: IQM with 95% stratified-bootstrap CIs.

    :ivar returns: ``[after stage k][task]``: mean return over seeds (k = 0 is the base agent).
    :ivar average_final: Mean return over the tasks after the last stage.
    :ivar forgetting: Mean over tasks of best minus final return.
    :ivar forgetting_per_task: ``{task: IQM forgetting}``.
    :ivar forward_transfer: Mean over tasks of the stage's normalized AUC minus full fine-tuning's from the base.
    :ivar memory_bytes: What the approach holds after the sequence (parameters and buffers, float32).
    :ivar cw_forgetting: Continual World's forgetting: mean over tasks of the score at the end of the task's own stage
        minus the score after the last stage (``None`` unless the sequence sets ``continual_world``).
    :ivar cw_forward_transfer: Continual World's forward transfer: mean over tasks of
        ``(AUC - AUC_scratch) / (1 - AUC_scratch)``, ``AUC_scratch`` the mean over seeds of training from scratch on
        the task with the same budget (``None`` unless ``continual_world``).
    """

    seeds: int
    returns: list[dict[str, float]]
    average_final: Interval
    forgetting: Interval
    forgetting_per_task: dict[str, float]
    forward_transfer: Interval
    memory_bytes: int
    cw_forgetting: Interval | None = None
    cw_forward_transfer: Interval | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields, Continual World's only where the sequence measures them (pages written before them read the
        same)."""
        data = dataclasses.asdict(self)
        return {key: value for key, value in data.items() if value is not None or not key.startswith("cw_")}


ContinualReport = dict[str, ApproachStats]
"""``{approach name: its statistics}``."""


class ContinualStudy(Study[ContinualReport]):
    """Every run of a sequence, where it goes, and the page made of them.

    Runs from the base go to ``<log_dir>/<sequence>/<stage>/<method>/seed<k>/``, the sequential network's stages to
    ``<log_dir>/<sequence>/sequential/...``, the banks to ``<log_dir>/<sequence>/banks/<method>/seed<k>/``.
    """

    def __init__(
        self, sequence: ContinualSequence, log_dir: Path, device: str = "cpu", echo: Callable[[str], None] = print
    ) -> None:
        super().__init__(log_dir, echo)
        base = find_task(sequence.base_task)
        if base is None or base.agent_path is None:
            raise ConfigError(f"sequence {sequence.name}: base_task {sequence.base_task!r} is not a task with an agent")
        import_packages(base.env_packages)  # the stages' envs are built here too: checks, banks, evaluations
        self.sequence, self.base, self.device = sequence, base, device
        self.root = self.out_dir
        self.title = f"sequence {sequence.name}"
        self.signatures: dict[str, dict[str, Any]] = {}
        self.suite = None if sequence.suite is None else load_suite(sequence.suite)
        self._from_base: dict[tuple[str, str, int], RunSpec] = {}
        self.shared: set[tuple[str, str, int]] = set()
        """The keys of the runs from the base that are the suite's."""

    @property
    def out_dir(self) -> Path:
        return self.log_dir / self.sequence.name

    # the plan
    def stage_task(self, stage: Stage, method: str) -> TaskConfig:
        """The base task as ``method`` fine-tunes it on ``stage``: the stage's env, budget and evaluation, the
        sequence's settings over its :attr:`suite`'s (a sequence sharing a suite's runs takes its tuned settings)."""
        sequence, base, suite = self.sequence, self.base, self.suite
        eval_freq = min(sequence.eval_freq or base.eval.freq, stage.total_timesteps)
        overrides = {
            **(suite.settings if suite else {}),
            **sequence.settings,
            **(suite.method_settings.get(method, {}) if suite else {}),
            **sequence.method_settings.get(method, {}),
            **({"eval_episodes": sequence.eval_episodes} if sequence.eval_episodes is not None else {}),
            "name": stage.name,
            "target_env": stage.env,
            "source_env": None,
            "env_kwargs": {**base.env_kwargs, **stage.env_kwargs},
            "total_timesteps": stage.total_timesteps,
            "checkpoint_freq": min(base.checkpoint_freq, stage.total_timesteps),
            "eval_freq": eval_freq,
        }
        return base.with_overrides(overrides, method=method, where=f"sequence {sequence.name}, stage {stage.name}")

    def from_base(self, stage: Stage, method: str, seed: int) -> RunSpec:
        """A stage fine-tuned from the base agent (a bank's adapter, or a full copy): the sequence's :attr:`suite`'s
        run where it is the same run (:meth:`suite_run`), else the sequence's own."""
        key = (stage.name, method, seed)
        if key not in self._from_base:
            own = RunSpec(self.stage_task(stage, method), method, seed, self.root, self.base.agent_path, self.device)
            suite_run = self.suite_run(own)
            if suite_run is not None:
                self.shared.add(key)
            self._from_base[key] = suite_run or own
        return self._from_base[key]

    def suite_run(self, own: RunSpec) -> RunSpec | None:
        """The :attr:`suite`'s run that is ``own`` (:meth:`~eva_rl.experiments.suites.Suite.same_run`), or ``None``."""
        return None if self.suite is None else self.suite.same_run(own, self.log_dir)

    def sharing_note(self) -> str:
        """One line saying how many runs from the base are the :attr:`suite`'s ("" without a suite)."""
        if self.suite is None:
            return ""
        planned = self.plan()
        shared = sum(key in self.shared for key, _ in planned)
        return (
            f"{shared} of the {len(planned)} runs from the base are suite `{self.suite.name}`'s, the same runs made "
            f"once for both pages (folder `{self.suite.name}/` of the log dir)."
        )

    def sequential(self, index: int, seed: int) -> RunSpec:
        """Stage ``index`` of the one network fine-tuned stage after stage (stage 0 is the full copy's run)."""
        stage = self.sequence.stages[index]
        if index == 0:
            return self.from_base(stage, FULL, seed)
        previous = self.sequential(index - 1, seed).folder.model_file
        return RunSpec(self.stage_task(stage, FULL), FULL, seed, self.root / "sequential", previous, self.device)

    def plan(self) -> Planned:
        """The runs from the base (and, for Continual World's metrics, from scratch): ``((stage, method, seed),
        spec)``."""
        methods = [*self.sequence.methods, FULL, *([SCRATCH] if self.sequence.continual_world else [])]
        return [
            ((stage.name, method, seed), self.from_base(stage, method, seed))
            for seed in self.sequence.seed_list
            for stage in self.sequence.stages
            for method in methods
        ]

    def bank_dir(self, method: str, seed: int) -> Path:
        return self.root / "banks" / method / f"seed{seed}"

    def check_stages(self) -> None:
        """Stop before the first run when a stage cannot run (an unknown env id, spaces other than the base agent's,
        a budget below one rollout), not after the stages before it have run."""
        for stage in self.sequence.stages:
            check_agent_fits(self.stage_task(stage, FULL), self.base.agent_path, self.sequence.methods)

    # the runs
    def carry_out(self, executor: Executor, overwrite: bool = False) -> None:
        """The runs from the base and the sequential network's stages (each starts from the model of the one before
        as soon as it is done), then every sequential stage evaluated on every task."""
        self.check_stages()
        if self.suite is not None:
            self.echo(self.sharing_note())
        runs = [spec for _, spec in self.plan()]
        if self.sequence.sequential:
            # each chain of stages starts as soon as its first stage (a full copy's run) is done, beside the others
            count = len(self.sequence.stages)
            stages = [self.sequential(i, seed) for seed in self.sequence.seed_list for i in range(1, count)]
            runs += [spec for spec in stages if not self._kept_without_start(spec)]
        executor.run(runs, overwrite=overwrite)
        if not self.sequence.sequential:
            return
        jobs = [
            (self.sequence, self.log_dir, self.device, index, seed)
            for seed in self.sequence.seed_list
            for index in range(len(self.sequence.stages))
            if not (self.sequential(index, seed).folder / self._scores_file).is_file()
        ]
        if jobs:
            tasks, episodes = len(self.sequence.stages), self.stage_task(self.sequence.stages[0], FULL).eval.episodes
            self.echo(
                f"Evaluating each of {len(jobs)} sequential stage run(s) on all {tasks} tasks ({episodes} episodes "
                f"each): {len(jobs) * tasks} evaluations"
            )
        executor.map(_sequential_row, jobs, self.base.env_packages)

    def _kept_without_start(self, spec: RunSpec) -> bool:
        """Whether ``spec`` is a sequential stage kept as a result whose starting model (the previous stage's, not
        kept in a clone of results) is gone: it counts as complete if every other setting matches the one recorded.

        :raises RunDirError: for such a run recorded with other settings (it cannot be rerun without that model).
        """
        if spec.agent_path.is_file() or not spec.folder.is_complete:
            return False
        recorded = dict(spec.folder.read_result().settings or {})
        current = run_settings(dataclasses.replace(spec, agent_path=self.base.agent_path))
        recorded.pop("agent_sha256", None)
        current.pop("agent_sha256", None)
        differences = run_differences(spec.folder, recorded, current)
        if differences:
            raise RunDirError(
                f"{spec.run_dir} holds a completed run made with other settings ({'; '.join(differences)}) and its "
                f"starting model {spec.agent_path} is gone: rerun the sequence from its first stage in another "
                "--log-dir"
            )
        return True

    # evaluation on every task
    def evaluate_model(self, model: Any, agent_path: Path, stage: Stage) -> float:
        """The score (return or success rate) of ``model``, acting with the observation pipeline of the agent at
        ``agent_path``, on ``stage``, with the base task's evaluation settings: the protocol of every run's own
        evaluations."""
        task = self.stage_task(stage, FULL)
        agent = load_pretrained(agent_path, device="cpu")
        env = agent_env(task, agent, task.eval.env_count, task.eval.seed, evaluation=True)
        with closing(env):
            evaluation = evaluate(model, env, task.eval.episodes, task.eval.seed, task.eval.deterministic)
        if self.sequence.score == "return":
            return evaluation.mean
        if evaluation.success_rate is None:
            raise ConfigError(f"sequence {self.sequence.name}: score 'success', but {stage.env} reports no success")
        return evaluation.success_rate

    @property
    def _scores_file(self) -> str:
        """Where a sequential run's row of scores on every task is cached: returns and success rates apart."""
        return RunFolder.RETURNS_ON_EVERY_TASK if self.sequence.score == "return" else RunFolder.SUCCESS_ON_EVERY_TASK

    @property
    def _bank_scores_file(self) -> str:
        """Where a bank's score on every task is cached, beside ``bank.json``: returns and success rates apart."""
        return "returns.json" if self.sequence.score == "return" else "success.json"

    def sequential_row(self, index: int, seed: int) -> dict[str, float]:
        """The network after stage ``index`` on every task (cached in its run folder)."""
        folder = self.sequential(index, seed).folder

        def row() -> dict[str, float]:
            model = load_agent(folder.model_file, device="cpu")
            # its own task: the run's last evaluation, same protocol
            own = folder.read_result().scored(self.sequence.score).final_return
            return {
                s.name: own if i == index else self.evaluate_model(model, folder.model_file, s)
                for i, s in enumerate(self.sequence.stages)
            }

        return folder.cached(self._scores_file, row)

    def build_bank(self, method: str, seed: int) -> tuple[AdapterBank, dict[str, float]]:
        """The bank of ``method``'s stage adapters for ``seed`` (saved to its folder) and each task's return through
        it.

        Where the stage runs' ``adapter/`` folders are gone (a clone of results that keeps only each run's
        ``result.json``), the bank saved beside them stands in: the page regenerates without training anything.
        """
        folder = self.bank_dir(method, seed)
        stages = self.sequence.stages
        runs = [self.from_base(stage, method, seed) for stage in stages]
        # A clone of the results keeps the saved bank, not the runs' adapters: the bank stands in for them.
        if not all(spec.folder.has_adapter for spec in runs) and (folder / "bank.json").is_file():
            bank = AdapterBank.load(folder, device="cpu")
        else:
            bank = AdapterBank(load_agent(self.base.agent_path, device="cpu"), self.base.agent_path)
            for stage, spec in zip(stages, runs):
                info = {
                    "task": self.base.name,
                    "env": stage.env,
                    "env_kwargs": stage.env_kwargs,
                    "eval_episodes": spec.task.eval.episodes,
                    "run": str(spec.run_dir),
                }
                bank.add(stage.name, spec.folder.adapter_dir, info=info)
                bank.tasks[stage.name].signature = self.stage_signature(stage)
            bank.save(folder)

        def returns() -> dict[str, float]:
            values = {}
            for stage in stages:
                bank.activate(stage.name)
                values[stage.name] = self.evaluate_model(bank.model, self.base.agent_path, stage)
            return values

        return bank, cached_json(folder / self._bank_scores_file, returns)

    # adapter selection
    def _base_activations(self, stage: Stage, steps: int, seed: int) -> dict[str, Any]:
        """The base policy's layer inputs over ``steps`` steps in ``stage``'s env (envs and actions seeded by
        ``seed``)."""
        task = self.stage_task(stage, FULL)
        agent = load_pretrained(self.base.agent_path, device="cpu")
        with closing(agent_env(task, agent, task.n_envs, seed)) as env:
            return layer_activations(agent.model.policy, env, steps, seed)

    def stage_signature(self, stage: Stage) -> dict[str, Any]:
        """The stage's signature: the base policy's input subspaces in its env (the same for every method and
        seed)."""
        if stage.name not in self.signatures:
            activations = self._base_activations(stage, self.sequence.signature_steps, SIGNATURE_SEED)
            self.signatures[stage.name] = subspace_signature(activations, self.base.lora.r)
        return self.signatures[stage.name]

    def selection_accuracy(self) -> dict[str, Any]:
        """How often :func:`~eva_rl.selection.select_task` names the right stage from ``selection_steps`` unlabelled
        steps of the base policy in a stage's env (``selection_trials`` rollouts per stage, seeds apart from the
        signatures')."""
        sequence = self.sequence
        signatures = {stage.name: self.stage_signature(stage) for stage in sequence.stages}
        longest = max(sequence.selection_steps)
        picks: dict[int, list[dict[str, str]]] = {n: [] for n in sequence.selection_steps}
        for stage in sequence.stages:
            for trial in range(sequence.selection_trials):
                activations = self._base_activations(stage, longest, SIGNATURE_SEED + 1 + trial)
                for n in sequence.selection_steps:
                    # the first n env steps' rows: every layer sees the same number of rows per env step
                    prefix = {k: v[: v.shape[0] * n // longest] for k, v in activations.items()}
                    picks[n].append({"stage": stage.name, "picked": select_task(prefix, signatures)[0]})
        return {
            "accuracy": {str(n): sum(p["stage"] == p["picked"] for p in rows) / len(rows) for n, rows in picks.items()},
            "trials": sequence.selection_trials,
            "picks": {str(n): rows for n, rows in picks.items()},
        }

    # the report
    def report(self, runs: list[tuple[tuple[str, str, int], RunResult]]) -> ContinualReport:
        """Every approach's statistics (the runs from the base must be complete)."""
        results = {key: result.scored(self.sequence.score) for key, result in runs}
        stages = self.sequence.stages
        missing = [key for key, _ in self.plan() if key not in results]
        if missing:
            raise ConfigError(f"{len(missing)} run(s) of {self.title} are not complete; the first: {missing[0]}")
        horizon = {s.name: max(r.budget for (n, _, _), r in results.items() if n == s.name) for s in stages}
        auc = {key: normalized_auc(*r.sample_curve(), horizon=horizon[key[0]]) for key, r in results.items()}
        base_bytes = AdapterBank(load_agent(self.base.agent_path, device="cpu")).base_nbytes()
        # Continual World's reference: each task's AUC from scratch, the mean over seeds
        scratch_auc = {
            s.name: float(np.mean([auc[(s.name, SCRATCH, seed)] for seed in self.sequence.seed_list]))
            for s in stages
            if self.sequence.continual_world
        }
        report, resamples = {}, self.sequence.resamples
        for approach in approaches(self.sequence):
            matrices, memory, averages, forgetting, transfer = [], [], [], [], []
            cw_forgetting, cw_transfer = [], []
            per_task: dict[str, list[float]] = {s.name: [] for s in stages}
            for seed in self.sequence.seed_list:
                matrix, held = self._approach_seed(approach, seed, results, base_bytes)
                matrices.append(matrix)
                memory.append(held)
                averages.append(float(np.mean([matrix[-1][s.name] for s in stages])))
                # best over the rows after the task's own stage (row i + 1), minus the last row
                drops = [max(row[s.name] for row in matrix[i + 1 :]) - matrix[-1][s.name] for i, s in enumerate(stages)]
                for s, drop in zip(stages, drops):
                    per_task[s.name].append(drop)
                forgetting.append(float(np.mean(drops)))
                own = self._stage_aucs(approach, seed, auc, horizon)
                transfer.append(float(np.mean([o - auc[(s.name, FULL, seed)] for o, s in zip(own, stages)])))
                if self.sequence.continual_world:
                    cw_forgetting.append(
                        float(np.mean([matrix[i + 1][s.name] - matrix[-1][s.name] for i, s in enumerate(stages)]))
                    )
                    cw_transfer.append(continual_world_transfer(own, [scratch_auc[s.name] for s in stages]))
            report[approach.name] = ApproachStats(
                seeds=len(matrices),
                returns=[
                    {name: float(np.mean([m[k][name] for m in matrices])) for name in matrices[0][k]}
                    for k in range(len(matrices[0]))
                ],
                average_final=stratified_iqm([averages], n_resamples=resamples),
                forgetting=stratified_iqm([forgetting], n_resamples=resamples),
                forgetting_per_task={name: float(np.mean(values)) for name, values in per_task.items()},
                forward_transfer=stratified_iqm([transfer], n_resamples=resamples),
                memory_bytes=int(np.mean(memory)),
                cw_forgetting=stratified_iqm([cw_forgetting], n_resamples=resamples) if cw_forgetting else None,
                cw_forward_transfer=stratified_iqm([cw_transfer], n_resamples=resamples) if cw_transfer else None,
            )
        return report

    def _approach_seed(
        self, approach: Approach, seed: int, results: dict[tuple[str, str, int], RunResult], base_bytes: int
    ) -> tuple[list[dict[str, float]], int]:
        """``[after stage k][task]`` for k = 0 (the base) ... K, and the bytes the approach holds after the
        sequence."""
        stages = self.sequence.stages
        base_row = {s.name: results[(s.name, FULL, seed)].jumpstart for s in stages}
        if approach.kind is ApproachKind.SEQUENTIAL:
            rows = [self.sequential_row(index, seed) for index in range(len(stages))]
            return [base_row, *rows], base_bytes
        if approach.kind is ApproachKind.COPIES:
            final = {s.name: results[(s.name, approach.method, seed)].final_return for s in stages}
            memory = base_bytes * len(stages)
        else:
            bank, final = self.build_bank(approach.method, seed)
            memory = base_bytes + sum(task.nbytes for task in bank.tasks.values())
        # an approach from the base holds each task's final return from its stage on, the base's before it
        rows = [
            {s.name: final[s.name] if i <= k else base_row[s.name] for i, s in enumerate(stages)}
            for k in range(len(stages))
        ]
        return [base_row, *rows], memory

    def _stage_aucs(
        self, approach: Approach, seed: int, auc: dict[tuple[str, str, int], float], horizon: dict[str, float]
    ) -> list[float]:
        """The normalized AUC of each stage's run as ``approach`` made it, of the sequence's score."""
        stages = self.sequence.stages
        if approach.kind is not ApproachKind.SEQUENTIAL:
            return [auc[(s.name, approach.method, seed)] for s in stages]
        results = [
            self.sequential(i, seed).folder.read_result().scored(self.sequence.score) for i in range(len(stages))
        ]
        return [normalized_auc(*r.sample_curve(), horizon=horizon[s.name]) for r, s in zip(results, stages)]

    # the page
    def write_page(self, report: ContinualReport, runs: list[tuple[Any, RunResult]]) -> list[Path]:
        root = self.root
        selection = cached_json(root / "selection.json", self.selection_accuracy)
        atomic_write_json(
            root / "continual.json",
            {
                "approaches": {name: stats.to_dict() for name, stats in report.items()},
                "selection": selection["accuracy"],
                **({"published": dataclasses.asdict(self.sequence.published)} if self.sequence.published else {}),
            },
        )
        platform = platform_line(result.platform for _, result in runs)
        page = continual_markdown(self.sequence, report, selection, platform, self.sharing_note())
        atomic_write_text(root / "continual.md", page)
        figure, axes = new_figure(1, len(report), figsize=(3.6 * len(report), 3.4), dpi=120, sharey=True)
        draw_continual(np.atleast_1d(axes), self.sequence, report)
        return [root / "continual.json", root / "continual.md", save_figure(figure, root / "continual.png")]


def continual_world_transfer(aucs: list[float], scratch_aucs: list[float]) -> float:
    """Continual World's forward transfer of one run of the sequence: the mean over tasks of
    ``(AUC - AUC_scratch) / (1 - AUC_scratch)`` (``normalized_ft``), with AUCs of success curves in [0, 1]; a task that
    scratch already solves throughout (``AUC_scratch = 1``) leaves nothing to transfer and counts 0."""
    terms = [(a - b) / (1.0 - b) if b < 1.0 else 0.0 for a, b in zip(aucs, scratch_aucs)]
    return float(np.mean(terms))


def _sequential_row(sequence: ContinualSequence, log_dir: Path, device: str, index: int, seed: int) -> None:
    """:meth:`ContinualStudy.sequential_row` in a worker process (the study is made there: its ``echo`` may not
    pickle)."""
    ContinualStudy(sequence, log_dir, device).sequential_row(index, seed)


def continual_markdown(
    sequence: ContinualSequence,
    report: ContinualReport,
    selection: dict[str, Any] | None = None,
    platform: str = "",
    sharing: str = "",
) -> str:
    """``continual.md``: each approach's average return, forgetting, forward transfer and memory; forgetting per
    task; the adapter selection's accuracy; the runs' platform line and, for a sequence sharing a suite's runs,
    how many (``sharing``)."""

    def cell(interval: Interval) -> str:
        return f"{interval.estimate:.3f} [{interval.low:.3f}, {interval.high:.3f}]"

    copies = Approach(ApproachKind.COPIES, FULL).name
    full_bytes = report[copies].memory_bytes / len(sequence.stages)
    score = sequence.score
    columns = ["approach", f"average {score} after the sequence", "forgetting", "forward transfer (AUC vs full)"]
    columns += ["memory", "vs one network"]
    columns += ["CW forgetting", "CW forward transfer (vs scratch)"] if sequence.continual_world else []
    rows = []
    for approach, stats in report.items():
        cells = [approach, cell(stats.average_final), cell(stats.forgetting), cell(stats.forward_transfer)]
        cells += [f"{stats.memory_bytes / 1024:,.0f} KiB", f"{stats.memory_bytes / full_bytes:.2f}x"]
        if stats.cw_forgetting is not None and stats.cw_forward_transfer is not None:
            cells += [cell(stats.cw_forgetting), cell(stats.cw_forward_transfer)]
        rows.append(cells)
    lines = [
        f"# Continual sequence `{sequence.name}`",
        "",
        f"Stages: {' -> '.join(f'{s.name} ({s.total_timesteps:,})' for s in sequence.stages)}; base: the agent of "
        f"`{sequence.base_task}`. IQM over {seed_count(len(sequence.seed_list))} with 95% stratified-bootstrap CIs "
        f"({sequence.resamples:,} resamples).",
        "",
        *([platform, ""] if platform else []),
        *([sharing, ""] if sharing else []),
        *table(columns, rows),
    ]
    if sequence.continual_world:
        lines += [
            "",
            "Continual World's metrics (Wołczyk et al. 2021) beside the page's own: CW forgetting is the success at "
            "the end of a task's own stage minus after the last stage (the page's: best after its stage minus "
            "final); CW forward transfer is (AUC - AUC_scratch) / (1 - AUC_scratch) against training from scratch "
            "on the task with the same budget (the page's: AUC minus full fine-tuning's from the base). Continual "
            "World averages the last 5 evaluations where this page takes the last one, and its CIs are 90%.",
        ]
    lines += _published_markdown(sequence.published)
    # Forgetting per task, then how well the base policy's subspaces name a stage.
    lines += ["", f"Forgetting per task (mean over seeds, best minus final {score}):", ""]
    names = [s.name for s in sequence.stages]
    rows = [[approach, *(f"{stats.forgetting_per_task[n]:.3f}" for n in names)] for approach, stats in report.items()]
    lines += table(["approach", *names], rows)
    if selection:
        accuracy = selection["accuracy"]
        lines += [
            "",
            f"Picking the adapter for an unlabelled env (the base policy's layer-input subspaces, "
            f"{sequence.signature_steps} steps per signature; {selection['trials']} rollouts per stage): share of "
            "rollouts whose stage was named right.",
            "",
            *table(
                ["unlabelled env steps", *accuracy], [["accuracy", *(f"{value:.2f}" for value in accuracy.values())]]
            ),
        ]
    return "\n".join(lines) + "\n"


def _published_markdown(published: PublishedApproaches | None) -> list[str]:
    """The published approaches' figures under the page's table (none: no section)."""
    if published is None:
        return []
    columns = [metric for metric in SEQUENCE_METRICS if any(metric in f for f in published.approaches.values())]
    rows = [
        [name, *(f"{figures[metric]:.2f}" if metric in figures else "-" for metric in columns)]
        for name, figures in published.approaches.items()
    ]
    headings = ["approach", *(metric.replace("_", " ") for metric in columns)]
    return ["", "Published anchors:", "", *table(headings, rows), "", *published_notes(published)]


def draw_continual(axes: Any, sequence: ContinualSequence, report: ContinualReport) -> None:
    """A panel per approach: every task's mean return after each stage (0: the base agent)."""
    names = [s.name for s in sequence.stages]
    for axis, (approach, stats) in zip(axes, report.items()):
        for name in names:
            axis.plot(range(len(stats.returns)), [row[name] for row in stats.returns], marker="o", ms=3, label=name)
        axis.set_title(approach, fontsize=9)
        axis.set_xticks(range(len(stats.returns)), ["base", *[str(i) for i in range(1, len(names) + 1)]])
        axis.set_xlabel("after stage")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel(f"eval {sequence.score} (mean of {seed_count(len(sequence.seed_list))})")
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))  # beside the panels: it hides no line
