"""Loading pretrained agents: an SB3 zip, an rl-zoo3 experiment folder or a Hub-style folder, with the observation
pipeline the agent was trained with (VecNormalize statistics, env wrappers, frame stack, env kwargs).

The zip names no algorithm; it is read from the saved policy class and hyperparameters without unpickling
(``detect_algorithm``). rl-zoo3 writes ``<algo>/<env>_<n>/<env>.zip`` with ``<env>/config.yml``, ``args.yml`` and
``vecnormalize.pkl``; a Hub folder (rl-zoo3's push or ``huggingface_sb3``) holds ``<name>.zip``,
``vec_normalize.pkl`` and ``config.yml`` or ``config.json``. SB3 zips and ``.pkl`` files are pickles: load only
agents you trust.
"""

from __future__ import annotations

import ast
import functools
import importlib
import json
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from stable_baselines3 import A2C, DQN, PPO, SAC, TD3
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.vec_env import VecEnv, VecFrameStack, VecNormalize

from eva_rl.algorithms import ALGORITHM_NAMES
from eva_rl.errors import AgentError, ConfigError
from eva_rl.files import read_yaml
from eva_rl.offpolicy import PRETRAINED_WARMUP

ALGORITHMS: dict[str, type[BaseAlgorithm]] = dict(zip(ALGORITHM_NAMES, (PPO, A2C, SAC, TD3, DQN), strict=True))
"""The algorithms eva-rl loads and fine-tunes, by rl-zoo3's name."""
ON_POLICY = ("ppo", "a2c")
"""Algorithms that share SB3's actor-critic policy classes, so one can fine-tune the other's agent."""
_STATS_FILES = ("vecnormalize.pkl", "vec_normalize.pkl")


def _zip_data(path: Path) -> dict[str, Any]:
    """The zip's ``data`` member (JSON; its pickled values stay base64 strings, never unpickled here)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("data"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError) as error:
        raise AgentError(
            f"pretrained agent {str(path)!r} is not an SB3 zip ({type(error).__name__}: {error})"
        ) from error


def algorithm_name(model: BaseAlgorithm) -> str:
    """The name (a key of :data:`ALGORITHMS`) of the algorithm ``model`` is, subclasses included (EvaPPO is PPO)."""
    for name, algorithm in ALGORITHMS.items():
        if isinstance(model, algorithm):
            return name
    raise AgentError(f"{type(model).__name__} is not one of the supported algorithms {list(ALGORITHMS)}")


def detect_algorithm(path: Path) -> str:
    """The algorithm that saved the zip at ``path``: ``"ppo"``, ``"a2c"``, ``"sac"``, ``"td3"`` or ``"dqn"``.

    Read from the policy class's module and the saved hyperparameters (PPO has ``clip_range``, A2C has not;
    DDPG is TD3 with one critic and no target noise clip).

    :raises AgentError: for a file that is not an SB3 zip or an algorithm eva-rl does not support, named.
    """
    data = _zip_data(Path(path))
    policy = data.get("policy_class", {})
    module = policy.get("__module__", "") if isinstance(policy, Mapping) else ""
    if module.startswith("stable_baselines3.sac"):
        return "sac"
    if module.startswith("stable_baselines3.td3"):
        if data.get("policy_delay") == 1 and data.get("target_noise_clip") == 0.0:
            raise AgentError(f"{path} was saved by DDPG, which eva-rl does not support; supported: {list(ALGORITHMS)}")
        return "td3"
    if module.startswith("stable_baselines3.dqn"):
        return "dqn"
    if module == "eva_rl.policies":  # eva-rl's LoRA classes: their algorithm's own saved hyperparameters tell
        for key, algorithm in (("exploration_final_eps", "dqn"), ("target_entropy", "sac"), ("policy_delay", "td3")):
            if key in data:
                return algorithm
    if module in ("stable_baselines3.common.policies", "eva_rl.policies"):
        return "ppo" if "clip_range" in data else "a2c"
    name = module.split(".")[1] if module.count(".") >= 1 else module or "unknown"
    raise AgentError(
        f"{path} was saved by an algorithm eva-rl does not support (policy class from {module!r}, algorithm "
        f"{name!r}); supported: {list(ALGORITHMS)}"
    )


class _ZooLoader(yaml.SafeLoader):
    """YAML's safe loader plus the one Python tag rl-zoo3 writes (an OrderedDict); any other Python tag fails."""


def _ordered_dict(loader: yaml.SafeLoader, node: yaml.Node) -> dict[str, Any]:
    (pairs,) = loader.construct_sequence(node, deep=True) or [[]]
    return {key: value for key, value in pairs}


