"""The rank allocator against a brute-force oracle and its documented properties."""

from __future__ import annotations

import random

import pytest
import torch

from eva_rl.allocation import allocate_ranks


def brute_force(ratios: dict[str, list[float]], caps: dict[str, int], budget: int) -> dict[str, int]:
    pool = [(-v, i, name) for i, (name, values) in enumerate(ratios.items()) for v in values[: caps[name]] if v > 1e-10]
    pool.sort()
    ranks = dict.fromkeys(ratios, 0)
    for _, _, name in pool[:budget]:
        ranks[name] += 1
    return ranks


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force_and_conserves_budget(seed: int) -> None:
    rng = random.Random(seed)
    names = [f"layer{i}" for i in range(rng.randint(2, 6))]
    r, rho = 4, 2.0
    ratios = {n: sorted((rng.random() ** 3 for _ in range(8)), reverse=True) for n in names}
    caps = {n: round(r * rho) for n in names}
    ranks = allocate_ranks({n: torch.tensor(v) for n, v in ratios.items()}, caps, r * len(names))
    assert ranks == brute_force(ratios, caps, r * len(names))
    assert sum(ranks.values()) == r * len(names)
    assert all(ranks[n] <= caps[n] for n in names)


def test_rho_one_gives_uniform_ranks() -> None:
    ratios = {
        "a": torch.tensor([0.9, 0.05, 0.01]),
        "b": torch.tensor([0.2, 0.1, 0.1]),
        "c": torch.tensor([0.5, 0.4, 0.05]),
    }
    assert allocate_ranks(ratios, dict.fromkeys(ratios, 2), budget=6) == {"a": 2, "b": 2, "c": 2}


def test_rank_moves_to_the_layer_with_more_explained_variance() -> None:
    ratios = {"flat": torch.tensor([0.1, 0.1, 0.1, 0.1]), "peaked": torch.tensor([0.6, 0.3, 0.05, 0.02])}
    assert allocate_ranks(ratios, {"flat": 4, "peaked": 4}, budget=4) == {"flat": 2, "peaked": 2}
    ratios = {"flat": torch.tensor([0.04, 0.04, 0.04, 0.04]), "peaked": torch.tensor([0.6, 0.3, 0.05, 0.045])}
    assert allocate_ranks(ratios, {"flat": 4, "peaked": 4}, budget=4) == {"flat": 0, "peaked": 4}


def test_ties_go_to_the_first_layer() -> None:
    same = torch.tensor([0.5, 0.3, 0.2])
    assert allocate_ranks({"first": same, "second": same.clone()}, {"first": 3, "second": 3}, budget=3) == {
        "first": 2,
        "second": 1,
    }


def test_null_components_get_no_rank() -> None:
    ratios = {"constant": torch.zeros(4), "live": torch.tensor([0.5, 0.3, 0.1, 0.05])}
    ranks = allocate_ranks(ratios, {"constant": 4, "live": 4}, budget=4)
    assert ranks == {"constant": 0, "live": 4}
    # Fewer live components than budget: the rest stays unallocated rather than going to null directions.
    assert allocate_ranks(ratios, {"constant": 4, "live": 4}, budget=6) == {"constant": 0, "live": 4}
