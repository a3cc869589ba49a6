"""Adapter-only checkpoints: the weights a fine-tuning run changed, in safetensors, plus a JSON config.

A full SB3 zip holds every weight and pickles (loading one can run code). An adapter file holds only what
fine-tuning trained (the LoRA factors, DoRA magnitudes, and any trainable head, bias or ``log_std``), plus the
base weights that PiSSA/OLoRA rewrote as residuals; it loads with ``safetensors`` and ``json``, no pickle. The
pretrained agent it was trained from supplies everything else.

Format (a folder):

- ``adapter.safetensors``: ``{policy state-dict key: tensor}``;
- ``adapter_config.json``: ``{"format": "eva-rl-adapter", "version": 1, "method", "lora_config", "lora_plan",
  "eva_report", "policy_class", "keys"}`` (``lora_plan`` since the adapter plan; older folders resolve one from
  ``lora_config``);
- ``vecnormalize.pkl`` (agents trained with VecNormalize): the statistics the adapted policy's inputs were
  normalized with; :func:`load_adapter` wraps the env in them (a pickle, like an SB3 zip).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from stable_baselines3 import PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.type_aliases import GymEnv
from stable_baselines3.common.vec_env import VecEnv, VecNormalize, unwrap_vec_normalize

from eva_rl.config import LoraConfig
from eva_rl.errors import CheckpointError, ConfigError
from eva_rl.eva_report import EvaReport
from eva_rl.files import STATS, atomic_save_stats, atomic_write_json
from eva_rl.methods import get_method
from eva_rl.models import build_model, load_base_weights
from eva_rl.plan import AdapterPlan
from eva_rl.policies import LoraPolicyMixin, lora_policy_class, lora_policy_kwargs

FORMAT = "eva-rl-adapter"
VERSION = 1


def _method_of(model: PPO, method: str | None) -> str | None:
    return method if method is not None else model.policy.lora_plan.method


def adapter_state(model: PPO, method: str | None = None) -> dict[str, Any]:
    """The tensors an adapter checkpoint keeps: trainable parameters, and the base weights a method rewrote.

    :param method: The method the model was built with (default: the one its adapter plan records).
    """
    policy = model.policy
    if not isinstance(policy, LoraPolicyMixin):
        raise CheckpointError(
            f"model.policy is a {type(policy).__name__}; only adapted models have adapter checkpoints"
        )
    keep = {name for name, p in policy.named_parameters() if p.requires_grad}
    method = _method_of(model, method)
    if method is not None and get_method(method).rewrites_base:
        keep |= {f"{name}.base_layer.weight" for name in policy.lora_layers}
    return {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items() if k in keep}


def save_adapter(model: PPO, path: str | Path, method: str | None = None) -> Path:
    """Write ``model``'s adapter checkpoint to the folder ``path``.

    :param method: The ``adapt`` method the model was built with (default: the one its adapter plan records);
        methods that rewrite base weights (PiSSA, OLoRA) also keep those.
    :return: The folder.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state(model, method)
    tmp = folder / ".adapter.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(folder / "adapter.safetensors")
    atomic_save_stats(model, folder / STATS)
    policy = model.policy
    atomic_write_json(
        folder / "adapter_config.json",
        {
            "format": FORMAT,
            "version": VERSION,
            "method": _method_of(model, method),
            "lora_config": policy.lora_config.to_dict(),
            "lora_plan": policy.lora_plan.to_dict(),
            "eva_report": None if policy.eva_report is None else policy.eva_report.to_dict(),
            "policy_class": type(policy).__name__,
            "keys": sorted(tensors),
        },
    )
    return folder


def load_adapter(base_agent: PPO, path: str | Path, env: GymEnv | None = None, **ppo_kwargs: Any) -> PPO:
    """Rebuild a fine-tuned agent from the pretrained ``base_agent`` and an adapter checkpoint.

    :param env: Environment of the new model (defaults to ``base_agent``'s; one of the two is needed).
    :raises CheckpointError: for a folder that is not an eva-rl adapter or does not fit ``base_agent``.
    """
    folder = Path(path)
    config_path, tensors_path = folder / "adapter_config.json", folder / "adapter.safetensors"
    if not config_path.is_file() or not tensors_path.is_file():
        raise CheckpointError(
            f"{folder} is not an eva-rl adapter: expected adapter_config.json and adapter.safetensors"
        )
    config = json.loads(config_path.read_text())
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise CheckpointError(
            f"{config_path}: format {config.get('format')!r} v{config.get('version')} is not {FORMAT} v1"
        )
    env = env if env is not None else base_agent.get_env()
    if env is None:
        raise CheckpointError("base_agent has no environment; pass env=")
    if (folder / STATS).is_file() and not (isinstance(env, VecEnv) and unwrap_vec_normalize(env) is not None):
        env = VecNormalize.load(str(folder / STATS), BaseAlgorithm._wrap_env(env, verbose=0, monitor_wrapper=True))
        env.training = False
    lora = LoraConfig.from_dict(config["lora_config"])
    plan = None if config.get("lora_plan") is None else AdapterPlan.from_dict(config["lora_plan"])
    report = None if config.get("eva_report") is None else EvaReport.from_dict(config["eva_report"])
    policy_kwargs = lora_policy_kwargs(lora, plan, report, base_agent.policy_kwargs)
    try:
        model = build_model(base_agent, lora_policy_class(type(base_agent.policy)), policy_kwargs, env, **ppo_kwargs)
    except ConfigError as error:
        raise CheckpointError(f"{folder} does not fit this agent: {error}") from error
    load_base_weights(model.policy, base_agent.policy.state_dict())
    tensors = load_file(str(tensors_path))
    state = model.policy.state_dict()
    unknown = sorted(set(tensors) - set(state))
    mismatched = [k for k in tensors if k in state and tensors[k].shape != state[k].shape]
    if unknown or mismatched:
        raise CheckpointError(
            f"{tensors_path} does not fit this agent: unknown keys {unknown}, shape mismatch {mismatched}"
        )
    state.update({k: v.to(state[k].device) for k, v in tensors.items()})
    model.policy.load_state_dict(state, strict=True)
    model.policy.sync_targets()  # target networks start as copies of the loaded online networks
    return model
