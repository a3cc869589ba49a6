"""eva-rl: fine-tune pretrained stable-baselines3 policies with EVA-initialized LoRA adapters."""

from eva_rl.adapt import SpaceMismatchError, adapt, load_base_weights, merge
from eva_rl.allocation import allocate_ranks
from eva_rl.checkpoints import load_adapter, save_adapter
from eva_rl.config import EvaConfig, LoraConfig
from eva_rl.eva import EvaConvergenceError, EvaResult, EvaSession, compute_eva, run_eva
from eva_rl.eva_ppo import EvaPPO
from eva_rl.inject import (
    disable_adapters,
    find_target_layers,
    inject_adapters,
    lora_layers,
    merged_state_dict,
    remove_adapters,
)
from eva_rl.ipca import IncrementalPCA
from eva_rl.layers import LoraConv2d, LoraLayer, LoraLinear
from eva_rl.policies import LoraActorCriticCnnPolicy, LoraActorCriticPolicy, LoraMultiInputActorCriticPolicy
from eva_rl.rollouts import RolloutBatches, policy_forward
from eva_rl.utils import get_device

__version__ = "0.1.0"

__all__ = [
    "EvaConfig",
    "EvaConvergenceError",
    "EvaPPO",
    "EvaResult",
    "EvaSession",
    "IncrementalPCA",
    "LoraActorCriticCnnPolicy",
    "LoraActorCriticPolicy",
    "LoraConfig",
    "LoraConv2d",
    "LoraLayer",
    "LoraLinear",
    "LoraMultiInputActorCriticPolicy",
    "RolloutBatches",
    "SpaceMismatchError",
    "adapt",
    "allocate_ranks",
    "compute_eva",
    "disable_adapters",
    "find_target_layers",
    "get_device",
    "inject_adapters",
    "load_base_weights",
    "load_adapter",
    "lora_layers",
    "merge",
    "merged_state_dict",
    "policy_forward",
    "remove_adapters",
    "run_eva",
    "save_adapter",
]
