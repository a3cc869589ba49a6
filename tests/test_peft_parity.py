"""Numerical parity with the reference implementation, peft's ``get_eva_state_dict``."""

from __future__ import annotations

import pytest
import torch

from eva_rl import compute_eva
from tests.models import ActorCriticMLP, decaying_stream

peft = pytest.importorskip("peft")
from peft import EvaConfig as PeftEvaConfig  # noqa: E402
from peft import LoraConfig as PeftLoraConfig  # noqa: E402
from peft.tuners.lora.eva import get_eva_state_dict  # noqa: E402

TARGETS = ["policy_net.0", "policy_net.2", "value_net.0", "value_net.2", "action_net", "critic"]


def forward(model: torch.nn.Module, batch: torch.Tensor) -> object:
    return model(batch)


@pytest.mark.parametrize(
    ("r", "rho", "tau", "whiten"), [(4, 2.0, 0.99, False), (2, 1.0, 0.9, False), (3, 2.0, 0.95, True)]
)
def test_same_ranks_and_directions_as_peft(r: int, rho: float, tau: float, whiten: bool) -> None:
    model = ActorCriticMLP(features=10, hidden=16)
    batches = decaying_stream(200, 48, 10, seed=3)
    peft_config = PeftLoraConfig(
        r=r, target_modules=TARGETS, init_lora_weights="eva", eva_config=PeftEvaConfig(rho=rho, tau=tau, whiten=whiten)
    )
    reference = get_eva_state_dict(
        model,
        dataloader=batches,
        peft_config=peft_config,
        forward_fn=forward,
        prepare_model_inputs_fn=None,
        prepare_layer_inputs_fn=None,
        show_progress_bar=False,
    )
    # peft seeds its randomized SVD with 42 and never caps the loop; 200 batches leave it room to converge.
    ours = compute_eva(model, batches, target_modules=TARGETS, r=r, rho=rho, tau=tau, whiten=whiten, seed=42)
    assert ours.ranks == {name: reference[name].shape[0] for name in TARGETS}
    for name in TARGETS:
        if ours.ranks[name] == 0:
            continue
        ref = reference[name].double()
        got = ours.A[name].double()
        cos = torch.nn.functional.cosine_similarity(got, ref, dim=1).abs()
        assert cos.min() >= 0.99, (name, cos)
        shared = name in ours.shared_inputs or name in ours.shared_inputs.values()
        if whiten and shared:
            # peft whitens in place on a view of the shared PCA, so layers sharing an input are divided by
            # sqrt(sigma) twice (the digest's section 1.7 quirk). We whiten once.
            torch.testing.assert_close(ref.norm(dim=1), got.norm(dim=1).square(), rtol=1e-2, atol=0)
        elif whiten:
            torch.testing.assert_close(got.norm(dim=1), ref.norm(dim=1), rtol=1e-2, atol=0)
