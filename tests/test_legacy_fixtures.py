"""Files saved by eva-rl before the architecture redesign still load and act identically.

``tests/fixtures/legacy/`` was written by ``tests/fixtures/make_legacy.py`` at commit dd2ce03: SB3 pickles the policy
and extractor classes by module path (``eva_rl.policies``, ``eva_rl.extractors``), and adapter folders name their
method and policy class, so moving modules must not break them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures.make_legacy import make_env

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "legacy"
ROOT = Path(__file__).resolve().parents[1]


def outputs(model, obs: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        tensor, _ = model.policy.obs_to_tensor(obs)
        logits = model.policy.get_distribution(tensor).distribution.logits
        values = model.policy.predict_values(tensor)
    return {"logits": logits.numpy(), "values": values.numpy()}


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / "expected.npz"))


def test_adapted_zip_loads_with_plain_ppo_load_in_a_fresh_process(tmp_path: Path) -> None:
    """Only stable_baselines3 is imported: the pickled class paths alone must bring eva_rl's classes in."""
    out = tmp_path / "outputs.npz"
    script = (
        "import sys, numpy as np, torch\n"
        "from stable_baselines3 import PPO\n"
        f"model = PPO.load({str(FIXTURES / 'eva_model.zip')!r}, device='cpu')\n"
        f"obs = np.load({str(FIXTURES / 'expected.npz')!r})['observations']\n"
        "with torch.no_grad():\n"
        "    tensor, _ = model.policy.obs_to_tensor(obs)\n"
        "    logits = model.policy.get_distribution(tensor).distribution.logits.numpy()\n"
        "    values = model.policy.predict_values(tensor).numpy()\n"
        f"np.savez({str(out)!r}, logits=logits, values=values, policy=type(model.policy).__module__ + '.' + "
        "type(model.policy).__name__)\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    got = np.load(out)
    assert str(got["policy"]) == "eva_rl.policies.LoraActorCriticCnnPolicy"
    reference = dict(np.load(FIXTURES / "expected.npz"))
    np.testing.assert_allclose(got["logits"], reference["eva_model_logits"], atol=1e-6)
    np.testing.assert_allclose(got["values"], reference["eva_model_values"], atol=1e-6)
    # The fixture's adapters are not trivial: acting like the base would fail the check above.
    assert np.abs(reference["eva_model_logits"] - reference["base_logits"]).max() > 1e-3


def test_adapted_zip_keeps_its_eva_report_and_ranks(expected: dict[str, np.ndarray]) -> None:
    from stable_baselines3 import PPO

    model = PPO.load(FIXTURES / "eva_model.zip", device="cpu")
    assert sum(model.policy.lora_ranks.values()) == 2 * len(model.policy.lora_ranks)
    report = model.policy.eva_report
    ranks = report["ranks"] if isinstance(report, dict) else report.ranks
    assert {name: rank for name, rank in ranks.items() if rank > 0} == model.policy.lora_ranks


def test_adapter_folder_loads_onto_the_base_and_acts_identically(expected: dict[str, np.ndarray]) -> None:
    from stable_baselines3 import PPO

    import eva_rl

    base = PPO.load(FIXTURES / "base.zip", device="cpu")
    np.testing.assert_allclose(outputs(base, expected["observations"])["logits"], expected["base_logits"], atol=1e-6)
    model = eva_rl.load_adapter(base, FIXTURES / "adapter", env=make_env())
    got = outputs(model, expected["observations"])
    np.testing.assert_allclose(got["logits"], expected["adapter_logits"], atol=1e-6)
    np.testing.assert_allclose(got["values"], expected["adapter_values"], atol=1e-6)
    assert np.abs(expected["adapter_logits"] - expected["base_logits"]).max() > 1e-3
    assert all(layer.use_dora for layer in model.policy.lora_layers.values())
