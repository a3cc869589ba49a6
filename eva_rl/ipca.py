"""Streaming, mean-centred PCA (incremental SVD) in torch.

The same algorithm as scikit-learn's ``IncrementalPCA`` and peft's torch port of it (Ross et al. 2008, with a
mean-correction row): each ``partial_fit`` takes an SVD of the previous components scaled by their singular
values, the new batch centred on its own mean, and one row correcting for the shift of the mean.

Differences from peft, on purpose: the running mean and variance are float64 and the SVD runs in the batch's own
precision (peft mixes float32 and float64 by accident of type promotion; a float32 SVD is what keeps EVA at a third
to a half of peft's time, ``eva-rl bench --peft-only``), and a batch with fewer rows than components is an error
rather than a silent skip.
"""

from __future__ import annotations

from typing import Literal

import torch

# An input whose total variance is below this fraction of its squared magnitude is treated as constant: its
# "components" are rounding noise, and it explains nothing.
_ZERO_VARIANCE_RTOL = 1e-12


def svd_flip(u: torch.Tensor, vt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Make the SVD deterministic: flip each row of ``vt`` so its largest-magnitude entry is positive."""
    pivots = vt.abs().argmax(dim=1)
    signs = torch.sign(vt[torch.arange(vt.shape[0], device=vt.device), pivots])
    signs[signs == 0] = 1
    return u * signs[: u.shape[1]], vt * signs.unsqueeze(1)


def randomized_svd(
    x: torch.Tensor, q: int, niter: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, S, Vh`` of rank ``q`` by Halko et al.'s randomized range finder with ``niter`` power iterations
    (Algorithms 4.4 and 5.1, as ``torch.svd_lowrank`` computes them).

    The Gaussian test matrix is drawn on the CPU from ``generator``, so no global RNG is read or reseeded (on CUDA
    neither), and a CPU run equals ``torch.svd_lowrank`` under ``torch.manual_seed`` of the same seed.
    """
    transposed = x.shape[0] < x.shape[1]  # the range finder works on the tall orientation
    a = x.mT if transposed else x
    test = torch.randn(a.shape[1], q, generator=generator, dtype=a.dtype).to(a.device)
    basis = torch.linalg.qr(a @ test).Q
    for _ in range(niter):
        basis = torch.linalg.qr(a.mT @ basis).Q
        basis = torch.linalg.qr(a @ basis).Q
    u, s, vh = torch.linalg.svd(basis.mT @ a, full_matrices=False)
    u = basis @ u
    if transposed:
        return vh.mT, s, u.mT
    return u, s, vh


class IncrementalPCA:
    """Incremental PCA over a stream of ``(n_rows, n_features)`` batches.

    :param n_components: Number of components to track; at most ``n_features`` and at most the rows of a batch.
    :param svd_solver: ``"lowrank"``: randomized ``torch.svd_lowrank`` with ``q = 2 * n_components`` and 4 power
        iterations (peft's choice); ``"full"``: exact ``torch.linalg.svd``.
    :param seed: Seed of the randomized solver, drawn from a private generator: no global RNG is read or reseeded.
    """

    def __init__(self, n_components: int, svd_solver: Literal["lowrank", "full"] = "lowrank", seed: int = 0):
        if n_components < 1:
            raise ValueError(f"n_components={n_components} is invalid: expected an integer >= 1")
        self.n_components = n_components
        self.svd_solver = svd_solver
        self.seed = seed
        self.n_samples_seen = 0
        self.mean_: torch.Tensor | None = None
        self.var_: torch.Tensor | None = None
        self.components_: torch.Tensor | None = None
        self.singular_values_: torch.Tensor | None = None
        self.explained_variance_ratio_: torch.Tensor | None = None

    @property
    def is_fitted(self) -> bool:
        return self.components_ is not None

    @property
    def zero_variance(self) -> bool:
        """True when every feature seen so far was constant (the input carries no information)."""
        if self.var_ is None or self.mean_ is None:
            return False
        scale = 1.0 + float(self.mean_.square().sum())
        return float(self.var_.sum()) <= _ZERO_VARIANCE_RTOL * scale

    def _svd(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.svd_solver == "full":
            return torch.linalg.svd(x, full_matrices=False)
        q = min(2 * self.n_components, *x.shape)
        return randomized_svd(x, q, niter=4, generator=torch.Generator().manual_seed(self.seed))

    @torch.no_grad()
    def partial_fit(self, batch: torch.Tensor) -> IncrementalPCA:
        """Update the running mean, variance and components with one batch of rows."""
        if batch.ndim != 2:
            raise ValueError(f"expected a 2-D batch (rows, features), got shape {tuple(batch.shape)}")
        n_rows, n_features = batch.shape
        if self.n_components > n_features:
            raise ValueError(f"n_components={self.n_components} exceeds n_features={n_features}")
        if n_rows < self.n_components:
            raise ValueError(f"batch has {n_rows} rows, fewer than n_components={self.n_components}")
        if self.mean_ is not None and n_features != self.mean_.shape[0]:
            raise ValueError(f"batch has {n_features} features, earlier batches had {self.mean_.shape[0]}")

        x = batch.to(torch.float64)
        batch_mean = x.mean(dim=0)
        centred = x - batch_mean
        batch_m2 = centred.square().sum(dim=0)
        if self.components_ is None:
            mean, m2, stacked = batch_mean, batch_m2, centred
        else:
            n_old = self.n_samples_seen
            n_total = n_old + n_rows
            shift = self.mean_ - batch_mean
            mean = self.mean_ + shift * (-n_rows / n_total)
            m2 = self.var_ * n_old + batch_m2 + shift.square() * (n_old * n_rows / n_total)
            correction = (n_old * n_rows / n_total) ** 0.5 * shift
            stacked = torch.cat(
                [self.singular_values_.unsqueeze(1) * self.components_, centred, correction.unsqueeze(0)]
            )

        # The SVD runs in the batch's own precision (float32 for a policy's activations): the components need it
        # only to the cosine of tau, and it is the part of EVA whose cost grows with the width. The running mean
        # and variance, which sum over the whole stream, stay float64.
        u, s, vt = self._svd(stacked.to(batch.dtype) if batch.dtype == torch.float32 else stacked)
        _, vt = svd_flip(u, vt)
        s, vt = s.to(torch.float64), vt.to(torch.float64)
        self.n_samples_seen += n_rows
        self.mean_ = mean
        self.var_ = m2 / self.n_samples_seen
        k = self.n_components
        self.components_ = vt[:k]
        self.singular_values_ = s[:k]
        total = m2.sum()
        if self.zero_variance:
            self.explained_variance_ratio_ = torch.zeros_like(s[:k])
        else:
            self.explained_variance_ratio_ = s[:k].square() / total
        return self
