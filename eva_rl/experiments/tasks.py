"""Tasks: a transfer (source agent -> target env) with its wrappers, PPO settings, budget, eval and LoRA/EVA
defaults, read from one YAML file per task in ``configs/``."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eva_rl.algorithms import ALGORITHM_NAMES
from eva_rl.config import CONVERGENCE_TESTS, DATA_SOURCES, EvaConfig, LoraConfig, _is_int, _is_number
from eva_rl.errors import ConfigError
from eva_rl.files import read_yaml
from eva_rl.methods import method_names

ROOT = Path(__file__).resolve().parents[2]
"""The project root: ``configs/`` and ``agents/`` live here."""
CONFIG_DIR = ROOT / "configs"


@dataclass
class EvalSettings:
    """Evaluation on a separate env with fixed episode seeds.

    :param freq: Environment steps between evaluations (one also runs at step 0).
    :param episodes: Episodes per evaluation.
    :param deterministic: Greedy actions. MiniGrid is evaluated stochastically, as rl-zoo3 does: an argmax
        policy can loop until ``max_steps``.
    :param seed: Seed of the eval episodes and of the action sampling during evaluation.
    :param n_envs: Parallel eval envs (at most ``episodes``); part of what fixes the eval episodes, so it does
        not follow the training ``n_envs``.
    """

    freq: int = 10_000
    episodes: int = 50
    deterministic: bool = False
    seed: int = 10_000
    n_envs: int = 8

    @property
    def env_count(self) -> int:
        return min(self.n_envs, self.episodes)

    def __post_init__(self) -> None:
        for name in ("freq", "episodes", "n_envs"):
            check_count(getattr(self, name), f"eval.{name}")
        if not is_seed(self.seed):
            raise ConfigError(f"eval.seed={self.seed!r} is invalid: expected {SEED}")
        if not isinstance(self.deterministic, bool):
            raise ConfigError(f"eval.deterministic={self.deterministic!r} is invalid: expected true or false")


@dataclass
class CloningSettings:
    """Pretraining by behaviour cloning from scripted experts, instead of by RL on the source env.

    :param envs: Env ids the experts act in (registered, sharing one observation and action space).
    :param expert: ``module:function`` taking an env id and returning the expert for it: an object whose
        ``get_action(observation)`` gives the action (Meta-World's scripted policies).
    :param episodes: Demonstrations per env.
    :param action_noise: Std of Gaussian noise added to the actions the env executes (the recorded action stays the
        expert's), so the demonstrations also cover states a little off the expert's path, where a clone drifts to
        (DART, Laskey et al. 2017).
    :param epochs: Passes of the cloning over the demonstrations.
    :param batch_size: Transitions per gradient step.
    :param learning_rate: Adam's step size for the cloning.
    """

    envs: list[str]
    expert: str
    episodes: int = 50
    action_noise: float = 0.1
    epochs: int = 10
    batch_size: int = 256
    learning_rate: float = 3e-4

    def __post_init__(self) -> None:
        if not isinstance(self.envs, list) or not self.envs or not all(isinstance(e, str) and e for e in self.envs):
            raise ConfigError(f"pretrain_cloning.envs={self.envs!r} is invalid: expected a non-empty list of env ids")
        check_distinct(self.envs, "pretrain_cloning.envs")
        if not isinstance(self.expert, str) or ":" not in self.expert:
            raise ConfigError(
                f"pretrain_cloning.expert={self.expert!r} is invalid: expected 'module:function' (it takes an env id "
                "and returns an object with get_action(observation))"
            )
        for name in ("episodes", "epochs", "batch_size"):
            check_count(getattr(self, name), f"pretrain_cloning.{name}")
        for name, low, accepted in (("action_noise", 0.0, _NON_NEGATIVE), ("learning_rate", None, _POSITIVE)):
            value = getattr(self, name)
            if not _is_number(value) or (value < 0 if low is not None else value <= 0):
                raise ConfigError(f"pretrain_cloning.{name}={value!r} is invalid: expected {accepted}")


@dataclass
class TaskConfig:
    """One transfer task.

    :param name: Task name (``--env`` accepts it); also the TensorBoard folder.
    :param target_env: Env to fine-tune on: a registered id or ``module:Class``.
    :param source_env: Env the bundled agent was pretrained on (``scripts/pretrain.py`` reads it).
    :param agent: Path of the pretrained SB3 zip, relative to the project root.
    :param env_packages: Packages to import before making envs (they register ids).
    :param wrappers: ``module:Class`` observation wrappers, applied in order (the agent's encoding).
    :param env_kwargs: Keyword arguments for the env.
    :param policy: SB3 policy for pretraining and training from scratch.
    :param policy_kwargs: Its ``policy_kwargs``; ``*_class`` and ``activation_fn`` values may be
        ``module:Class`` strings.
    :param n_envs: Parallel envs for fine-tuning.
    :param ppo: Constructor arguments of the fine-tuning algorithm shared by every method (``learning_rate``,
        ``n_steps`` ...); the name is historical, the keys of every supported algorithm are accepted, and a run
        rejects those its algorithm does not take.
    :param algo: The algorithm to fine-tune with (``ppo``, ``a2c``, ``sac``, ``td3``, ``dqn``); ``None``: the one that
        saved the agent. PPO and A2C agents can be fine-tuned with either.
    :param update_obs_stats: An agent's ``VecNormalize`` statistics keep updating during fine-tuning, as rl-zoo3 does
        when it continues training. Off by default: the frozen base weights and EVA's directions were computed on
        inputs normalized with the pretrained statistics, and moving them would change what the frozen base sees.
    :param critic_warmup: The first this many updates of an on-policy run train only the critic
        (:class:`~eva_rl.callbacks.CriticWarmup`): for an agent whose value head does not know the target task, whose
        advantages would otherwise move the actor at random.
    :param pretrain_timesteps: Budget of ``scripts/pretrain.py``.
    :param pretrain_seed: Seed of ``scripts/pretrain.py``.
    :param pretrain_cloning: ``scripts/pretrain.py`` clones scripted experts (:class:`CloningSettings`) instead of
        training with RL on ``source_env`` (``pretrain_timesteps`` then goes unused).
    :param pretrain_normalize: ``scripts/pretrain.py`` trains inside ``VecNormalize`` (observations and rewards,
        discounted with the algorithm's gamma), as rl-zoo3's ``normalize: true``, and writes its statistics to
        ``vecnormalize.pkl`` beside the agent's zip, where fine-tuning finds them.
    :param total_timesteps: Fine-tuning budget per run.
    :param methods: Methods run by default, out of the registered ones (:mod:`eva_rl.methods`).
    :param seeds: Seeds run by default.
    :param checkpoint_freq: Environment steps between checkpoints.
    :param eval: Evaluation settings.
    :param lora: Adapter settings for ``eva`` and ``lora``.
    :param eva: EVA settings.
    :param method_settings: Per-method defaults, ``{method: {learning_rate, r, alpha, rho, tau}}``, applied over
        ``ppo``/``lora``/``eva`` for that method's runs (a suite's own ``method_settings`` apply over these).
    """

    name: str
    target_env: str
    source_env: str | None = None
    agent: str | None = None
    env_packages: list[str] = field(default_factory=list)
    wrappers: list[str] = field(default_factory=list)
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    policy: str = "MlpPolicy"
    policy_kwargs: dict[str, Any] = field(default_factory=dict)
    n_envs: int = 8
    ppo: dict[str, Any] = field(default_factory=dict)
    algo: str | None = None
    update_obs_stats: bool = False
    critic_warmup: int = 0
    pretrain_timesteps: int = 100_000
    pretrain_seed: int = 0
    pretrain_normalize: bool = False
    pretrain_cloning: CloningSettings | None = None
    total_timesteps: int = 100_000
    methods: list[str] = field(default_factory=lambda: ["eva", "full"])
    seeds: list[int] = field(default_factory=lambda: [0])
    checkpoint_freq: int = 20_000
    eval: EvalSettings = field(default_factory=EvalSettings)
    lora: LoraConfig = field(default_factory=LoraConfig)
    eva: EvaConfig = field(default_factory=EvaConfig)
    method_settings: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Each field's type and range, before any env is built or agent loaded; the sections validate themselves.
        for name in ("name", "target_env"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: expected a non-empty string")
        check_folder_name(self.name, "name")
        for name in ("source_env", "agent"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: expected a string")
        if not isinstance(self.env_packages, list) or not all(isinstance(p, str) and p for p in self.env_packages):
            raise ConfigError(f"env_packages={self.env_packages!r} is invalid: expected a list of package names")
        if not isinstance(self.wrappers, list) or not all(_is_wrapper_spec(w) for w in self.wrappers):
            raise ConfigError(
                f"wrappers={self.wrappers!r} is invalid: expected a list of 'module:Class' strings (or "
                "{'module.Class': {kwargs}} mappings)"
            )
        for name in ("env_kwargs", "policy_kwargs"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
                raise ConfigError(f"{name}={value!r} is invalid: expected a mapping of keyword arguments")
        if not isinstance(self.policy, str) or not self.policy:
            raise ConfigError(f"policy={self.policy!r} is invalid: expected an SB3 policy name such as 'MlpPolicy'")
        check_method_settings(self.method_settings, "method_settings")
        if isinstance(self.eval, dict):
            self.eval = build_config(EvalSettings, self.eval, "eval")
        if isinstance(self.lora, dict):
            self.lora = build_config(LoraConfig, self.lora, "lora")
        if isinstance(self.eva, dict):
            self.eva = build_config(EvaConfig, self.eva, "eva")
        if isinstance(self.pretrain_cloning, dict):
            self.pretrain_cloning = build_config(CloningSettings, self.pretrain_cloning, "pretrain_cloning")
        elif self.pretrain_cloning is not None and not isinstance(self.pretrain_cloning, CloningSettings):
            raise ConfigError(
                f"pretrain_cloning={self.pretrain_cloning!r} is invalid: expected a mapping of cloning settings"
            )
        if self.pretrain_cloning is not None and self.pretrain_normalize:
            raise ConfigError(
                "pretrain_normalize=true is invalid with pretrain_cloning: cloning trains no VecNormalize"
            )
        known = method_names()
        if not isinstance(self.methods, list) or not self.methods or set(self.methods) - set(known):
            raise ConfigError(f"methods={self.methods!r} is invalid: expected a non-empty list out of {known}")
        for name in ("n_envs", "total_timesteps", "pretrain_timesteps", "checkpoint_freq"):
            check_count(getattr(self, name), name)
        if not isinstance(self.ppo, dict):
            raise ConfigError(f"ppo={self.ppo!r} is invalid: expected a mapping of algorithm arguments")
        unknown = sorted(set(self.ppo) - algorithm_arguments())
        if unknown:
            accepted = sorted(algorithm_arguments())
            raise ConfigError(f"unknown algorithm argument(s) {unknown} in ppo; accepted: {accepted}")
        if self.algo is not None and self.algo not in ALGORITHM_NAMES:
            raise ConfigError(f"algo={self.algo!r} is invalid: expected one of {list(ALGORITHM_NAMES)}")
        for name in ("update_obs_stats", "pretrain_normalize"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: expected true or false")
        check_algorithm_arguments(self.ppo, "ppo")
        if not SETTINGS["critic_warmup"].check(self.critic_warmup):
            raise ConfigError(f"critic_warmup={self.critic_warmup!r} is invalid: expected an integer >= 0")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods={self.methods!r} is invalid: a method is listed twice")
        if not isinstance(self.seeds, list) or not self.seeds or not all(map(is_seed, self.seeds)):
            raise ConfigError(f"seeds={self.seeds!r} is invalid: expected a non-empty list of {SEEDS}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds={self.seeds!r} is invalid: a seed is listed twice (it would run once)")
        if not is_seed(self.pretrain_seed):
            raise ConfigError(f"pretrain_seed={self.pretrain_seed!r} is invalid: expected {SEED}")

    @property
    def agent_path(self) -> Path | None:
        if self.agent is None:
            return None
        path = Path(self.agent)
        return path if path.is_absolute() else ROOT / path

    def with_overrides(
        self, overrides: Mapping[str, Any] | None = None, method: str | None = None, where: str | None = None
    ) -> TaskConfig:
        """A copy with ``overrides`` applied and validated again: the one way a run's task is derived (command-line
        options, a suite's or a sequence's settings, a rank study's rank, a tuning point, a bank task's env).

        :param overrides: ``{setting: value}``: a short name of :data:`SETTINGS` (``r``, ``learning_rate``, ...) or a
            dotted path (``"eval.seed"``, ``"ppo.gamma"``, ``"env_kwargs.size"``, a whole field such as ``"name"``).
        :param method: Apply that method's ``method_settings`` first (``overrides`` win over them).
        :param where: Names the source of the values in an error (``"--rank 0"``, ``"suite doorkey"``).
        :raises ConfigError: naming the setting and what would be accepted.

        A setting given here is final: the copy's ``method_settings`` no longer set it, so a value given on the command
        line applies to every method.
        """
        merged = {**(self.method_settings.get(method, {}) if method else {}), **(overrides or {})}
        try:
            fields, sections = _grouped_changes(self, merged)
            # dotted paths apply over the section as the overrides leave it (a whole section may be given too)
            bases = {name: fields.get(name, getattr(self, name)) for name in sections}
            sections_changed = {
                name: {**bases[name], **values}
                if isinstance(bases[name], dict)
                else dataclasses.replace(bases[name], **values)
                for name, values in sections.items()
            }
            paths = _paths(merged)
            overridden = {name for name in SETTINGS if _path_of(name) in paths}
            method_settings = {
                m: {k: v for k, v in s.items() if k not in overridden} for m, s in self.method_settings.items()
            }
            return dataclasses.replace(self, **{"method_settings": method_settings, **fields, **sections_changed})
        except (ValueError, TypeError) as error:  # a section's own validation (LoraConfig...) raises ValueError
            if where is None and isinstance(error, ConfigError):
                raise
            if not where:
                raise ConfigError(str(error)) from error
            # a section's message names the bad value already ("eva.tau=2.0 is invalid: ..."): say it once
            said = " is invalid" in str(error)
            raise ConfigError(f"{where}: {error}" if said else f"{where} is invalid: {error}") from error


SCORES = ("return", "success")
"""What a page may compare: the mean eval return, or the share of eval episodes in which the env set
``info["success"]`` (Meta-World's measure; :meth:`~eva_rl.experiments.run_folder.RunResult.scored`)."""

_SECTION_TYPES = (EvalSettings, LoraConfig, EvaConfig, CloningSettings)
"""Task fields whose own fields a dotted path sets (besides the mappings ``ppo``, ``env_kwargs``...)."""


@dataclass(frozen=True)
class Setting:
    """A setting with a short name, which runs, suites, sequences and the command line override alike.

    :param path: The task field it sets: ``"n_envs"``, or ``"<section>.<key>"`` in ``lora``, ``eva``, ``eval`` or
        the algorithm arguments ``ppo``.
    :param check: Accepts a value (type first), before any task is built.
    :param accepted: What ``check`` accepts, for the error message.
    :param convert: Applied to an accepted value (a learning rate given as ``1`` is the float ``1.0``).
    """

    path: str
    check: Callable[[Any], bool]
    accepted: str
    convert: Callable[[Any], Any] | None = None


def _is_wrapper_spec(spec: Any) -> bool:
    if isinstance(spec, str):
        return bool(spec)
    return (
        isinstance(spec, dict)
        and len(spec) == 1
        and all(isinstance(k, str) and (v is None or isinstance(v, dict)) for k, v in spec.items())
    )


_POSITIVE, _NON_NEGATIVE, _UNIT = "a finite number > 0", "a finite number >= 0", "a number in [0, 1]"
_BOOLEAN = "true or false"


# Accepted values of the algorithm arguments a task may set, checked before any env or agent exists: a bad value
# otherwise surfaces deep inside SB3, after the jumpstart evaluation or EVA ran.
def _is_train_freq(value: Any) -> bool:
    if isinstance(value, list | tuple) and len(value) == 2:
        return _is_int(value[0]) and value[0] >= 1 and value[1] in ("step", "episode")
    return _is_int(value) and value >= 1


_ARGUMENT_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "learning_rate": (lambda v: _is_number(v) and v > 0, _POSITIVE),
    "n_steps": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "n_epochs": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "buffer_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "learning_starts": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "gradient_steps": (lambda v: _is_int(v) and (v >= 1 or v == -1), "an integer >= 1, or -1"),
    "target_update_interval": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "gamma": (lambda v: _is_number(v) and 0 <= v <= 1, _UNIT),
    "gae_lambda": (lambda v: _is_number(v) and 0 <= v <= 1, _UNIT),
    "tau": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "clip_range": (lambda v: _is_number(v) and v > 0, _POSITIVE),
    "vf_coef": (lambda v: _is_number(v) and v >= 0, _NON_NEGATIVE),
    "max_grad_norm": (lambda v: _is_number(v) and v > 0, _POSITIVE),
    "ent_coef": (
        lambda v: (_is_number(v) and v >= 0) or (isinstance(v, str) and v.startswith("auto")),
        "a number >= 0 (or SAC's 'auto' / 'auto_<x>')",
    ),  # fmt: skip
    "exploration_fraction": (lambda v: _is_number(v) and 0 <= v <= 1, _UNIT),
    "exploration_initial_eps": (lambda v: _is_number(v) and 0 <= v <= 1, _UNIT),
    "exploration_final_eps": (lambda v: _is_number(v) and 0 <= v <= 1, _UNIT),
    # a negative target_kl stops every epoch after its first minibatch; a string counts as true
    "target_kl": (lambda v: v is None or (_is_number(v) and v > 0), "a number > 0, or null (no early stop)"),
    "clip_range_vf": (lambda v: v is None or (_is_number(v) and v > 0), "a number > 0, or null"),
    "normalize_advantage": (lambda v: isinstance(v, bool), _BOOLEAN),
    "use_sde": (lambda v: isinstance(v, bool), _BOOLEAN),
    "use_sde_at_warmup": (lambda v: isinstance(v, bool), _BOOLEAN),
    "use_rms_prop": (lambda v: isinstance(v, bool), _BOOLEAN),
    "optimize_memory_usage": (lambda v: isinstance(v, bool), _BOOLEAN),
    "sde_sample_freq": (lambda v: _is_int(v) and v >= -1, "an integer >= -1"),
    "policy_delay": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "target_policy_noise": (lambda v: _is_number(v) and v >= 0, _NON_NEGATIVE),
    "target_noise_clip": (lambda v: _is_number(v) and v >= 0, _NON_NEGATIVE),
    "train_freq": (_is_train_freq, "an integer >= 1, or [n, 'step' | 'episode']"),
}


def check_algorithm_arguments(arguments: dict[str, Any], where: str) -> None:
    """:raises ConfigError: naming the first argument whose value has the wrong type or range."""
    for key, value in arguments.items():
        check, accepted = _ARGUMENT_CHECKS.get(key, (None, ""))
        if check is not None and not check(value):
            raise ConfigError(f"{where}.{key}={value!r} is invalid: expected {accepted}")


_COUNT = (lambda v: _is_int(v) and v >= 1, "an integer >= 1")
SETTINGS: dict[str, Setting] = {
    "learning_rate": Setting("ppo.learning_rate", *_ARGUMENT_CHECKS["learning_rate"], convert=float),
    "r": Setting("lora.r", *_COUNT),
    "alpha": Setting("lora.alpha", lambda v: _is_number(v) and v > 0, _POSITIVE),
    "rho": Setting("eva.rho", lambda v: _is_number(v) and v >= 1, "a number >= 1"),
    "tau": Setting("eva.tau", lambda v: _is_number(v) and 0 <= v <= 1, _UNIT),
    "eva_convergence": Setting(
        "eva.convergence", lambda v: v in CONVERGENCE_TESTS, f"one of {', '.join(CONVERGENCE_TESTS)}"
    ),
    "n_envs": Setting("n_envs", *_COUNT),
    "total_timesteps": Setting("total_timesteps", *_COUNT),
    "checkpoint_freq": Setting("checkpoint_freq", *_COUNT),
    "eval_freq": Setting("eval.freq", *_COUNT),
    "eval_episodes": Setting("eval.episodes", *_COUNT),
    "eva_data": Setting("eva.data_source", lambda v: v in DATA_SOURCES, f"one of {', '.join(DATA_SOURCES)}"),
    "rslora": Setting("lora.use_rslora", lambda v: isinstance(v, bool), "true or false"),
    "critic_warmup": Setting("critic_warmup", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
}
"""Short names of the settings that runs override (a task's or a suite's ``method_settings``, a suite's tuning grid,
a rank study, the command line): a new overridable setting is one line here."""

METHOD_SETTINGS = tuple(SETTINGS)
"""Settings a method may override, in a task's, a suite's or a sequence's ``method_settings``."""


def is_count(value: Any) -> bool:
    """An integer >= 1 (a budget, a frequency, a number of envs...), not a bool."""
    return _COUNT[0](value)


def check_count(value: Any, name: str) -> None:
    """:raises ConfigError: unless ``value`` is an integer >= 1 (a budget, a frequency, a number of envs...)."""
    if not is_count(value):
        raise ConfigError(f"{name}={value!r} is invalid: expected {_COUNT[1]}")


def check_setting(name: str, value: Any, where: str) -> Any:
    """``value`` for the short-named setting ``name``, converted.

    :raises ConfigError: naming ``where``, the setting and what would be accepted.
    """
    setting = SETTINGS[name]
    if not setting.check(value):
        raise ConfigError(f"{where}={value!r} is invalid: expected {setting.accepted}")
    return setting.convert(value) if setting.convert else value


def _path_of(name: str) -> str:
    return SETTINGS[name].path if name in SETTINGS else name


def _paths(overrides: Mapping[str, Any]) -> set[str]:
    return {_path_of(name) for name in overrides}


def _grouped_changes(task: TaskConfig, overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict]]:
    """``overrides`` as whole-field changes and per-section changes (``{"lora": {"r": 2}}``), each value checked."""
    known = {f.name for f in dataclasses.fields(task)}
    fields: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for name, value in overrides.items():
        if name in SETTINGS:
            value = check_setting(name, value, _path_of(name))
        section, _, key = _path_of(name).partition(".")
        if section not in known or (key and not isinstance(getattr(task, section), (dict, *_SECTION_TYPES))):
            raise ConfigError(
                f"unknown setting {name!r}: expected one of {list(SETTINGS)} or a dotted path of a task field "
                f"({sorted(known)})"
            )
        if key:
            sections.setdefault(section, {})[key] = value
        else:
            fields[section] = value
    return fields, sections


def check_settings(settings: dict[str, Any], where: str) -> None:
    """:raises ConfigError: naming the key or value of ``settings`` (short names of :data:`SETTINGS`, for every
    run of a suite or a sequence) that is not accepted."""
    if not isinstance(settings, dict) or set(settings) - set(SETTINGS):
        raise ConfigError(f"{where}={settings!r} is invalid: expected a mapping with keys out of {tuple(SETTINGS)}")
    for key, value in settings.items():
        check_setting(key, value, f"{where}[{key!r}]")


def check_method_settings(method_settings: dict[str, dict[str, float]], where: str) -> None:
    """:raises ConfigError: naming the method, key or value that is not accepted."""
    if not isinstance(method_settings, dict):
        raise ConfigError(f"{where}={method_settings!r} is invalid: expected a mapping {{method: {{setting: value}}}}")
    for method, settings in method_settings.items():
        unknown = sorted(set(settings) - set(METHOD_SETTINGS)) if isinstance(settings, dict) else None
        if method not in method_names() or unknown is None or unknown:
            raise ConfigError(
                f"{where}[{method!r}]={settings!r} is invalid: expected a method out of {method_names()} "
                f"with keys out of {METHOD_SETTINGS}"
            )
        for key, value in settings.items():
            check_setting(key, value, f"{where}[{method!r}][{key!r}]")


class Seeded:
    """A config whose ``seeds`` field is a number of seeds (``0 .. n-1``) or a list of seeds (a suite, a sequence, a
    rank study)."""

    seeds: int | list[int]

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)


def algorithm_arguments(algorithm: str | None = None) -> set[str]:
    """Constructor arguments a task may set for ``algorithm`` (default: any supported algorithm); the policy, env
    and run plumbing are eva-rl's."""
    excluded = {
        "self",
        "policy",
        "env",
        "policy_kwargs",
        "seed",
        "device",
        "verbose",
        "tensorboard_log",
        "_init_setup_model",
    }
    from eva_rl.loading import ALGORITHMS  # SB3's classes: imported when a run's arguments are checked

    classes = [ALGORITHMS[algorithm]] if algorithm else list(ALGORITHMS.values())
    return {name for cls in classes for name in inspect.signature(cls.__init__).parameters} - excluded


MAX_SEED = 2**31 - 1
"""The largest seed: NumPy takes seeds below 2**32, and env ``k`` of a run is seeded with ``seed + k``."""
SEED, SEEDS = f"an integer in [0, {MAX_SEED}]", f"integers in [0, {MAX_SEED}]"


def is_seed(value: Any) -> bool:
    return _is_int(value) and 0 <= value <= MAX_SEED


FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
"""A name that becomes one folder under ``--log-dir``: one path component, never ``..`` or absolute."""


def check_folder_name(name: Any, what: str) -> None:
    """:raises ConfigError: unless ``name`` is one path component of letters, digits and ``_.+-`` (a task, suite or
    sequence name becomes a folder under ``--log-dir``; ``../x`` or ``/x`` would write elsewhere)."""
    if not isinstance(name, str) or not FOLDER_NAME.fullmatch(name) or set(name) == {"."}:
        raise ConfigError(
            f"{what}={name!r} is invalid: expected one folder name of letters, digits and '_.+-' (it names the "
            "results folder under --log-dir)"
        )


def check_distinct(values: Sequence[Any], what: str) -> None:
    """:raises ConfigError: naming a value ``values`` lists twice."""
    repeated = sorted({str(value) for value in values if list(values).count(value) > 1})
    if repeated:
        raise ConfigError(f"{what}={list(values)!r} is invalid: {', '.join(repeated)} is listed twice")


def check_seeds(seeds: Any, where: str) -> None:
    """:raises ConfigError: unless ``seeds`` is a number of seeds >= 1 or a list of distinct integers >= 0."""
    integers = isinstance(seeds, list) and seeds and all(map(is_seed, seeds))
    if isinstance(seeds, bool) or not ((isinstance(seeds, int) and 1 <= seeds <= 10_000) or integers):
        raise ConfigError(
            f"{where}={seeds!r} is invalid: expected a number of seeds in [1, 10000] or a list of {SEEDS}"
        )
    if isinstance(seeds, list) and len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}={seeds!r} is invalid: a seed is listed twice")


