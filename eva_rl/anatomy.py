"""Where a fine-tuned adapter moved each layer, measured on the pretrained agent's activations in the target env.

EVA's argument is about directions: its A rows are the top principal directions of a layer's inputs on the target
task. After fine-tuning, three figures per adapted layer say what training made of that start:

- ``change``: the RMS change of the layer's output relative to its RMS output, ``sqrt(E|dW x|^2 / E|W x|^2)`` over
  the inputs ``x`` (biases left out): how far the adapter moved the layer, whatever its weights' scale;
- ``update_top_share``: the share of ``dW``'s squared Frobenius norm that acts on the inputs' top-``k`` principal
  subspace, ``|dW U_k|^2 / |dW|^2`` (a random ``dW`` scores ``k / fan_in``): where the update aims;
- ``a_top_share``: the same share for the adapter's ``A`` rows (EVA's start scores about 1, a random A ``k / fan_in``);
- ``a_signal``: the RMS output of an ``A`` row on the inputs, relative to a Kaiming-uniform row's expected one,
  ``sqrt((E|A x|^2 / r) / (E|x|^2 / (3 fan_in)))``: how much input B sees, hence how far an Adam step on B (whose
  size the learning rate sets) moves the layer's output (LoRA's start scores about 1).

``dW = scaling * B A`` in the layout of ``weight.reshape(out, -1)`` (a Conv2d's unfolded patches, as EVA sees
them), plus the change of the base weight where a method rewrote it (PiSSA, OLoRA).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from eva_rl.eva import layer_input_rows
from eva_rl.layers import LoraLayer, weight_fan_in


@dataclass
class InputMoments:
    """Running first and second moments of a layer's input rows, in float64."""

    rows: int
    total: torch.Tensor
    outer: torch.Tensor

    @classmethod
    def empty(cls, fan_in: int) -> InputMoments:
        return cls(0, torch.zeros(fan_in, dtype=torch.float64), torch.zeros(fan_in, fan_in, dtype=torch.float64))

    def update(self, rows: torch.Tensor) -> None:
        x = rows.detach().to(torch.float64).cpu()
        self.rows += x.shape[0]
        self.total += x.sum(dim=0)
        self.outer += x.T @ x

    @property
    def second_moment(self) -> torch.Tensor:
        """``E[x x^T]``."""
        return self.outer / self.rows

    def principal_directions(self, k: int) -> torch.Tensor:
        """The top-``k`` eigenvectors of the inputs' covariance, as columns ``(fan_in, k)``."""
        mean = self.total / self.rows
        covariance = self.second_moment - torch.outer(mean, mean)
        _, vectors = torch.linalg.eigh(covariance)
        return vectors[:, -k:].flip(1)


def collect_input_moments(
    policy: nn.Module,
    layers: dict[str, nn.Module],
    batches: Iterable[Any],
    forward_fn: Callable[[nn.Module, Any], Any],
) -> dict[str, InputMoments]:
    """The input moments of each of ``layers`` (by name: plain or adapted layers) over ``forward_fn(policy, batch)``
    for every batch."""
    moments = {name: InputMoments.empty(_fan_in(layer)) for name, layer in layers.items()}

    def make_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(layer: nn.Module, args: tuple[Any, ...]) -> None:
            moments[name].update(layer_input_rows(layer, args[0]))

        return hook

    handles = [layer.register_forward_pre_hook(make_hook(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                forward_fn(policy, batch)
    finally:
        for handle in handles:
            handle.remove()
    return moments


def _fan_in(layer: nn.Module) -> int:
    return layer.fan_in if isinstance(layer, LoraLayer) else weight_fan_in(layer.weight)


def adapter_update(
    tensors: dict[str, torch.Tensor], name: str, scaling: float, base_weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dW, A)`` of layer ``name`` from an adapter checkpoint's tensors, both flattened to ``(rows, fan_in)``.

    :raises ValueError: for a DoRA adapter (its update is not ``scaling * B A``).
    """
    if f"{name}.lora_magnitude" in tensors:
        raise ValueError(f"layer {name!r} is a DoRA adapter: its update is not scaling * B A")
    weight = base_weight.reshape(base_weight.shape[0], -1).to(torch.float64)
    lora_a = tensors[f"{name}.lora_A"].to(torch.float64)
    lora_a = lora_a.reshape(lora_a.shape[0], -1)
    lora_b = tensors[f"{name}.lora_B"].to(torch.float64)
    lora_b = lora_b.reshape(lora_b.shape[0], -1)
    delta = scaling * lora_b @ lora_a
    rewritten = tensors.get(f"{name}.base_layer.weight")
    if rewritten is not None:
        delta = delta + rewritten.reshape(weight.shape).to(torch.float64) - weight
    return delta, lora_a


def layer_anatomy(
    base_weight: torch.Tensor, delta: torch.Tensor, lora_a: torch.Tensor, moments: InputMoments, k: int
) -> dict[str, float]:
    """``change``, ``update_top_share``, ``a_top_share`` and ``a_signal`` of one layer (module docstring), ``k``
    capped at the layer's fan-in."""
    weight = base_weight.reshape(base_weight.shape[0], -1).to(torch.float64)
    second = moments.second_moment
    top = moments.principal_directions(min(k, weight.shape[1]))
    output = torch.trace(weight @ second @ weight.T)
    moved = torch.trace(delta @ second @ delta.T)
    delta_norm = delta.square().sum()
    return {
        "change": float(torch.sqrt(moved / output)) if output > 0 else float("nan"),
        "update_top_share": float((delta @ top).square().sum() / delta_norm) if delta_norm > 0 else float("nan"),
        "a_top_share": float((lora_a @ top).square().sum() / lora_a.square().sum()),
        "a_signal": row_signal(lora_a, second),
    }


def row_signal(rows: torch.Tensor, second: torch.Tensor) -> float:
    """``a_signal`` (module docstring) of ``rows`` ``(r, fan_in)`` on inputs of second moment ``second``: their RMS
    output relative to a Kaiming-uniform row's expected one."""
    kaiming_row = torch.trace(second) / (3 * rows.shape[1])  # E[(a.x)^2] of a row with entries of variance 1/(3n)
    row = torch.trace(rows @ second @ rows.T) / rows.shape[0]
    return float(torch.sqrt(row / kaiming_row)) if kaiming_row > 0 else float("nan")