_ZooLoader.add_constructor("tag:yaml.org,2002:python/object/apply:collections.OrderedDict", _ordered_dict)


def read_zoo_yaml(path: Path) -> dict[str, Any]:
    """An rl-zoo3 ``config.yml`` / ``args.yml`` / ``env_kwargs.yml`` as a plain dict, without running code.

    :raises AgentError: naming the file when it does not parse.
    """
    try:
        data = read_yaml(path, _ZooLoader)
    except ConfigError as error:
        raise AgentError(f"not an rl-zoo3 YAML file: {error}") from error
    if isinstance(data, list):  # config.yml: a list of (key, value) pairs in older rl-zoo3 versions
        data = dict(data)
    return data or {}


def _normalize_setting(value: Any) -> bool:
    """Whether rl-zoo3's ``normalize`` entry (bool, dict, or a dict written as a string) normalizes observations."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value.lower() == "true"
    if isinstance(value, Mapping):
        return bool(value.get("norm_obs", True) or value.get("norm_reward", False))
    return bool(value)


@dataclass
class PretrainedAgent:
    """A pretrained agent and the observation pipeline it was trained with.

    :ivar model: The loaded SB3 model.
    :ivar algorithm: Its algorithm (a key of :data:`ALGORITHMS`).
    :ivar path: The model zip.
    :ivar layout: ``"zip"``, ``"rl-zoo3"``, ``"hub"`` or ``"folder"`` (a folder with one zip and nothing else known).
    :ivar vec_normalize: The ``VecNormalize`` statistics file it was trained with, if any.
    :ivar env_id: The env id the agent's folder records, if any.
    :ivar env_wrappers: rl-zoo3 ``env_wrapper`` entries (``"module.Class"`` or ``{"module.Class": kwargs}``).
    :ivar frame_stack: rl-zoo3's ``frame_stack``.
    :ivar env_kwargs: The env kwargs it was trained with.
    :ivar vec_env_wrapper: rl-zoo3's ``vec_env_wrapper`` (``"module.Class"`` or ``{"module.Class": kwargs}``): a
        ``VecEnvWrapper`` around the vectorized env, inside the statistics.
    """

    model: BaseAlgorithm
    algorithm: str
    path: Path
    layout: str = "zip"
    vec_normalize: Path | None = None
    env_id: str | None = None
    env_wrappers: list[Any] = field(default_factory=list)
    frame_stack: int | None = None
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    vec_env_wrapper: Any = None

    def wrap_vec_env(
        self, venv: VecEnv, training: bool = False, norm_reward: bool | None = None, stats: Path | None = None
    ) -> VecEnv:
        """``venv`` with the agent's vector wrappers, in rl-zoo3's order: ``VecNormalize`` (its statistics) inside,
        then ``VecFrameStack``, then, for channel-last images, the ``VecTransposeImage`` SB3 adds to every env it
        trains on (an evaluation env without it would see frames the policy was never trained on).

        :param training: Whether the statistics keep updating.
        :param norm_reward: Override the statistics' reward normalization (``False`` to evaluate raw returns).
        :param stats: A statistics file to use instead of the agent's (a fine-tuning run's own).
        """
        if self.vec_env_wrapper:  # rl-zoo3 wraps the vectorized env first, then normalizes and stacks frames
            venv = _vec_env_wrapper(self.vec_env_wrapper)(venv)
        stats = stats or self.vec_normalize
        if stats is not None:
            venv = load_statistics(stats, venv, training)
            if norm_reward is not None:
                venv.norm_reward = norm_reward
        if self.frame_stack:
            venv = VecFrameStack(venv, self.frame_stack)
        return BaseAlgorithm._wrap_env(venv, verbose=0, monitor_wrapper=False)


def _vec_env_wrapper(spec: Any) -> Any:
    """The ``VecEnvWrapper`` an rl-zoo3 ``vec_env_wrapper`` entry names, with its kwargs bound.

    :raises AgentError: for an entry that names no importable class.
    """
    name, kwargs = next(iter(spec.items())) if isinstance(spec, dict) else (spec, None)
    module, _, attribute = str(name).rpartition(".")
    try:
        wrapper = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise AgentError(f"the agent's vec_env_wrapper {spec!r} cannot be imported ({error})") from error
    return functools.partial(wrapper, **(kwargs or {}))


def load_statistics(path: Path, venv: VecEnv, training: bool = False) -> VecNormalize:
    """``venv`` wrapped in the ``VecNormalize`` statistics pickled at ``path``.

    :param training: Whether the statistics keep updating.
    :raises AgentError: for a file that is missing, damaged or does not fit ``venv``, named.
    """
    try:
        normalized = VecNormalize.load(str(path), venv)
    except (OSError, EOFError, ValueError, AssertionError, AttributeError, TypeError, pickle.UnpicklingError) as error:
        raise AgentError(
            f"VecNormalize statistics {str(path)!r} cannot be loaded for this env ({type(error).__name__}: {error})"
        ) from error
    normalized.training = training
    return normalized


def _zoo_layout(zip_path: Path) -> dict[str, Any]:
    """What an rl-zoo3 run folder records beside ``<run>/<env>.zip`` (in ``<run>/<env>/``)."""
    folder = zip_path.parent / zip_path.stem
    if not (folder / "config.yml").is_file():  # best_model.zip, a checkpoint: the run folder is <env>_<n>
        run = zip_path.parent.name
        folder = next((p.parent for p in zip_path.parent.glob("*/config.yml") if run.startswith(p.parent.name)), None)
    if folder is None:
        return {}
    config = read_zoo_yaml(folder / "config.yml")
    args = read_zoo_yaml(folder / "args.yml") if (folder / "args.yml").is_file() else {}
    return {
        "layout": "rl-zoo3",
        "env_id": args.get("env") or folder.name,
        "config": config,
        "env_kwargs": {**(config.get("env_kwargs") or {}), **(args.get("env_kwargs") or {})},
        "stats_dir": folder,
    }


def _hub_layout(folder: Path) -> dict[str, Any]:
    """What a Hub-style folder records beside its zip (``config.yml``, ``env_kwargs.yml``, ``vec_normalize.pkl``)."""
    config = read_zoo_yaml(folder / "config.yml") if (folder / "config.yml").is_file() else {}
    env_kwargs = read_zoo_yaml(folder / "env_kwargs.yml") if (folder / "env_kwargs.yml").is_file() else {}
    args = read_zoo_yaml(folder / "args.yml") if (folder / "args.yml").is_file() else {}
    markers = ("config.yml", "config.json", "results.json", *_STATS_FILES)
    return {
        "layout": "hub" if any((folder / name).is_file() for name in markers) else "folder",
        "env_id": args.get("env"),
        "config": config,
        "env_kwargs": env_kwargs or config.get("env_kwargs") or {},
        "stats_dir": folder,
    }


def _is_model_zip(path: Path) -> bool:
    """Whether ``path`` is an SB3 model zip (it holds the ``data`` entry ``save`` writes)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return "data" in archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def _find_zip(folder: Path) -> Path:
    """The model zip of an rl-zoo3 run folder (``<env>.zip``, the final model) or a Hub folder (its one zip)."""
    zips = sorted(p for p in folder.glob("*.zip") if not p.name.startswith("."))
    # rl_zoo3.push_to_hub puts train_eval_metrics.zip (evaluations, not a model) beside the agent's zip
    models = [p for p in zips if _is_model_zip(p)]
    zips = models or zips
    named = [p for p in zips if (folder / p.stem).is_dir() and (folder / p.stem / "config.yml").is_file()]
    final = [p for p in zips if p.stem not in ("best_model",) and not p.stem.startswith("rl_model_")]
    for candidates in (named, final, zips):
        if len(candidates) == 1:
            return candidates[0]
    if not zips:
        raise AgentError(f"{folder} holds no SB3 zip; pass an agent zip, an rl-zoo3 run folder or a Hub folder")
    raise AgentError(f"{folder} holds several zips {[p.name for p in zips]}; pass the one to fine-tune")


