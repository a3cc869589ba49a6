"""Config validation: every bad value names the field, the value and what is accepted."""

from __future__ import annotations

import pytest

from eva_rl import EvaConfig, LoraConfig
from eva_rl.devices import get_device


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, r"LoraConfig.r=0 is invalid: expected an integer >= 1"),
        ({"r": 2.5}, r"LoraConfig.r=2.5 is invalid"),
        ({"alpha": -1.0}, r"LoraConfig.alpha=-1.0 is invalid: expected a finite number > 0"),
        ({"dropout": 1.0}, r"LoraConfig.dropout=1.0 is invalid: expected a probability in \[0, 1\)"),
        ({"target_modules": []}, r"LoraConfig.target_modules=\[\] is invalid"),
        ({"target_modules": 3}, r"LoraConfig.target_modules=3 is invalid"),
        (
            {"rank_pattern": {"action_net": -1}},
            r"LoraConfig.rank_pattern\['action_net'\]=-1 is invalid: expected an integer >= 0",
        ),
        ({"alpha_pattern": {"x": 0}}, r"LoraConfig.alpha_pattern\['x'\]=0 is invalid"),
    ],
)
def test_lora_config_rejects(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rho": 0.5}, r"EvaConfig.rho=0.5 is invalid: expected a number >= 1.0"),
        ({"tau": -0.1}, r"EvaConfig.tau=-0.1 is invalid: expected a cosine threshold in \[0, 1\]"),
        ({"tau": 1.01}, r"EvaConfig.tau=1.01 is invalid"),
        ({"batch_size": 0}, r"EvaConfig.batch_size=0 is invalid: expected an integer >= 1"),
        ({"max_batches": 1}, r"EvaConfig.max_batches=1 is invalid: expected None or an integer >= 2"),
        (
            {"on_max_batches": "ignore"},
            r"EvaConfig.on_max_batches='ignore' is invalid: expected one of \('raise', 'warn'\)",
        ),
        ({"svd_solver": "qr"}, r"EvaConfig.svd_solver='qr' is invalid"),
        ({"extra_components": -1}, r"EvaConfig.extra_components=-1 is invalid: expected an integer >= 0"),
        (
            {"data_source": "static"},
            r"EvaConfig.data_source='static' is invalid: expected one of \('auto', 'rollouts', 'ppo'\)",
        ),
    ],
)
def test_eva_config_rejects(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EvaConfig(**kwargs)


def test_defaults_and_round_trip() -> None:
    config = LoraConfig(r=8, rank_pattern={"action_net": 0})
    assert config.default_alpha == 8.0
    assert LoraConfig.from_dict(config.to_dict()) == config
    assert EvaConfig().rho == 2.0 and EvaConfig().tau == 0.99 and not EvaConfig().whiten


def test_device_auto_and_errors() -> None:
    import torch

    assert get_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device='tpu9' is invalid"):
        get_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            get_device("cuda")


@pytest.mark.parametrize("cuda", [True, False])
def test_a_runs_auto_device_takes_cuda_only_for_a_policy_of_a_million_parameters(
    cuda: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from eva_rl.devices import CUDA_MIN_PARAMETERS, run_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    small = torch.nn.Linear(100, 100)  # 10,100 parameters
    large = torch.nn.Linear(1000, 1000)  # 1,001,000 parameters
    sizes = [sum(p.numel() for p in module.parameters()) for module in (small, large)]
    assert sizes[0] < CUDA_MIN_PARAMETERS <= sizes[1]
    assert run_device("auto", small).type == "cpu"
    assert run_device("auto", large).type == ("cuda" if cuda else "cpu")
    assert run_device("cpu", large).type == "cpu"
