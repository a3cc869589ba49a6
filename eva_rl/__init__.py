"""eva-rl: fine-tune pretrained stable-baselines3 policies with EVA-initialized LoRA adapters.

The library is this package's top level; the experiment application (task files, runs, suites, reports, the
command line) lives in :mod:`eva_rl.experiments` and is built on it, never the other way round.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS",
    "METHODS",
    "AdapterPlan",
    "CachedAdapterWeights",
    "AgentError",
    "CheckpointError",
    "ConfigError",
    "EnvError",
    "EvaConfig",
    "EvaConvergenceError",
    "EvaPPO",
    "EvaRLError",
    "EvaReport",
    "EvaResult",
    "EvaSession",
    "IncrementalPCA",
    "LayerPlan",
    "LoraActorCriticCnnPolicy",
    "LoraActorCriticPolicy",
    "LoraConfig",
    "LoraConv2d",
    "LoraLayer",
    "LoraLinear",
    "LoraDQNPolicy",
    "LoraMultiInputActorCriticPolicy",
    "LoraSACPolicy",
    "LoraTD3Policy",
    "Method",
    "PretrainedAgent",
    "RolloutBatches",
    "SpaceMismatchError",
    "StopTrainingOnEvaDone",
    "adapt",
    "cached_adapter_weights",
    "allocate_ranks",
    "build_model",
    "compute_eva",
    "detect_algorithm",
    "disable_adapters",
    "find_target_layers",
    "get_device",
    "get_method",
    "inject_adapters",
    "load_adapter",
    "load_agent",
    "load_pretrained",
    "load_base_weights",
    "lora_layers",
    "merge",
    "merged_state_dict",
    "policy_forward",
    "register_method",
    "remove_adapters",
    "run_eva",
    "save_adapter",
]

_EXPORTS: dict[str, str] = {
    "ALGORITHMS": "eva_rl.loading",
    "AdapterPlan": "eva_rl.plan",
    "AgentError": "eva_rl.errors",
    "CachedAdapterWeights": "eva_rl.callbacks",
    "CheckpointError": "eva_rl.errors",
    "ConfigError": "eva_rl.errors",
    "EnvError": "eva_rl.errors",
    "EvaConfig": "eva_rl.config",
    "EvaConvergenceError": "eva_rl.errors",
    "EvaPPO": "eva_rl.eva_ppo",
    "EvaRLError": "eva_rl.errors",
    "EvaReport": "eva_rl.eva_report",
    "EvaResult": "eva_rl.eva",
    "EvaSession": "eva_rl.eva",
    "IncrementalPCA": "eva_rl.ipca",
    "LayerPlan": "eva_rl.plan",
    "LoraActorCriticCnnPolicy": "eva_rl.policies",
    "LoraActorCriticPolicy": "eva_rl.policies",
    "LoraConfig": "eva_rl.config",
    "LoraConv2d": "eva_rl.layers",
    "LoraDQNPolicy": "eva_rl.policies",
    "LoraLayer": "eva_rl.layers",
    "LoraLinear": "eva_rl.layers",
    "LoraMultiInputActorCriticPolicy": "eva_rl.policies",
    "LoraSACPolicy": "eva_rl.policies",
    "LoraTD3Policy": "eva_rl.policies",
    "METHODS": "eva_rl.methods",
    "Method": "eva_rl.methods",
    "PretrainedAgent": "eva_rl.loading",
    "RolloutBatches": "eva_rl.rollouts",
    "SpaceMismatchError": "eva_rl.errors",
    "StopTrainingOnEvaDone": "eva_rl.callbacks",
    "adapt": "eva_rl.adapt",
    "allocate_ranks": "eva_rl.allocation",
    "build_model": "eva_rl.models",
    "cached_adapter_weights": "eva_rl.layers",
    "compute_eva": "eva_rl.eva",
    "detect_algorithm": "eva_rl.loading",
    "disable_adapters": "eva_rl.inject",
    "find_target_layers": "eva_rl.inject",
    "get_device": "eva_rl.devices",
    "get_method": "eva_rl.methods",
    "inject_adapters": "eva_rl.inject",
    "load_adapter": "eva_rl.checkpoints",
    "load_agent": "eva_rl.loading",
    "load_base_weights": "eva_rl.models",
    "load_pretrained": "eva_rl.loading",
    "lora_layers": "eva_rl.inject",
    "merge": "eva_rl.adapt",
    "merged_state_dict": "eva_rl.inject",
    "policy_forward": "eva_rl.rollouts",
    "register_method": "eva_rl.methods",
    "remove_adapters": "eva_rl.inject",
    "run_eva": "eva_rl.eva",
    "save_adapter": "eva_rl.checkpoints",
}
"""Each public name and the module that defines it: imported on first use (PEP 562), so ``import eva_rl`` and the
command line's ``--help`` cost no torch or stable-baselines3 import."""


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        # a submodule (eva_rl.methods...), as the package's eager imports used to make every one an attribute
        if importlib.util.find_spec(f"{__name__}.{name}") is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        return importlib.import_module(f"{__name__}.{name}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """The package, with one rule: the import system binds every imported submodule as an attribute of its package,
    and ``eva_rl.adapt`` must stay the function, not the module ``eva_rl/adapt.py`` that defines it (the eager
    imports this package used to make rebound it; the data model's way to customize a module's attributes)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # what type checkers and IDEs see
    from eva_rl.adapt import adapt, merge
    from eva_rl.allocation import allocate_ranks
    from eva_rl.callbacks import CachedAdapterWeights, StopTrainingOnEvaDone
    from eva_rl.checkpoints import load_adapter, save_adapter
    from eva_rl.config import EvaConfig, LoraConfig
    from eva_rl.devices import get_device
    from eva_rl.errors import (
        AgentError,
        CheckpointError,
        ConfigError,
        EnvError,
        EvaConvergenceError,
        EvaRLError,
        SpaceMismatchError,
    )
    from eva_rl.eva import EvaResult, EvaSession, compute_eva, run_eva
    from eva_rl.eva_ppo import EvaPPO
    from eva_rl.eva_report import EvaReport
    from eva_rl.inject import (
        disable_adapters,
        find_target_layers,
        inject_adapters,
        lora_layers,
        merged_state_dict,
        remove_adapters,
    )
    from eva_rl.ipca import IncrementalPCA
    from eva_rl.layers import LoraConv2d, LoraLayer, LoraLinear, cached_adapter_weights
    from eva_rl.loading import ALGORITHMS, PretrainedAgent, detect_algorithm, load_agent, load_pretrained
    from eva_rl.methods import METHODS, Method, get_method, register_method
    from eva_rl.models import build_model, load_base_weights
    from eva_rl.plan import AdapterPlan, LayerPlan
    from eva_rl.policies import (
        LoraActorCriticCnnPolicy,
        LoraActorCriticPolicy,
        LoraDQNPolicy,
        LoraMultiInputActorCriticPolicy,
        LoraSACPolicy,
        LoraTD3Policy,
    )
    from eva_rl.rollouts import RolloutBatches, policy_forward