def agent_zip(path: str | Path) -> Path:
    """The model zip of an agent path: the zip itself, or the one of an rl-zoo3 run folder or a Hub folder.

    :raises AgentError: for a path that does not exist, or a folder without one clear model zip.
    """
    path = Path(path)
    if not path.exists():
        raise AgentError(f"pretrained agent {str(path)!r} does not exist; pass --pretrained path/to/agent.zip")
    if path.is_dir():
        return _find_zip(path)
    if not path.is_file():  # a FIFO or a device (/dev/zero) would hang or fill memory
        raise AgentError(f"pretrained agent {str(path)!r} is not a regular file; pass an SB3 zip or an agent folder")
    return path


def _recorded_layout(path: Path, zip_path: Path) -> dict[str, Any]:
    """What the folder of an agent records beside its zip (rl-zoo3's or a Hub folder's layout; ``{}`` for a zip)."""
    recorded = _zoo_layout(zip_path)
    if not recorded and path.is_dir():
        recorded = _hub_layout(path)
    return recorded


def agent_inputs(path: str | Path) -> list[Path]:
    """The files besides the model zip that decide how an agent acts: its ``VecNormalize`` statistics and rl-zoo3's
    ``config.yml``, ``args.yml`` and ``env_kwargs.yml`` (found without unpickling anything).

    :raises AgentError: as :func:`agent_zip`.
    """
    path = Path(path)
    zip_path = agent_zip(path)
    folder = _recorded_layout(path, zip_path).get("stats_dir", zip_path.parent)
    names = (*_STATS_FILES, "config.yml", "args.yml", "env_kwargs.yml")
    return [folder / name for name in names if (folder / name).is_file()]


