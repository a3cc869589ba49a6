"""The command line starts fast: every script's and every command's ``--help`` runs without importing torch,
stable-baselines3 or Gymnasium (each costs seconds at start-up; the handlers import them when a command runs).
The times themselves are in BENCHMARKS.md (``python -X importtime``), not asserted here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from eva_rl.experiments.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "stable_baselines3", "gymnasium")

# Runs the entry point as its script would, then reports which heavy packages the process imported.
PROBE = """
import runpy, sys
sys.argv = {argv!r}
try:
    {call}
except SystemExit as done:
    assert done.code in (0, None), done.code
print(sorted(name for name in {heavy!r} if name in sys.modules))
"""


def imported_by(argv: list[str], call: str) -> list[str]:
    code = PROBE.format(argv=argv, call=call, heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
    return eval(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("script", sorted(path.name for path in (ROOT / "scripts").glob("*.py")))
def test_each_scripts_help_imports_no_heavy_package(script: str) -> None:
    call = f"runpy.run_path('scripts/{script}', run_name='__main__')"
    assert imported_by([f"scripts/{script}", "--help"], call) == []


@pytest.mark.parametrize("argv", [[], *([name] for name in COMMANDS), ["inspect", "some_bank"]], ids=str)
def test_each_commands_help_imports_no_heavy_package(argv: list[str]) -> None:
    call = "from eva_rl.experiments.cli import main; sys.exit(main(sys.argv[1:]))"
    assert imported_by(["eva-rl", *argv, "--help"], call) == []


def test_eva_rl_adapt_stays_the_function_once_its_module_is_imported() -> None:
    """The package imports its names lazily; the import system would bind the module ``eva_rl.adapt`` over them."""
    code = "import eva_rl, eva_rl.adapt; from eva_rl.adapt import merge; print(callable(eva_rl.adapt), eva_rl.merge)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.startswith("True <function merge")
