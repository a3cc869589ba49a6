"""Adapter initializations besides Kaiming-uniform and EVA: PiSSA and OLoRA from the weight, and the controls that
take EVA's geometry or its scale apart (random orthonormal rows, rows at Kaiming's norm, rows carrying Kaiming's
signal).

Both take A and B from the pretrained weight itself and keep the residual ``W - s B A`` as the frozen base, so the
layer's output is unchanged at step 0 and the adapter starts on the weight's principal (PiSSA) or orthonormal
(OLoRA) directions. A Conv2d kernel is treated as the ``(out, C*kh*kw)`` matrix our Conv2d adapter factorizes.
"""

from __future__ import annotations

import torch

from eva_rl.layers import LoraLayer


def max_weight_rank(layer: LoraLayer) -> int:
    """The largest rank a factorization of the layer's weight has: ``min(out, fan_in)``."""
    return min(layer.base_layer.weight.shape[0], layer.fan_in)


def _check_rank(layer: LoraLayer, method: str) -> None:
    if layer.r > max_weight_rank(layer):
        raise ValueError(
            f"{method} needs rank <= min(out, fan_in) = {max_weight_rank(layer)} for a layer of weight shape "
            f"{tuple(layer.base_layer.weight.shape)}, got r={layer.r}"
        )


@torch.no_grad()
def _set_factors(layer: LoraLayer, a: torch.Tensor, b: torch.Tensor) -> None:
    weight = layer.base_layer.weight
    layer.lora_A.copy_(a.reshape(layer.lora_A.shape).to(weight.dtype))
    layer.lora_B.copy_(b.reshape(layer.lora_B.shape).to(weight.dtype))
    residual = weight.reshape(weight.shape[0], -1).double() - layer.scaling * (b @ a)
    weight.copy_(residual.reshape(weight.shape).to(weight.dtype))


@torch.no_grad()
def pissa_init(layer: LoraLayer) -> None:
    """PiSSA: ``B A`` is the top-``r`` SVD part of ``W`` (split as ``U sqrt(S/s)`` and ``sqrt(S/s) V^T``)."""
    _check_rank(layer, "PiSSA")
    weight = layer.base_layer.weight
    u, s, vt = torch.linalg.svd(weight.reshape(weight.shape[0], -1).double(), full_matrices=False)
    root = (s[: layer.r] / layer.scaling).sqrt()
    _set_factors(layer, root.unsqueeze(1) * vt[: layer.r], u[:, : layer.r] * root)


@torch.no_grad()
def olora_init(layer: LoraLayer) -> None:
    """OLoRA: ``B`` is the first ``r`` columns of ``Q`` and ``A`` the first ``r`` rows of ``R`` in ``W = Q R``, as
    peft sets them: not divided by the scaling, which only enters the residual ``W - s B A``."""
    _check_rank(layer, "OLoRA")
    weight = layer.base_layer.weight
    q, r = torch.linalg.qr(weight.reshape(weight.shape[0], -1).double())
    _set_factors(layer, r[: layer.r], q[:, : layer.r])


KAIMING_ROW_NORM = 3**-0.5
"""The expected norm of a Kaiming-uniform A row (``kaiming_uniform_(a=sqrt(5))``: entries uniform in
``±1/sqrt(fan_in)``, so each row's squared norm is ``fan_in / (3 fan_in)``), whatever the fan-in."""


@torch.no_grad()
def orthonormal_init(layer: LoraLayer) -> None:
    """A: ``r`` random orthonormal rows (the Q of a Gaussian matrix's QR, drawn from torch's global generator as
    Kaiming-uniform is), unit norm like EVA's directions; B = 0. A control: EVA's geometry without its data."""
    gaussian = torch.randn(layer.fan_in, layer.r, dtype=torch.float64)
    q, _ = torch.linalg.qr(gaussian)
    layer.set_lora_A(q.T.to(layer.lora_A.dtype))


@torch.no_grad()
def kaiming_row_norm(layer: LoraLayer) -> None:
    """Scale every row of A to Kaiming-uniform's expected row norm (:data:`KAIMING_ROW_NORM`), its direction kept.
    A control: EVA's subspace with LoRA's step size (EVA's rows have unit norm, about 1.7x Kaiming's)."""
    _set_row_norms(layer, torch.full((layer.r,), KAIMING_ROW_NORM))


@torch.no_grad()
def kaiming_signal(layer: LoraLayer, explained_variance_ratio: torch.Tensor) -> None:
    """Scale every row of A, EVA's principal directions in order, so that its output on the inputs EVA read varies
    as much as a Kaiming-uniform row's does on average: row ``i`` gets norm ``1 / sqrt(3 fan_in ratio_i)``, with
    ``ratio_i`` its component's share of the inputs' total variance ``tr(C)``, since a unit direction's output
    variance is ``ratio_i tr(C)`` and a Kaiming-uniform row's (entries of variance ``1 / (3 fan_in)``) is
    ``tr(C) / (3 fan_in)``. A control: EVA's subspace with the signal LoRA's B sees, so that an Adam step on B moves
    the layer's output as far as it does with Kaiming-uniform A; a row norm alone (:func:`kaiming_row_norm`) leaves
    EVA's rows on the inputs' largest directions, where a step moves the output most."""
    ratios = explained_variance_ratio[: layer.r].to(torch.float64).clamp_min(1e-12)
    _set_row_norms(layer, (3 * layer.fan_in * ratios).rsqrt())


def _set_row_norms(layer: LoraLayer, norms: torch.Tensor) -> None:
    """Scale row ``i`` of A to norm ``norms[i]``, its direction kept (in place, under the caller's ``no_grad``)."""
    rows = layer.lora_A.reshape(layer.r, -1)
    rows.mul_(norms.to(rows.dtype).unsqueeze(1) / rows.norm(dim=1, keepdim=True).clamp_min(1e-12))
