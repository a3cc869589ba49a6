"""The trust boundary: what eva-rl loads without running code, and what it unpickles or imports.

- **Loaded as data, from anywhere**: adapter and bank tensors (safetensors), JSON (``bank.json``, ``result.json``,
  ``adapter_config.json``), rl-zoo3's YAML (the safe loader plus its one ``OrderedDict`` tag), and an SB3 zip's
  ``data`` member when eva-rl only reads which algorithm saved it.
- **Unpickled** (can run code): SB3 zips and ``.pkl`` statistics. Every command prints :func:`pickle_note` for each
  one it loads, whatever folder holds it; the agents bundled in the project's ``agents/`` are the one exception.
- **Imported and called**: ``module:Class`` names (envs, wrappers, ``*_class`` policy settings). Those the user gives
  (command line, their task files) are imported; those a *folder* records (a bank's task env, a received run's
  settings) only when they lie in :data:`TRUSTED_PACKAGES`, or with ``--trust-code``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from eva_rl.errors import ConfigError
from eva_rl.experiments.tasks import ROOT

TRUSTED_PACKAGES = frozenset(
    {"eva_rl", "envs", "gymnasium", "stable_baselines3", "sb3_contrib", "minigrid", "ale_py", "rl_zoo3", "torch"}
)
"""Top-level packages whose ``module:Class`` names a folder may record: eva-rl, the project's ``envs``, and the
libraries eva-rl already imports or installs with its extras."""


def bundled(path: str | Path) -> bool:
    """Inside the project's ``agents/``: made by our own ``scripts/pretrain.py``."""
    return Path(path).resolve().is_relative_to(ROOT / "agents")


def pickle_note(path: str | Path, what: str = "agent") -> None:
    """Say that ``path`` is unpickled, which can run code (not for the bundled agents)."""
    if not bundled(path):
        print(f"[eva-rl] note: {path} is unpickled to load it, which can run code: use only {what}s you trust")


def code_references(values: Iterable[Any]) -> list[str]:
    """The ``module:Class`` names among ``values`` (strings, and the keys of rl-zoo3's ``{"module.Class": kwargs}``
    wrapper entries)."""
    names = []
    for value in values:
        if isinstance(value, dict):
            names += [key for key in value if isinstance(key, str)]
        elif isinstance(value, str) and ":" in value:
            names.append(value)
    return names


def check_recorded_code(names: Iterable[str], where: str, trust_code: bool) -> None:
    """Refuse to import code a folder names, unless it lies in :data:`TRUSTED_PACKAGES` or ``trust_code``.

    :param names: ``module:Class`` (or ``module.Class``) names, or package names, the folder records.
    :param where: The folder and field, for the message.
    :raises ConfigError: naming the first untrusted name.
    """
    if trust_code:
        return
    for name in names:
        package = name.partition(":")[0].split(".")[0]
        if package not in TRUSTED_PACKAGES:
            raise ConfigError(
                f"{where} names {name!r}, code from package {package!r} that eva-rl would import and run; pass "
                f"--trust-code to import it (only for folders you trust), or use {sorted(TRUSTED_PACKAGES)}"
            )
