"""The README's quickstart runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    runnable = [block for block in blocks if "eva_rl.adapt(" in block]
    assert len(runnable) == 1, "expected one runnable quickstart block in the README"
    return runnable[0]


def test_quickstart_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(quickstart_block(), str(README), "exec"), namespace)
    assert (tmp_path / "cartpole_eva.zip").exists() and (tmp_path / "cartpole_merged.zip").exists()
    printed = capsys.readouterr().out
    assert "mlp_extractor.policy_net.0" in printed
    assert sum(namespace["report"].ranks.values()) == 2 * 6
