"""EVA's rank allocator: redistribute a global rank budget across layers by explained-variance ratio."""

from __future__ import annotations

from collections.abc import Mapping

import torch

# Components explaining less than this fraction of a layer's input variance are numerical null space
# (e.g. a 3-feature input tracked with 8 components): their directions are arbitrary and never converge.
NULL_RATIO = 1e-10


def allocate_ranks(ratios: Mapping[str, torch.Tensor], caps: Mapping[str, int], budget: int) -> dict[str, int]:
    """Pool every layer's explained-variance ratios and give one rank per component among the top ``budget``.

    Layer ``L`` contributes its first ``caps[L]`` ratios, so it can get at most ``caps[L]`` rank
    (``round(r * rho)``). Ties go to the layer that comes first in ``ratios``: with layers that share an
    input, the first of them (the one whose PCA is tracked) gets the larger rank, as in peft.

    :param ratios: ``{layer: explained-variance ratios, descending}``.
    :param caps: ``{layer: maximum rank}``.
    :param budget: Total rank to hand out, normally the sum of the configured per-layer ranks.
    :return: ``{layer: rank}``; layers with no selected component get 0. The ranks sum to ``budget`` unless
        fewer non-null components exist.
    """
    owners: list[str] = []
    values: list[torch.Tensor] = []
    for name, ratio in ratios.items():
        ratio = ratio[: caps[name]].detach().to("cpu", torch.float64)
        keep = ratio > NULL_RATIO
        owners.extend([name] * int(keep.sum()))
        values.append(ratio[keep])
    ranks = dict.fromkeys(ratios, 0)
    if not owners:
        return ranks
    order = torch.sort(torch.cat(values), descending=True, stable=True).indices
    for index in order[:budget].tolist():
        ranks[owners[index]] += 1
    return ranks
