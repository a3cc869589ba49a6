"""EVA's report: what EVA decided and what it cost, as a typed record that reads and writes ``eva.json``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from eva_rl.errors import ConfigError


@dataclass
class EvaReport:
    """The JSON-ready summary of an :class:`~eva_rl.eva.EvaResult` (without the direction tensors).

    It is stored with the adapted policy (``policy.eva_report``, saved in the zip), in adapter checkpoints and as a
    run's ``eva.json``; :meth:`to_dict` writes, and :meth:`from_dict` reads, exactly those files' fields.

    :ivar ranks: ``{layer: rank}`` after redistribution.
    :ivar explained_variance_ratio: ``{layer: ratios of the tracked components}``.
    :ivar captured_variance: ``{layer: variance fraction its ranked components capture}``.
    :ivar fan_in: ``{layer: input features}`` (Conv2d layers count ``C*kh*kw`` patch features).
    :ivar max_components: ``{layer: the most rank EVA could give it}`` (``round(r*rho)``, clipped to the fan-in).
    :ivar shared_inputs: ``{layer: layer whose PCA it shares}`` for layers with identical inputs.
    :ivar converged: ``{layer: whether its ranked components converged}``.
    :ivar converged_at: ``{layer: batches until they converged for good}``.
    :ivar batches_fed: ``{layer: numbers (from 1) of the batches its PCA consumed}``.
    :ivar batches_used: Batches consumed.
    :ivar env_steps: Environment steps of EVA's own rollouts (0 when EVA read PPO's rollouts).
    :ivar data_source: ``"rollouts"`` or ``"ppo"``.
    :ivar skipped_steps: Env steps of PPO rollouts that fed EVA and were never trained on (0 since PPO trains on
        every rollout EVA read; older runs with ``data_source="ppo"`` skipped those before the converging one).
    :ivar deferred_steps: Env steps of PPO rollouts that fed EVA before the one it converged on; PPO trained on them
        once EVA was done (``data_source="ppo"``).
    :ivar replayed_steps: Env steps of EVA's own rollouts stored in an off-policy algorithm's replay buffer, which
        its updates sample from as from its warm-up (SAC, TD3, DQN; 0 before 2026-12-05: they were discarded).
    :ivar seconds: Wall time EVA itself took (its own rollouts' collection included; PPO's rollouts not).
    """

    ranks: dict[str, int]
    explained_variance_ratio: dict[str, list[float]] = field(default_factory=dict)
    captured_variance: dict[str, float] = field(default_factory=dict)
    fan_in: dict[str, int] = field(default_factory=dict)
    max_components: dict[str, int] = field(default_factory=dict)
    shared_inputs: dict[str, str] = field(default_factory=dict)
    converged: dict[str, bool] = field(default_factory=dict)
    converged_at: dict[str, int] = field(default_factory=dict)
    batches_fed: dict[str, list[int]] = field(default_factory=dict)
    batches_used: int = 0
    env_steps: int | None = None
    data_source: str = "rollouts"
    skipped_steps: int = 0
    deferred_steps: int = 0
    replayed_steps: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | EvaReport) -> EvaReport:
        """Read a report written by :meth:`to_dict` (older files may lack the later fields; they get defaults).

        :raises ConfigError: for something that is not an EVA report.
        """
        if isinstance(data, EvaReport):
            return data
        if not isinstance(data, Mapping) or "ranks" not in data:
            raise ConfigError(f"not an EVA report (a mapping with 'ranks' expected): {data!r:.200}")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})
