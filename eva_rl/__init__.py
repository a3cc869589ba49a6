"""eva-rl: fine-tune pretrained stable-baselines3 policies with EVA-initialized LoRA adapters.

The library is this package's top level; the experiment application (task files, runs, suites, reports, the
command line) lives in :mod:`eva_rl.experiments` and is built on it, never the other way round.
"""

from eva_rl.adapt import adapt, merge
from eva_rl.allocation import allocate_ranks
from eva_rl.callbacks import CachedAdapterWeights
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
