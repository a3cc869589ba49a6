"""Files: atomic writes (a temp file in the same folder, then a rename, so readers never see half a file), YAML read
with one-line errors, digests."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from eva_rl.errors import ConfigError

if TYPE_CHECKING:
    from stable_baselines3.common.base_class import BaseAlgorithm

STATS = "vecnormalize.pkl"
"""VecNormalize statistics beside a model (rl-zoo3's file name): a run's ``model.zip``, an adapter checkpoint."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def cached_json(path: Path, compute: Callable[[], Any]) -> Any:
    """What ``compute`` returns, kept at ``path`` as JSON: read from there when it is already written."""
    if path.is_file():
        return json.loads(path.read_text())
    data = compute()
    atomic_write_json(path, data)
    return data


def atomic_write(path: Path, write: Callable[[Path], None], suffix: str = ".tmp") -> None:
    """``write`` a temp file beside ``path``, then rename it to ``path``; the temp file is removed if ``write``
    fails (a full disk), so nothing half-written stays behind or takes the space."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save_model(model: BaseAlgorithm, path: Path) -> None:
    """``model.save`` to a temp zip in the same folder, then rename it to ``path``."""
    atomic_write(path, model.save, suffix=".tmp.zip")


def atomic_save_stats(model: BaseAlgorithm, path: Path) -> bool:
    """Save ``model``'s ``VecNormalize`` statistics (if its env has them) to ``path`` through a temp file.

    :return: Whether there were statistics to save.
    """
    normalizer = model.get_vec_normalize_env()
    if normalizer is None:
        return False
    atomic_write(path, lambda tmp: normalizer.save(str(tmp)))
    return True


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_writable(folder: Path, what: str | None = None) -> None:
    """Create ``folder`` if needed and write a temp file there (removed again), so a read-only, full or impossible
    folder fails before a run starts, not after it trained.

    :param what: The option that named the folder (``"--out /proc/x.png"``), for the message.
    :raises ConfigError: in one line, naming the folder and what the file system said.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as handle:
            handle.write(b"eva-rl")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        invalid = f"{what} is invalid: " if what else ""
        raise ConfigError(f"{invalid}{folder} cannot be written ({error.strerror or error})") from error


MAX_TEXT_BYTES = 16 * 2**20
"""The largest YAML or JSON file eva-rl reads (task, suite, sequence, adapter and bank files are a few KB)."""
MAX_YAML_ALIASES = 20
"""Aliases a YAML file may use: nested aliases multiply (72 of them, 9 per level, expand to 9**9 values), and 20
expand to a few thousand at most."""


def read_text(path: Path) -> str:
    """The text of a regular file of at most :data:`MAX_TEXT_BYTES` (a FIFO or a device would hang or fill memory).

    :raises ConfigError: in one line, naming the file: missing, not a regular file, too large, or unreadable.
    """
    path = Path(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{path}: not a regular file (a folder, FIFO or device); expected a file")
        if info.st_size > MAX_TEXT_BYTES:
            raise ConfigError(f"{path}: {info.st_size:,} bytes is too large; expected at most {MAX_TEXT_BYTES:,}")
        return path.read_text()
    except FileNotFoundError as error:
        raise ConfigError(f"{path}: no such file") from error
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot be read ({error})") from error


class ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader that also reads ``1e-3`` as a number: YAML 1.1 (PyYAML) needs a dot (``1.0e-3``) and reads
    the short form as a string, YAML 1.2 and every config a learning rate is written in read it as a float."""


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_yaml(path: Path, loader: type[yaml.SafeLoader] = ConfigLoader) -> Any:
    """The YAML document in ``path``, read with a safe loader (:class:`ConfigLoader` unless told).

    :raises ConfigError: in one line, naming the file: missing, unreadable, too large, with more than
        :data:`MAX_YAML_ALIASES` aliases, or not YAML (with the line and column).
    """
    text = read_text(path)
    try:
        if sum(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=loader)) > MAX_YAML_ALIASES:
            raise ConfigError(f"{path}: more than {MAX_YAML_ALIASES} YAML aliases (*name); expected plain values")
        return yaml.load(text, Loader=loader)  # noqa: S506 (a SafeLoader or a subclass)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise ConfigError(f"{path}: not valid YAML ({problem}{where})") from error
