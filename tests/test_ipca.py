"""IncrementalPCA against an exact SVD of the stacked data (the independent oracle)."""

from __future__ import annotations

import pytest
import torch

from eva_rl.ipca import IncrementalPCA, svd_flip


def separated_stream(n_batches: int = 12, rows: int = 80, features: int = 24, seed: int = 0) -> list[torch.Tensor]:
    """Batches with a clear eigengap: scales 8, 6, 4.5, 3.4, 2.5, then a flat 0.05 noise floor."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(features, features, generator=generator))
    scales = torch.tensor([8.0, 6.0, 4.5, 3.4, 2.5] + [0.05] * (features - 5))
    offset = torch.randn(features, generator=generator)
    return [(torch.randn(rows, features, generator=generator) * scales) @ basis.T + offset for _ in range(n_batches)]


def oracle(batches: list[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k right singular vectors and explained-variance ratios of the centred, stacked data."""
    data = torch.cat(batches).double()
    centred = data - data.mean(0)
    _, s, vt = torch.linalg.svd(centred, full_matrices=False)
    return vt[:k], s[:k].square() / centred.square().sum()


@pytest.mark.parametrize("solver", ["lowrank", "full"])
def test_components_and_ratios_match_exact_svd(solver: str) -> None:
    batches = separated_stream()
    pca = IncrementalPCA(5, svd_solver=solver, seed=0)
    for batch in batches:
        pca.partial_fit(batch)
    components, ratios = oracle(batches, 5)
    cos = (pca.components_ * components).sum(1).abs()
    assert cos.min() >= 0.999, cos
    assert abs(float(pca.explained_variance_ratio_.sum() - ratios.sum())) < 1e-3
    torch.testing.assert_close(pca.explained_variance_ratio_, ratios, atol=1e-3, rtol=0)
    data = torch.cat(batches).double()
    torch.testing.assert_close(pca.mean_, data.mean(0))
    torch.testing.assert_close(pca.var_, data.var(0, unbiased=False))


def test_sign_convention_makes_largest_entry_positive() -> None:
    pca = IncrementalPCA(3, svd_solver="full")
    for batch in separated_stream(n_batches=3):
        pca.partial_fit(-batch)
    rows = pca.components_
    pivots = rows.abs().argmax(1)
    assert (rows[torch.arange(3), pivots] > 0).all()


def test_svd_flip_flips_rows_and_columns_together() -> None:
    u = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    vt = torch.tensor([[-0.8, 0.6], [0.6, 0.8]])
    new_u, new_vt = svd_flip(u, vt)
    assert torch.equal(new_vt[0], torch.tensor([0.8, -0.6]))
    assert torch.equal(new_u[:, 0], -u[:, 0])
    assert torch.equal(new_vt[1], vt[1])


def test_constant_input_has_zero_ratio() -> None:
    pca = IncrementalPCA(2)
    for _ in range(3):
        pca.partial_fit(torch.full((10, 4), 3.25))
    assert pca.zero_variance
    assert torch.equal(pca.explained_variance_ratio_, torch.zeros(2, dtype=torch.float64))


def test_rejects_batches_smaller_than_components_and_too_many_components() -> None:
    pca = IncrementalPCA(6)
    with pytest.raises(ValueError, match="fewer than n_components=6"):
        pca.partial_fit(torch.randn(5, 10))
    with pytest.raises(ValueError, match="exceeds n_features=4"):
        IncrementalPCA(6).partial_fit(torch.randn(20, 4))


def test_lowrank_is_reproducible_and_leaves_global_rng_alone() -> None:
    batches = separated_stream(n_batches=3)
    state = torch.get_rng_state()
    fits = []
    for _ in range(2):
        pca = IncrementalPCA(4, svd_solver="lowrank", seed=3)
        for batch in batches:
            pca.partial_fit(batch)
        fits.append(pca.components_)
    assert torch.equal(fits[0], fits[1])
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("shape", [(40, 12), (12, 40)])
def test_randomized_svd_is_torchs_svd_lowrank_without_touching_the_global_rng(shape: tuple[int, int]) -> None:
    from eva_rl.ipca import randomized_svd

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    state = torch.get_rng_state()
    u, s, vh = randomized_svd(x, 6, niter=4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(state, torch.get_rng_state())
    torch.manual_seed(7)
    ref_u, ref_s, ref_v = torch.svd_lowrank(x, q=6, niter=4)  # the oracle, on the global RNG seeded alike
    torch.testing.assert_close((u, s, vh), (ref_u, ref_s, ref_v.mT), atol=1e-6, rtol=0)
    exact = torch.linalg.svdvals(x)[:6]
    torch.testing.assert_close(s[:3], exact[:3], rtol=1e-2, atol=0)  # a random matrix: no gap to exploit
