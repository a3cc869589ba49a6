"""The documentation site builds with ``mkdocs build --strict`` (a broken link, a page left out of the nav or an API
reference to a name that does not exist fails it), and its API reference covers every public name with a docstring."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import griffe
import pytest

import eva_rl

ROOT = Path(__file__).resolve().parents[1]
REFERENCED = re.findall(r"^::: ([\w.]+)", (ROOT / "docs" / "library.md").read_text(), flags=re.M)
CONSTANTS = {"ALGORITHMS": "eva_rl.loading", "METHODS": "eva_rl.methods"}
"""Public names that are data (no ``__module__``), and the module that declares them."""


def declared_in(name: str) -> str:
    return CONSTANTS.get(name) or getattr(eva_rl, name).__module__


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    library = (tmp_path / "site" / "library" / "index.html").read_text()
    assert 'id="eva_rl.adapt.adapt"' in library and 'id="eva_rl.bank.AdapterBank"' in library


@pytest.fixture(scope="module")
def package() -> griffe.Module:
    """The package as mkdocstrings reads it (statically, without importing it)."""
    return griffe.load("eva_rl", search_paths=[str(ROOT)])


@pytest.mark.parametrize("name", sorted(eva_rl.__all__))
def test_every_public_name_is_in_the_api_reference_with_a_docstring(name: str, package: griffe.Module) -> None:
    module = declared_in(name)
    assert f"{module}.{name}" in REFERENCED or module in REFERENCED, f"docs/library.md has no ::: entry for {name}"
    documented = package[f"{module}.{name}".removeprefix("eva_rl.")]
    assert documented.docstring is not None and documented.docstring.value.strip(), f"{module}.{name} has no docstring"
