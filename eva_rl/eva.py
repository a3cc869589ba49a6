"""EVA: data-driven LoRA initialization from the principal directions of each layer's inputs.

Model-agnostic: :func:`compute_eva` works on any ``nn.Module`` and any iterable of inputs. For SB3 policies the
inputs come from rollouts (:mod:`eva_rl.rollouts`). The numerics follow peft's ``get_eva_state_dict``; see
the README's "EVA numerics" section for where and why we differ.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from eva_rl.allocation import allocate_ranks
from eva_rl.config import EvaConfig, LoraConfig
from eva_rl.errors import ConfigError, EvaConvergenceError
from eva_rl.eva_report import EvaReport
from eva_rl.inject import disable_adapters
from eva_rl.ipca import IncrementalPCA
from eva_rl.layers import LoraLayer
from eva_rl.plan import AdapterPlan

ForwardFn = Callable[[nn.Module, Any], Any]

__all__ = ["EvaConvergenceError", "EvaResult", "EvaSession", "compute_eva", "layer_input_rows", "run_eva"]


@dataclass
class EvaResult:
    """What EVA computed, per target layer.

    :ivar A: ``{layer: (rank, fan_in) tensor}``, the top principal directions of the layer input; rank may be 0.
    :ivar ranks: ``{layer: rank}`` after redistribution.
    :ivar explained_variance_ratio: ``{layer: ratios of the tracked components}`` (component variance over the
        layer input's total variance).
    :ivar batches_used: Batches consumed.
    :ivar converged: ``{layer: whether its first ``rank`` components converged}``.
    :ivar fan_in: ``{layer: input features}``; Conv2d layers count ``C*kh*kw`` patch features.
    :ivar max_components: ``{layer: components tracked}`` (``round(r*rho)``, clipped to the fan-in).
    :ivar shared_inputs: ``{layer: layer whose PCA it shares}`` for layers whose inputs are identical.
    :ivar singular_values: ``{layer: singular values of the tracked components}``.
    :ivar converged_at: ``{layer: batches it took until its ranked components converged (for good)}``.
    :ivar batches_fed: ``{layer: numbers (from 1) of the batches its PCA consumed}``; a layer is no longer fed once
        its ranked components converged (unless a rank change makes it need more).
    :ivar seconds: Wall time EVA itself took: its batches' forward passes and PCA updates, and with its own rollouts
        their collection; with PPO's rollouts (``data_source="ppo"``) neither PPO's collection nor anything between
        rollouts counts (their env steps are ``deferred_steps``).
    :ivar env_steps: Environment steps of EVA's own rollouts, taken before PPO starts (0 when EVA reads PPO's).
    :ivar data_source: ``"rollouts"`` (EVA's own) or ``"ppo"`` (PPO's first rollouts, :class:`~eva_rl.eva_ppo.EvaPPO`).
    :ivar skipped_steps: Env steps of PPO rollouts that fed EVA and were never trained on (see
        :class:`~eva_rl.eva_report.EvaReport`).
    :ivar deferred_steps: Env steps of PPO rollouts EVA read before it converged, trained on after it did.
    :ivar replayed_steps: Env steps of EVA's own rollouts stored in an off-policy algorithm's replay buffer.
    """

    A: dict[str, torch.Tensor]
    ranks: dict[str, int]
    explained_variance_ratio: dict[str, torch.Tensor]
    batches_used: int
    converged: dict[str, bool]
    fan_in: dict[str, int] = field(default_factory=dict)
    max_components: dict[str, int] = field(default_factory=dict)
    shared_inputs: dict[str, str] = field(default_factory=dict)
    singular_values: dict[str, torch.Tensor] = field(default_factory=dict)
    converged_at: dict[str, int] = field(default_factory=dict)
    batches_fed: dict[str, list[int]] = field(default_factory=dict)
    seconds: float = 0.0
    env_steps: int | None = None
    data_source: str = "rollouts"
    skipped_steps: int = 0
    deferred_steps: int = 0
    replayed_steps: int = 0

    def captured_variance(self, name: str) -> float:
        """Fraction of layer ``name``'s input variance captured by its ``rank`` EVA directions."""
        return float(self.explained_variance_ratio[name][: self.ranks[name]].sum())

    def report(self) -> EvaReport:
        """The JSON-ready report: ranks, ratios, captured variance, batches, env steps, seconds."""
        return EvaReport(
            ranks=dict(self.ranks),
            explained_variance_ratio={k: [float(x) for x in v] for k, v in self.explained_variance_ratio.items()},
            captured_variance={k: self.captured_variance(k) for k in self.ranks},
            fan_in=dict(self.fan_in),
            max_components=dict(self.max_components),
            shared_inputs=dict(self.shared_inputs),
            converged=dict(self.converged),
            converged_at=dict(self.converged_at),
            batches_fed={k: list(v) for k, v in self.batches_fed.items()},
            batches_used=self.batches_used,
            env_steps=self.env_steps,
            data_source=self.data_source,
            skipped_steps=self.skipped_steps,
            deferred_steps=self.deferred_steps,
            replayed_steps=self.replayed_steps,
            seconds=self.seconds,
        )

    def to_dict(self) -> dict[str, Any]:
        """``self.report().to_dict()``."""
        return self.report().to_dict()


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in totals):
            raise ValueError(f"EVA cannot unfold Conv2d with padding='same' and asymmetric padding ({conv})")
        return tuple(t // 2 for t in totals)
    return tuple(conv.padding)


def layer_input_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows a layer's weight sees: a Linear input flattened to ``(-1, in_features)``, a Conv2d input unfolded
    into patches ``(-1, C*kh*kw)`` in the layout of ``weight.reshape(out, -1)``."""
    base = layer.base_layer if isinstance(layer, LoraLayer) else layer
    if isinstance(base, nn.Conv2d):
        if x.ndim == 3:
            x = x.unsqueeze(0)
        patches = F.unfold(x, base.kernel_size, base.dilation, _conv_padding(base), base.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({k: _to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _default_forward(module: nn.Module, batch: Any) -> Any:
    return module(batch)


class _AllInputsCaptured(Exception):
    """Raised by a capture hook once every wanted layer input of the batch is in: the rest of the forward pass
    (the layers after the last one still fitted) would compute outputs nobody reads."""


class _ComponentTracker:
    """One incremental PCA plus its convergence test (:attr:`~eva_rl.config.EvaConfig.convergence`): per component
    (peft's), or of the span of the first ``rank`` components."""

    def __init__(
        self, n_components: int, svd_solver: str, seed: int, tau: float, convergence: str = "components"
    ) -> None:
        self.pca = IncrementalPCA(n_components, svd_solver=svd_solver, seed=seed)
        self.tau, self.convergence = tau, convergence
        self.converged = torch.zeros(n_components, dtype=torch.bool)
        self.cosine = torch.full((n_components,), float("nan"))
        self.previous: torch.Tensor | None = None

    def update(self, rows: torch.Tensor) -> None:
        previous = self.pca.components_
        self.pca.partial_fit(rows)
        if self.pca.zero_variance:
            self.converged[:] = True
        elif previous is not None:
            self.previous = previous
            self.cosine = F.cosine_similarity(self.pca.components_, previous, dim=1).cpu()
            self.converged = self.cosine >= self.tau

    def subspace_cosine(self, rank: int) -> float:
        """The smallest cosine of the principal angles between the spans of the first ``rank`` components of the
        last two estimates (their rows are orthonormal): the smallest singular value of ``previous @ current.T``."""
        if rank == 0 or self.pca.zero_variance:
            return 1.0
        if self.previous is None:
            return float("nan")
        overlap = self.previous[:rank].double() @ self.pca.components_[:rank].double().T
        return float(torch.linalg.svdvals(overlap).min())

    def done(self, rank: int) -> bool:
        if self.convergence == "subspace":
            return self.subspace_cosine(rank) >= self.tau  # nan (one estimate so far) is not done
        return bool(self.converged[:rank].all())

    def describe(self, rank: int) -> str:
        """Where the test stands, for a message: ``"3/8 components"`` or ``"subspace cosine 0.912"``."""
        if self.convergence == "subspace":
            return f"subspace cosine {self.subspace_cosine(rank):.3f}"
        return f"{int(self.converged[:rank].sum())}/{rank} components"


def _group_identical(rows: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{layer: leader}``: each layer maps to the first layer with a bit-identical input."""
    leader_of: dict[str, str] = {}
    for name, x in rows.items():
        leader = next(
            (
                lead
                for lead in dict.fromkeys(leader_of.values())
                if rows[lead].shape == x.shape and torch.equal(rows[lead], x)
            ),
            name,
        )
        leader_of[name] = leader
    return leader_of


class EvaSession:
    """EVA fed one batch at a time: :meth:`run` drives it from an iterable, and PPO can drive it from its own
    rollouts (:class:`eva_rl.eva_ppo.EvaPPO`).

    Hooks, eval mode, ``no_grad`` and disabled adapters hold only inside :meth:`feed`, so the module is left as
    it was between batches.

    :param module: Model whose target layers' inputs are analysed. Existing LoRA adapters are bypassed.
    :param plan: The target layers, their ranks (the rank budget is their sum) and the components EVA tracks at
        each, from :meth:`AdapterPlan.resolve <eva_rl.plan.AdapterPlan.resolve>` with this ``eva``.
    :param eva: ``rho``, ``tau``, batch cap, whitening, SVD solver and seed.
    :param forward_fn: ``forward_fn(module, batch)`` runs the model; defaults to ``module(batch)``.
    """

    def __init__(
        self,
        module: nn.Module,
        plan: AdapterPlan,
        eva: EvaConfig,
        forward_fn: ForwardFn | None = None,
    ) -> None:
        self.seconds = 0.0
        self._running = False
        self.module = module
        self.plan = plan
        self.eva = eva
        self.forward_fn = forward_fn or _default_forward
        unplanned = [name for name, layer in plan.adapted.items() if layer.eva_components < 1]
        if unplanned:
            raise ConfigError(
                f"the adapter plan has no EVA components for {unplanned}; resolve it with the EvaConfig "
                "(AdapterPlan.resolve(module, lora, eva))"
            )
        self.layers = {name: module.get_submodule(name) for name in plan.adapted}
        self.budget = plan.budget
        self.fan_in = {name: layer.fan_in for name, layer in plan.layers.items()}
        self.caps = {name: plan.layers[name].eva_cap for name in self.layers}
        self.device = next(module.parameters()).device
        self.trackers: dict[str, _ComponentTracker] = {}
        self.leader_of: dict[str, str] = {}
        self.ranks = dict(self.caps)
        self.converged_at: dict[str, int] = {}
        self.batches_fed: dict[str, list[int]] = {}
        self._calls: dict[str, int] = {}  # times each layer runs in one forward pass (the first batch's, in full)
        self.batches_used = 0

    def _group_done(self, leader: str) -> bool:
        # each layer's own rank: a span that settled at one rank may still turn at a smaller one
        tracker = self.trackers[leader]
        return all(tracker.done(self.ranks[n]) for n, lead in self.leader_of.items() if lead == leader)

    @property
    def done(self) -> bool:
        """Every layer's ranked components converged."""
        return bool(self.trackers) and all(self._group_done(lead) for lead in self.trackers)

    @property
    def capped(self) -> bool:
        """``max_batches`` reached."""
        return self.eva.max_batches is not None and self.batches_used >= self.eva.max_batches

    @property
    def inputs_converged(self) -> str:
        """``"k/n"``: distinct layer inputs whose components converged."""
        return f"{sum(self._group_done(lead) for lead in self.trackers)}/{len(self.trackers) or len(self.layers)}"

    def _capture(self, batch: Any, wanted: list[str]) -> dict[str, torch.Tensor]:
        captured: dict[str, list[torch.Tensor]] = {}
        # After the first batch, the forward stops once each wanted layer has run as often as it did then (peft runs
        # it whole): the layers after the last one still fitted, and every converged layer's output, are skipped.
        expected = {name: self._calls[name] for name in wanted} if self._calls else None

        def make_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
            def hook(layer: nn.Module, args: tuple[Any, ...]) -> None:
                captured.setdefault(name, []).append(layer_input_rows(layer, args[0]).detach())
                if expected is not None and all(len(captured.get(n, ())) >= count for n, count in expected.items()):
                    raise _AllInputsCaptured

            return hook

        handles = [self.layers[name].register_forward_pre_hook(make_hook(name)) for name in wanted]
        was_training = self.module.training
        try:
            self.module.eval()
            with torch.no_grad(), disable_adapters(self.module):
                self.forward_fn(self.module, _to_device(batch, self.device))
        except _AllInputsCaptured:
            pass
        finally:
            for handle in handles:
                handle.remove()
            self.module.train(was_training)
        if not self._calls:
            self._calls = {name: len(calls) for name, calls in captured.items()}
        rows = {}
        for name in wanted:
            if name not in captured:
                raise RuntimeError(f"EVA: layer {name!r} was not called by forward_fn; it cannot be analysed")
            x = torch.cat(captured.pop(name))
            if not torch.isfinite(x).all():
                raise ValueError(
                    f"EVA: non-finite activations (NaN/inf) at the input of layer {name!r} in batch "
                    f"{self.batches_used}; check the observations and the policy's preprocessing"
                )
            rows[name] = x
        return rows

    def feed(self, batch: Any) -> bool:
        """Update the layers not yet converged with one batch; return :attr:`done`.

        Its time adds to :attr:`seconds` (inside :meth:`run`, the whole loop's does).
        """
        if self._running:
            return self._feed(batch)
        started = time.perf_counter()
        try:
            return self._feed(batch)
        finally:
            self.seconds += time.perf_counter() - started

    def _feed(self, batch: Any) -> bool:
        wanted = [lead for lead in self.trackers if not self._group_done(lead)] if self.trackers else list(self.layers)
        self.batches_used += 1
        rows = self._capture(batch, wanted)
        if not self.trackers:
            self.leader_of = _group_identical(rows)
            for leader in dict.fromkeys(self.leader_of.values()):
                group = [n for n, lead in self.leader_of.items() if lead == leader]
                cap = max(self.caps[n] for n in group)
                for n in group:
                    self.caps[n] = cap
                tracked = max(self.plan.layers[n].eva_components for n in group)
                self.trackers[leader] = _ComponentTracker(
                    tracked, self.eva.svd_solver, self.eva.seed, self.eva.tau, self.eva.convergence
                )
        for leader, tracker in self.trackers.items():
            if leader not in rows:
                continue
            if rows[leader].shape[0] < tracker.pca.n_components:
                raise ValueError(
                    f"EVA: batch {self.batches_used} gives {rows[leader].shape[0]} rows at layer {leader!r}, fewer "
                    f"than the {tracker.pca.n_components} components tracked there (round(r*rho) plus "
                    f"extra_components); use a batch size of at least {tracker.pca.n_components}"
                )
            tracker.update(rows[leader])
            self.batches_fed.setdefault(leader, []).append(self.batches_used)
        ratios = {n: self.trackers[self.leader_of[n]].pca.explained_variance_ratio_ for n in self.layers}
        self.ranks = allocate_ranks(ratios, self.caps, self.budget)
        for name in self.layers:
            if self.trackers[self.leader_of[name]].done(self.ranks[name]):
                self.converged_at.setdefault(name, self.batches_used)
            else:
                self.converged_at.pop(name, None)
        return self.done

    def run(self, batches: Iterable[Any], progress: bool = False) -> EvaResult:
        """Feed batches from ``batches`` until every layer converged, the cap is hit or the batches run out.

        :param batches: Iterable of model inputs, consumed lazily, each batch once.
        :param progress: Show a progress bar.
        """
        stop_reason: str | None = None
        bar = tqdm(total=self.eva.max_batches, desc="EVA", unit="batch", disable=not progress, leave=False)
        started = time.perf_counter()
        self._running = True
        iterator = iter(batches)
        try:
            while not self.done:
                if self.capped:
                    stop_reason = f"max_batches={self.eva.max_batches} reached"
                    break
                try:
                    batch = next(iterator)
                except StopIteration:
                    stop_reason = f"the batches ran out after {self.batches_used}"
                    break
                self.feed(batch)
                bar.update(1)
                bar.set_postfix_str(f"{self.inputs_converged} inputs converged")
        finally:
            bar.close()
            if iterator is not batches and hasattr(iterator, "close"):
                iterator.close()  # our own generator over `batches`: let it restore env state (VecNormalize) now
            self._running = False
            self.seconds += time.perf_counter() - started  # the batches' collection (rollouts) included
        return self.result(stop_reason)

    def result(self, stop_reason: str | None = None, final: bool = False) -> EvaResult:
        """The directions and ranks so far.

        :param stop_reason: Why feeding stopped, for the message when some layer has not converged.
        :param final: No more data will come (the fine-tuning budget ended): a layer that has not converged warns
            and keeps its current estimate whatever ``on_max_batches`` says, since raising would leave the run
            untrained.
        :raises EvaConvergenceError: if a layer has not converged and ``on_max_batches="raise"`` (or no batch came).
        """
        trackers, leader_of, ranks, caps = self.trackers, self.leader_of, self.ranks, self.caps
        converged = {n: trackers[leader_of[n]].done(ranks[n]) for n in self.layers} if trackers else {}
        not_converged = [n for n in self.layers if not converged.get(n, False)]
        if not_converged:
            details = ", ".join(
                f"{n} ({trackers[leader_of[n]].describe(ranks[n])})" if trackers else n for n in not_converged
            )
            message = f"EVA stopped ({stop_reason}) before these layers converged at tau={self.eva.tau}: {details}"
            if (self.eva.on_max_batches == "raise" and not final) or not trackers:
                raise EvaConvergenceError(
                    message + ". Raise max_batches, lower tau, or set on_max_batches='warn' to use the current estimate"
                )
            warnings.warn(message + "; using the current estimate", stacklevel=3)
        if sum(ranks.values()) < self.budget:
            warnings.warn(
                f"EVA: only {sum(ranks.values())} components with non-zero variance for a rank budget of {self.budget}",
                stacklevel=3,
            )

        result = EvaResult(A={}, ranks={}, explained_variance_ratio={}, batches_used=self.batches_used, converged={})
        for name in self.plan.layers:
            fan_in = self.fan_in[name]
            result.fan_in[name] = fan_in
            if name not in self.layers:
                result.A[name] = torch.zeros(0, fan_in, device=self.device)
                result.ranks[name] = 0
                result.explained_variance_ratio[name] = torch.zeros(0)
                result.converged[name] = True
                continue
            pca = trackers[leader_of[name]].pca
            rank = ranks[name]
            directions = pca.components_[:rank]
            if self.eva.whiten:
                directions = directions / pca.singular_values_[:rank].sqrt().unsqueeze(1)
            result.A[name] = directions.to(device=self.device, dtype=torch.float32)
            result.ranks[name] = rank
            result.explained_variance_ratio[name] = pca.explained_variance_ratio_[: caps[name]].float().cpu()
            result.singular_values[name] = pca.singular_values_[: caps[name]].float().cpu()
            result.converged[name] = converged[name]
            result.max_components[name] = caps[name]
            if name in self.converged_at:
                result.converged_at[name] = self.converged_at[name]
            result.batches_fed[name] = list(self.batches_fed.get(leader_of[name], []))
            if leader_of[name] != name:
                result.shared_inputs[name] = leader_of[name]
        result.seconds = self.seconds
        return result


def run_eva(
    module: nn.Module,
    batches: Iterable[Any],
    lora: LoraConfig,
    eva: EvaConfig,
    forward_fn: ForwardFn | None = None,
    exclude: Iterable[str] = (),
    progress: bool = False,
) -> EvaResult:
    """EVA driven by config objects; :func:`compute_eva` is the keyword-argument front end.

    :param module: Model whose target layers' inputs are analysed. Existing LoRA adapters are bypassed.
    :param batches: Iterable of model inputs, consumed lazily, each batch once.
    :param lora: Targets, per-layer ranks (``r`` / ``rank_pattern``; the rank budget is their sum).
    :param eva: ``rho``, ``tau``, batch cap, whitening, SVD solver and seed.
    :param forward_fn: ``forward_fn(module, batch)`` runs the model; defaults to ``module(batch)``.
    :param exclude: Layer names never analysed.
    :param progress: Show a progress bar.
    """
    plan = AdapterPlan.resolve(module, lora, eva, exclude)
    return EvaSession(module, plan, eva, forward_fn).run(batches, progress)


def compute_eva(
    module: nn.Module,
    batches: Iterable[Any],
    target_modules: list[str] | str | None = None,
    r: int = 4,
    rho: float = 2.0,
    tau: float = 0.99,
    whiten: bool = False,
    max_batches: int | None = None,
    forward_fn: ForwardFn | None = None,
    seed: int = 0,
    *,
    rank_pattern: dict[str, int] | None = None,
    on_max_batches: str = "raise",
    svd_solver: str = "lowrank",
    convergence: str = "components",
    progress: bool = False,
) -> EvaResult:
    """Compute EVA's LoRA ``A`` matrices and rank allocation for the target layers of ``module``.

    Each target layer's inputs are hooked and streamed through an incremental PCA until the components that
    the current rank allocation needs stop moving (cosine between successive estimates >= ``tau``, at least
    two batches). Layers whose inputs are bit-identical share one PCA. Ranks are redistributed by pooling the
    explained-variance ratios of all layers and keeping the top ``sum(r)``, each layer capped at
    ``round(r * rho)``.

    :param module: Any ``nn.Module``.
    :param batches: Iterable of inputs for ``forward_fn``; each batch is used once, never cached.
    :param target_modules: Layers to analyse (see :class:`~eva_rl.config.LoraConfig`); ``None`` for all
        Linear/Conv2d layers.
    :param r: Rank per layer before redistribution; the budget is ``r`` times the number of layers.
    :param rho: Redistribution factor (>= 1); ``rho=1`` keeps uniform ranks.
    :param tau: Cosine threshold for convergence, in ``[0, 1]``.
    :param whiten: Divide each direction by ``sqrt`` of its singular value.
    :param max_batches: Stop after this many batches (``None``: run until converged or out of batches).
    :param forward_fn: ``forward_fn(module, batch)``; defaults to ``module(batch)``.
    :param seed: Seed of the randomized SVD.
    :param rank_pattern: Per-layer rank overrides (0 = not adapted, not analysed).
    :param on_max_batches: ``"raise"`` or ``"warn"`` when stopping before convergence.
    :param svd_solver: ``"lowrank"`` (peft's randomized SVD) or ``"full"``.
    :param convergence: ``"components"`` (peft's: each component) or ``"subspace"`` (their span), see
        :attr:`~eva_rl.config.EvaConfig.convergence`.
    :param progress: Show a progress bar.
    :return: An :class:`EvaResult`.
    :raises EvaConvergenceError: if the batches end or the cap is hit first (with ``on_max_batches="raise"``).
    :raises ValueError: on non-finite activations, a batch with fewer rows than components, or bad arguments.
    """
    lora = LoraConfig(r=r, target_modules=target_modules, rank_pattern=dict(rank_pattern or {}))
    eva = EvaConfig(
        rho=rho,
        tau=tau,
        whiten=whiten,
        max_batches=max_batches,
        on_max_batches=on_max_batches,
        svd_solver=svd_solver,
        seed=seed,
        convergence=convergence,
    )
    return run_eva(module, batches, lora, eva, forward_fn=forward_fn, progress=progress)
