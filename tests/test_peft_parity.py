"""Numerical parity with the reference implementation: peft's ``get_eva_state_dict`` for EVA, and peft's PiSSA and
OLoRA initializations."""

from __future__ import annotations

import copy

import pytest
import torch

from eva_rl import compute_eva
from eva_rl.inits import olora_init, pissa_init
from eva_rl.layers import LoraLinear
from tests.models import ActorCriticMLP, decaying_stream

peft = pytest.importorskip("peft")
from peft import EvaConfig as PeftEvaConfig  # noqa: E402
from peft import LoraConfig as PeftLoraConfig  # noqa: E402
from peft import get_peft_model  # noqa: E402
from peft.tuners.lora.eva import get_eva_state_dict  # noqa: E402

TARGETS = ["policy_net.0", "policy_net.2", "value_net.0", "value_net.2", "action_net", "critic"]


def forward(model: torch.nn.Module, batch: torch.Tensor) -> object:
    return model(batch)


class CountingLoader:
    """A list of batches that counts how many are drawn from it (peft takes ``len()`` too)."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches = batches
        self.drawn = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            self.drawn += 1
            yield batch


@pytest.mark.parametrize(
    ("r", "rho", "tau", "whiten"),
    [(4, 2.0, 0.99, False), (2, 1.0, 0.9, False), (3, 2.0, 0.95, True), (4, 2.0, 0.95, True)],
    ids=["redistributed", "uniform", "whitened", "whitened-unequal-shared-ranks"],
)
def test_same_ranks_directions_and_batches_as_peft(r: int, rho: float, tau: float, whiten: bool) -> None:
    model = ActorCriticMLP(features=10, hidden=16)
    batches = decaying_stream(200, 48, 10, seed=3)
    peft_config = PeftLoraConfig(
        r=r, target_modules=TARGETS, init_lora_weights="eva", eva_config=PeftEvaConfig(rho=rho, tau=tau, whiten=whiten)
    )
    loader = CountingLoader(batches)
    reference = get_eva_state_dict(
        model,
        dataloader=loader,
        peft_config=peft_config,
        forward_fn=forward,
        prepare_model_inputs_fn=None,
        prepare_layer_inputs_fn=None,
        show_progress_bar=False,
    )
    # peft seeds its randomized SVD with 42 and never caps the loop; 200 batches leave it room to converge.
    ours = compute_eva(model, batches, target_modules=TARGETS, r=r, rho=rho, tau=tau, whiten=whiten, seed=42)
    assert ours.ranks == {name: reference[name].shape[0] for name in TARGETS}
    # peft draws one batch for its duplicate-input pass, then fits from the first batch again (itertools.cycle)
    # and draws one more before it notices convergence: two draws beyond the batches it fitted.
    assert ours.batches_used == loader.drawn - 2
    shared_groups: dict[str, list[str]] = {}
    for layer, leader in ours.shared_inputs.items():
        shared_groups.setdefault(leader, [leader]).append(layer)
    for name in TARGETS:
        if ours.ranks[name] == 0:
            continue
        ref, got = reference[name].double(), ours.A[name].double()
        cos = torch.nn.functional.cosine_similarity(got, ref, dim=1)
        assert cos.min() >= 1 - 1e-5, (name, cos)  # signed: both fix signs with svd_flip
        if not whiten:
            continue
        group = next((g for g in shared_groups.values() if name in g), [name])
        # peft whitens in place on a view of the shared PCA, so row j of a layer sharing its input is divided by
        # sqrt(sigma_j) once per layer of the group whose rank exceeds j (the digest's section 1.7 quirk). We
        # whiten once; a whitened row's norm is sigma_j ** -0.5, so peft's is ours to that power.
        times = torch.tensor([sum(ours.ranks[layer] > j for layer in group) for j in range(ours.ranks[name])])
        torch.testing.assert_close(ref.norm(dim=1), got.norm(dim=1) ** times, rtol=1e-4, atol=0)
        if name == "policy_net.0" and (r, rho) == (4, 2.0):
            assert times.tolist() == [2, 2, 2, 2, 1], "this case must cover unequal ranks on a shared input"


@pytest.mark.parametrize(("init", "ours"), [("olora", olora_init), ("pissa", pissa_init)])
@pytest.mark.parametrize("alpha", [4, 12])
def test_weight_derived_inits_match_peft_for_any_alpha(init: str, ours, alpha: int) -> None:
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(10, 7))
    reference = get_peft_model(
        copy.deepcopy(base), PeftLoraConfig(r=4, lora_alpha=alpha, target_modules=["0"], init_lora_weights=init)
    )
    peft_layer = reference.base_model.model[0]
    layer = LoraLinear(copy.deepcopy(base[0]), 4, float(alpha))
    ours(layer)
    ref_a, ref_b = peft_layer.lora_A["default"].weight.detach(), peft_layer.lora_B["default"].weight.detach()
    # Factors agree up to the sign of each rank-one component (QR and SVD fix signs by their own conventions).
    signs = torch.sign((layer.lora_A.detach() * ref_a).sum(dim=1))
    torch.testing.assert_close(layer.lora_A.detach() * signs.unsqueeze(1), ref_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.lora_B.detach() * signs, ref_b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.base_layer.weight, peft_layer.base_layer.weight, atol=1e-5, rtol=1e-4)
    x = torch.randn(5, 10)
    torch.testing.assert_close(layer(x), reference(x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer(x), base(x), atol=1e-5, rtol=1e-4)  # unchanged at step 0
