"""Every Python block of the README and the documentation pages runs as written, in the folder a user would run it
from: one where the main job left its eva run (here a LoRA adapter of the bundled DoorKey agent stands in for it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks() -> list[tuple[str, str]]:
    """``(page:number, code)`` for each ```` ```python ```` block, in page order."""
    blocks = []
    for page in PAGES:
        for number, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S), start=1):
            blocks.append((f"{page.relative_to(ROOT)}:{number}", code))
    return blocks


BLOCKS = python_blocks()


@pytest.fixture(scope="module")
def main_job_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stable_baselines3 import PPO

    import eva_rl
    from eva_rl.checkpoints import save_adapter
    from eva_rl.experiments.environments import env_factory

    folder = tmp_path_factory.mktemp("user")
    (folder / "agents").symlink_to(ROOT / "agents")
    env = env_factory("MiniGrid-DoorKey-8x8-v0", ["eva_rl.wrappers:OneHotImage"])()
    adapted = eva_rl.adapt(PPO.load(ROOT / "agents/MiniGrid-DoorKey-5x5-v0/model.zip"), env, method="lora")
    save_adapter(adapted, folder / "runs" / "MiniGrid-DoorKey" / "eva" / "seed0" / "adapter")
    return folder


def test_the_pages_hold_the_blocks_this_test_knows() -> None:
    """A block added to a page is run below; one that disappears must be a decision, not an accident."""
    assert len(BLOCKS) >= 5
    assert any("eva_rl.adapt(" in code for _, code in BLOCKS) and any("AdapterBank(" in code for _, code in BLOCKS)


@pytest.mark.parametrize(("where", "code"), BLOCKS, ids=[where for where, _ in BLOCKS])
def test_block_runs_as_written(
    where: str, code: str, main_job_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(main_job_folder)
    namespace: dict = {}
    exec(compile(code, where, "exec"), namespace)
    printed = capsys.readouterr().out
    # what each block says it shows
    if "eva_rl.adapt(" in code:
        assert (main_job_folder / "cartpole_eva.zip").exists() and (main_job_folder / "cartpole_merged.zip").exists()
        assert "mlp_extractor.policy_net.0" in printed
        assert sum(namespace["report"].ranks.values()) == 2 * 6
    if "compute_eva(" in code and "adapt(" not in code:
        assert sum(namespace["result"].ranks.values()) == 4 * 2
    if "AdapterBank(" in code:
        from eva_rl.bank import AdapterBank

        assert namespace["action"] in range(7)
        assert list(AdapterBank.load(main_job_folder / "my_bank", device="cpu").tasks) == ["DoorKey-8x8"]
    if "load_adapter(" in code:
        assert namespace["model"].policy.lora_ranks
