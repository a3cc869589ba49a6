"""Adapter-only checkpoints: the weights a fine-tuning run changed, in safetensors, plus a JSON config.

A full SB3 zip holds every weight and pickles (loading one can run code). An adapter file holds only what
fine-tuning trained (the LoRA factors, DoRA magnitudes, and any trainable head, bias or ``log_std``), plus a frozen
A (LoRA-FA: EVA's directions or a seeded draw) and the base weights that PiSSA/OLoRA rewrote as residuals; it loads
with ``safetensors`` and ``json``, no pickle. The pretrained agent it was trained from supplies everything else.

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

import torch
from safetensors.torch import load_file, save_file
from stable_baselines3 import PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.type_aliases import GymEnv
from stable_baselines3.common.vec_env import VecEnv, unwrap_vec_normalize

from eva_rl.config import LoraConfig
from eva_rl.errors import CheckpointError, ConfigError
from eva_rl.eva_report import EvaReport
from eva_rl.files import STATS, atomic_save_stats, atomic_write, atomic_write_json, read_text
from eva_rl.loading import load_statistics
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
    # A frozen A (LoRA-FA) is still the run's own: EVA's directions or a seeded draw the base agent cannot redo
    keep |= {f"{name}.lora_A" for name in policy.lora_layers}
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
    atomic_write(folder / "adapter.safetensors", lambda tmp: save_file(tensors, str(tmp)))
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


def _check_config(config: dict[str, Any], config_path: Path, base_agent: BaseAlgorithm) -> None:
    """:raises CheckpointError: for an unknown method, another policy class than ``base_agent``'s adapted one, or a
    key list that is not one."""
    method = config.get("method")
    if method is not None:
        try:
            get_method(method)
        except ConfigError as error:
            raise CheckpointError(f"{config_path}: {error}") from error
    expected = lora_policy_class(type(base_agent.policy)).__name__
    if config.get("policy_class", expected) != expected:
        raise CheckpointError(
            f"{config_path}: saved from a {config['policy_class']!r} policy, but this agent's adapted policy is a "
            f"{expected!r}; load it onto the agent it was trained from"
        )
    keys = config.get("keys")
    if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
        raise CheckpointError(f"{config_path}: keys={keys!r} is invalid: expected the list of tensor names")


def check_adapter_tensors(tensors: dict[str, torch.Tensor], expected: set[str], listed: list[str], path: Path) -> None:
    """:raises CheckpointError: unless the file holds exactly the expected tensors (those the config lists), each a
    finite floating-point tensor."""
    problems = []
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing and all(key.endswith(".lora_A") for key in missing):
        problems.append(
            f"missing tensors {missing}: a frozen-A adapter saved before eva-rl kept its A factors; the fine-tuned "
            "policy is only in the run's model.zip"
        )
    elif missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"tensors this agent's adapters do not have {unexpected}")
    if sorted(listed) != sorted(tensors):
        problems.append(f"the config lists {len(listed)} keys but the file holds {len(tensors)} tensors")
    not_float = sorted(k for k, v in tensors.items() if not v.is_floating_point())
    if not_float:
        problems.append(f"non-float tensors {not_float}")
    not_finite = sorted(k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if not_finite:
        problems.append(f"NaN or inf in {not_finite}")
    if problems:
        raise CheckpointError(f"{path} is not a valid adapter for this agent: {'; '.join(problems)}")


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """The validated-format ``adapter_config.json`` of an adapter folder (nothing checked against an agent yet).

    :raises CheckpointError: for a folder without the two files, a config that is not JSON or not this format.
    """
    config_path, tensors_path = folder / "adapter_config.json", folder / "adapter.safetensors"
    if not config_path.is_file() or not tensors_path.is_file():
        raise CheckpointError(
            f"{folder} is not an eva-rl adapter: expected adapter_config.json and adapter.safetensors"
        )
    return read_versioned_json(config_path, FORMAT, VERSION)


def read_versioned_json(path: Path, format_name: str, version: int) -> dict[str, Any]:
    """The JSON object in ``path`` whose ``format`` and ``version`` are these.

    :raises CheckpointError: for a file that is not JSON, not an object, or of another format or version.
    """
    try:
        data = json.loads(read_text(path))
    except ConfigError as error:
        raise CheckpointError(str(error)) from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not JSON ({error})") from error
    except RecursionError as error:
        raise CheckpointError(f"{path}: nested too deeply to be an eva-rl file") from error
    if not isinstance(data, dict) or data.get("format") != format_name or data.get("version") != version:
        found = (data.get("format"), data.get("version")) if isinstance(data, dict) else (None, None)
        raise CheckpointError(f"{path}: format {found[0]!r} v{found[1]} is not {format_name} v{version}")
    return data


def adapter_settings(config: dict[str, Any], where: Path) -> tuple[LoraConfig, AdapterPlan | None, EvaReport | None]:
    """The LoRA config, adapter plan and EVA report an adapter config records.

    :raises CheckpointError: naming ``where`` for a value that does not parse.
    """
    try:
        lora = LoraConfig.from_dict(config["lora_config"])
        plan = None if config.get("lora_plan") is None else AdapterPlan.from_dict(config["lora_plan"])
        report = None if config.get("eva_report") is None else EvaReport.from_dict(config["eva_report"])
    except (ConfigError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{where}: {type(error).__name__}: {error}") from error
    return lora, plan, report


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """:raises CheckpointError: for a file safetensors cannot read."""
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for a damaged file
        raise CheckpointError(f"{path} cannot be read as safetensors ({type(error).__name__}: {error})") from error


def load_adapter(base_agent: PPO, path: str | Path, env: GymEnv | None = None, **ppo_kwargs: Any) -> PPO:
    """Rebuild a fine-tuned agent from the pretrained ``base_agent`` and an adapter checkpoint.

    The checkpoint is validated before anything is loaded into the model: a registered method, the policy class
    ``base_agent``'s adapted policy has, exactly the tensors that policy's adapters need (DoRA magnitudes and
    rewritten base weights included), each a finite float tensor of the right shape.

    :param env: Environment of the new model (defaults to ``base_agent``'s; one of the two is needed).
    :raises CheckpointError: for a folder that is not an eva-rl adapter or does not fit ``base_agent``.
    """
    folder = Path(path)
    config_path, tensors_path = folder / "adapter_config.json", folder / "adapter.safetensors"
    config = read_adapter_config(folder)
    _check_config(config, config_path, base_agent)
    env = env if env is not None else base_agent.get_env()
    if env is None:
        raise CheckpointError("base_agent has no environment; pass env=")
    if (folder / STATS).is_file() and not (isinstance(env, VecEnv) and unwrap_vec_normalize(env) is not None):
        env = load_statistics(folder / STATS, BaseAlgorithm._wrap_env(env, verbose=0, monitor_wrapper=True))
    lora, plan, report = adapter_settings(config, config_path)
    policy_kwargs = lora_policy_kwargs(lora, plan, report, base_agent.policy_kwargs)
    try:
        model = build_model(base_agent, lora_policy_class(type(base_agent.policy)), policy_kwargs, env, **ppo_kwargs)
    except ConfigError as error:
        raise CheckpointError(f"{folder} does not fit this agent: {error}") from error
    load_base_weights(model.policy, base_agent.policy.state_dict())
    tensors = read_tensors(tensors_path)
    state = model.policy.state_dict()
    check_adapter_tensors(tensors, set(adapter_state(model, config.get("method"))), config["keys"], tensors_path)
    mismatched = [
        f"{k} {tuple(tensors[k].shape)} vs {tuple(state[k].shape)}"
        for k in tensors
        if tensors[k].shape != state[k].shape
    ]
    if mismatched:
        raise CheckpointError(f"{tensors_path} does not fit this agent: shape mismatch {mismatched}")
    state.update({k: v.to(state[k].device) for k, v in tensors.items()})
    model.policy.load_state_dict(state, strict=True)
    model.policy.sync_targets()  # target networks start as copies of the loaded online networks
    return model
