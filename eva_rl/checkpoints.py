"""Adapter-only checkpoints: the weights a fine-tuning run changed, in safetensors, plus a JSON config.

A full SB3 zip holds every weight and pickles (loading one can run code). An adapter file holds only what
fine-tuning trained (the LoRA factors, DoRA magnitudes, and any trainable head, bias or ``log_std``), plus the
base weights that PiSSA/OLoRA rewrote as residuals; it loads with ``safetensors`` and ``json``, no pickle. The
pretrained agent it was trained from supplies everything else.

Format (a folder):

- ``adapter.safetensors``: ``{policy state-dict key: tensor}``;
- ``adapter_config.json``: ``{"format": "eva-rl-adapter", "version": 1, "method", "lora_config", "eva_report",
  "policy_class", "keys"}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from stable_baselines3 import PPO
from stable_baselines3.common.type_aliases import GymEnv

from eva_rl.adapt import _lora_policy_class, load_base_weights, ppo_hyperparameters, wrap_target_env
from eva_rl.config import LoraConfig
from eva_rl.policies import LoraPolicyMixin
from eva_rl.training import atomic_write_json

FORMAT = "eva-rl-adapter"
VERSION = 1


def adapter_state(model: PPO, method: str | None = None) -> dict[str, Any]:
    """The tensors an adapter checkpoint keeps: trainable parameters, and PiSSA/OLoRA residual base weights."""
    policy = model.policy
    if not isinstance(policy, LoraPolicyMixin):
        raise ValueError(f"model.policy is a {type(policy).__name__}; only adapted models have adapter checkpoints")
    keep = {name for name, p in policy.named_parameters() if p.requires_grad}
    if method in ("pissa", "olora"):
        keep |= {f"{name}.base_layer.weight" for name in policy.lora_layers}
    return {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items() if k in keep}


def save_adapter(model: PPO, path: str | Path, method: str | None = None) -> Path:
    """Write ``model``'s adapter checkpoint to the folder ``path``.

    :param method: The ``adapt`` method the model was built with; ``"pissa"``/``"olora"`` also keep the rewritten
        base weights.
    :return: The folder.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state(model, method)
    tmp = folder / ".adapter.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(folder / "adapter.safetensors")
    atomic_write_json(
        folder / "adapter_config.json",
        {
            "format": FORMAT,
            "version": VERSION,
            "method": method,
            "lora_config": model.policy.lora_config.to_dict(),
            "eva_report": model.policy.eva_report,
            "policy_class": type(model.policy).__name__,
            "keys": sorted(tensors),
        },
    )
    return folder


def load_adapter(base_agent: PPO, path: str | Path, env: GymEnv | None = None, **ppo_kwargs: Any) -> PPO:
    """Rebuild a fine-tuned agent from the pretrained ``base_agent`` and an adapter checkpoint.

    :param env: Environment of the new model (defaults to ``base_agent``'s; one of the two is needed).
    :raises ValueError: for a folder that is not an eva-rl adapter or does not fit ``base_agent``.
    """
    folder = Path(path)
    config_path, tensors_path = folder / "adapter_config.json", folder / "adapter.safetensors"
    if not config_path.is_file() or not tensors_path.is_file():
        raise ValueError(f"{folder} is not an eva-rl adapter: expected adapter_config.json and adapter.safetensors")
    config = json.loads(config_path.read_text())
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise ValueError(f"{config_path}: format {config.get('format')!r} v{config.get('version')} is not {FORMAT} v1")
    env = env if env is not None else base_agent.get_env()
    if env is None:
        raise ValueError("base_agent has no environment; pass env=")
    vec_env = wrap_target_env(base_agent, env)
    lora = LoraConfig.from_dict(config["lora_config"])
    policy_kwargs = {k: v for k, v in base_agent.policy_kwargs.items() if k not in ("lora_config", "eva_report")}
    policy_kwargs.update(lora_config=lora.to_dict(), eva_report=config["eva_report"])
    hyperparameters = {**ppo_hyperparameters(base_agent), **ppo_kwargs}
    model = PPO(_lora_policy_class(base_agent), vec_env, policy_kwargs=policy_kwargs, **hyperparameters)
    load_base_weights(model.policy, base_agent.policy.state_dict())
    tensors = load_file(str(tensors_path))
    state = model.policy.state_dict()
    unknown = sorted(set(tensors) - set(state))
    mismatched = [k for k in tensors if k in state and tensors[k].shape != state[k].shape]
    if unknown or mismatched:
        raise ValueError(f"{tensors_path} does not fit this agent: unknown keys {unknown}, shape mismatch {mismatched}")
    state.update({k: v.to(state[k].device) for k, v in tensors.items()})
    model.policy.load_state_dict(state, strict=True)
    return model