def load_named_config(cls: type, folder: Path, name_or_path: str, kind: str) -> Any:
    """A config file by name (``<folder>/<name>.yaml``) or path, built as ``cls`` with its ``name`` defaulting to the
    file's stem.

    :raises ConfigError: for an unknown name (listing the known ones) or a bad file.
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = folder / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ConfigError(f"unknown {kind} {name_or_path!r}; known {kind}s: {known}")
    data = read_yaml(path) or {}
    if isinstance(data, dict):
        data.setdefault("name", path.stem)
    return build_config(cls, data, str(path))


def build_config(cls: type, values: dict[str, Any], where: str) -> Any:
    """``cls(**values)`` for a config dataclass, with unknown keys and bad values as a :class:`ConfigError` that
    says ``where`` (a file, a section)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping, got {values!r}")
    accepted = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(accepted))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; accepted: {accepted}")
    required = [f.name for f in dataclasses.fields(cls) if f.default is f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in values]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {missing}; required: {required}")
    try:
        return cls(**values)
    except ValueError as error:
        raise ConfigError(f"{where}: {error}") from error


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` applied: mappings merge key by key, any other value replaces the base's."""
    merged = dict(base)
    for key, value in changes.items():
        both_mappings = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = _merged(base[key], value) if both_mappings else value
    return merged


def _task_data(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A task file's settings, over those of the task its ``base:`` names (a file in the same folder): a variant
    (a larger agent on the same transfer) states only what differs.

    :raises ConfigError: for a file that is not a mapping, an unknown base or a file that is its own base.
    """
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of task settings, got {type(data).__name__}")
    data.setdefault("name", path.stem)
    if "base" not in data:
        return data
    base = data.pop("base")
    known = sorted(p.stem for p in path.parent.glob("*.yaml"))
    if not isinstance(base, str) or base not in known:
        close = difflib.get_close_matches(base, known, n=3) if isinstance(base, str) else []
        accepted = f"did you mean {' or '.join(map(repr, close))}?" if close else f"one of {known}"
        raise ConfigError(f"{path}: base={base!r} is invalid: expected the name of a task file beside it; {accepted}")
    base_path = path.parent / f"{base}.yaml"
    if base_path in (path, *seen):
        raise ConfigError(f"{path}: base={base!r} is invalid: the chain of bases returns to {base_path.name}")
    inherited = _task_data(base_path, (*seen, path))
    inherited.pop("name")  # each file names its own task
    return _merged(inherited, data)


def load_task(path: Path) -> TaskConfig:
    """Read and validate a task YAML file (over its ``base:`` task's settings, when it names one).

    :raises ConfigError: naming the file and the bad key or value.
    """
    data = _task_data(path)
    try:
        return build_config(TaskConfig, data, str(path))
    except ConfigError as error:
        message = str(error)
        raise ConfigError(message if message.startswith(str(path)) else f"{path}: {message}") from error


def known_tasks(config_dir: Path = CONFIG_DIR) -> dict[str, Path]:
    """``{task name: YAML path}`` for every task file in ``config_dir``, by name (a task before its variants: the
    target env of ``MiniGrid-DoorKey`` finds it, not ``MiniGrid-DoorKey-1M``)."""
    return {path.stem: path for path in sorted(config_dir.glob("*.yaml"), key=lambda p: p.stem)}


def find_task(env: str, config_dir: Path = CONFIG_DIR) -> TaskConfig | None:
    """The task named ``env``, or a task whose ``target_env`` is ``env``; ``None`` if there is none.

    Where several tasks target ``env`` (a base that fine-tunes on its first target, and that target's own file), the
    one whose name ``env`` extends wins: ``MetaWorld-hammer-v3`` finds ``MetaWorld-hammer``, not ``MetaWorld-MT40``.
    """
    tasks = known_tasks(config_dir)
    if env in tasks:
        return load_task(tasks[env])
    targeting = [task for task in map(load_task, tasks.values()) if task.target_env == env]
    if not targeting:
        return None
    # the longest name that env extends, else the first by name
    return max(targeting, key=lambda task: len(task.name) if env.startswith(task.name) else -1)