def load_pretrained(path: str | Path, device: str = "auto", algorithm: str | None = None) -> PretrainedAgent:
    """Load an agent from a zip, an rl-zoo3 experiment folder or a Hub-style folder.

    :param path: A zip, an rl-zoo3 run folder (``logs/<algo>/<env>_<n>``) or a Hub folder.
    :param device: Where the policy goes (``"auto"``: CUDA when present).
    :param algorithm: The algorithm to load it as (default: the one that saved it).
    :raises AgentError: for a missing or corrupt file, an unsupported algorithm, or a folder whose recorded
        normalization has no statistics file.
    """
    path = Path(path)
    zip_path = agent_zip(path)
    recorded = _recorded_layout(path, zip_path)
    algorithm = algorithm or detect_algorithm(zip_path)
    if algorithm not in ALGORITHMS:
        raise AgentError(f"algorithm {algorithm!r} is not supported; expected one of {list(ALGORITHMS)}")
    model = load_agent(zip_path, device=device, algorithm=algorithm)
    config = recorded.get("config", {})
    stats_dir = recorded.get("stats_dir", zip_path.parent)
    stats = next((stats_dir / name for name in _STATS_FILES if (stats_dir / name).is_file()), None)
    if stats is None and config.get("normalize") is not None and _normalize_setting(config["normalize"]):
        raise AgentError(
            f"{path} was trained with normalize={config['normalize']!r} but has no {' or '.join(_STATS_FILES)} in "
            f"{stats_dir}; without its statistics the agent would see unnormalized observations"
        )
    wrappers = config.get("env_wrapper") or []
    return PretrainedAgent(
        model=model,
        algorithm=algorithm,
        path=zip_path,
        layout=recorded.get("layout", "zip"),
        vec_normalize=stats,
        env_id=recorded.get("env_id"),
        env_wrappers=wrappers if isinstance(wrappers, list) else [wrappers],
        frame_stack=config.get("frame_stack") or None,
        env_kwargs=dict(recorded.get("env_kwargs") or {}),
        vec_env_wrapper=config.get("vec_env_wrapper"),
    )


def load_agent(
    path: Path, device: str = "auto", algorithm: str | None = None, warm_up: bool = False, **kwargs: Any
) -> BaseAlgorithm:
    """``<Algorithm>.load`` of a zip, the algorithm detected from the zip, with clear errors for a bad file.

    :param path: An SB3 zip (a pickle: load only files you trust).
    :param device: Where the policy goes (``"auto"``: CUDA when present).
    :param algorithm: Load as this algorithm instead of the detected one.
    :param warm_up: Load SAC, TD3 and DQN as their pretrained-warm-up variants (:mod:`eva_rl.offpolicy`): a
        fine-tuning checkpoint that continues inside ``learning_starts``.
    :param kwargs: Passed on to ``load`` (``env=``, ``custom_objects=``...).
    :raises AgentError: naming the path and what is wrong with it.
    """
    path = Path(path)
    if not path.is_file():
        raise AgentError(f"pretrained agent {str(path)!r} does not exist; pass --pretrained path/to/agent.zip")
    algorithm = algorithm or detect_algorithm(path)
    model_class = ALGORITHMS[algorithm]
    if warm_up:
        model_class = PRETRAINED_WARMUP.get(model_class, model_class)
    try:
        return model_class.load(path, device=device, **kwargs)
    except (zipfile.BadZipFile, KeyError, EOFError, RuntimeError, ValueError, TypeError, AssertionError) as error:
        raise AgentError(
            f"pretrained agent {str(path)!r} cannot be loaded as an SB3 {ALGORITHMS[algorithm].__name__} zip "
            f"({type(error).__name__}: {error})"
        ) from error
