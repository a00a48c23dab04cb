"""Gaussian kernel density estimate in log space, vectorised and chunked.

The estimator is the one of `scipy.stats.gaussian_kde` with Scott's bandwidth:
kernel covariance = data covariance (ddof=1) x n^(-2/(d+4)). anomalib evaluates
the density in float32 one query at a time; far from the training points it
underflows to 0 and every clear defect ties. Here each query's log-density is a
logsumexp over all training points, computed for a whole batch at once on the
model's device, in chunks of training points so memory stays bounded.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# Elements of one (queries x training points) block of squared distances: 16M floats = 64 MB.
_BLOCK_ELEMENTS = 1 << 24
# A covariance whose smallest eigenvalue is below this share of its largest is treated as
# singular: the KDE would be a needle along the flat direction and its scores meaningless.
_MIN_EIGENVALUE_RATIO = 1e-10
_EXP_FLOOR = -80.0


class GaussianKDE(nn.Module):
    """Gaussian KDE with a full-covariance Scott bandwidth; `forward` gives log-densities."""

    def __init__(self) -> None:
        super().__init__()
        # Training points after whitening by the kernel covariance, and -1/2 their squared norms.
        self.register_buffer("whitened", torch.empty(0))
        self.register_buffer("neg_half_sq_norm", torch.empty(0))
        # Lower-triangular W with W W^T = inverse kernel covariance; x -> x W whitens.
        self.register_buffer("bw_transform", torch.empty(0))
        # log of (2 pi)^(-d/2) det(W) / n: the constant of every log-density.
        self.register_buffer("log_norm", torch.empty(0))

    @property
    def fitted(self) -> bool:
        return self.whitened.numel() > 0

    @staticmethod
    def scott_factor(n: int, d: int) -> float:
        return n ** (-1.0 / (d + 4))

    def fit(self, dataset: Tensor) -> "GaussianKDE":
        """Fit on `dataset` (N x d). Raises ValueError when the covariance is singular."""
        n, d = dataset.shape
        if n < d + 2:
            raise ValueError(f"a {d}-dimensional KDE needs at least {d + 2} points, got {n}")
        x = dataset.to(torch.float64)
        factor = self.scott_factor(n, d)
        kernel_cov = torch.cov(x.T) * factor**2
        if not torch.isfinite(kernel_cov).all():
            raise ValueError("the points hold NaN or infinite values")
        eigenvalues = torch.linalg.eigvalsh(kernel_cov)
        if not eigenvalues[0] > _MIN_EIGENVALUE_RATIO * eigenvalues[-1]:
            raise ValueError(
                "the embeddings' covariance is singular (the images are too alike or "
                "too few); use more varied images or fewer components"
            )
        try:
            # chol(kernel_cov) = L, inverse = L^-T L^-1, so W = L^-T satisfies W W^T = inverse.
            chol = torch.linalg.cholesky(kernel_cov)
        except torch.linalg.LinAlgError as exc:
            raise ValueError(
                "the embeddings' covariance is singular (the images are too alike or "
                "too few); use more varied images or fewer components"
            ) from exc
        eye = torch.eye(d, dtype=torch.float64, device=x.device)
        w = torch.linalg.solve_triangular(chol, eye, upper=False).T
        log_det_w = -torch.log(torch.diagonal(chol)).sum()
        log_norm = log_det_w - 0.5 * d * math.log(2 * math.pi) - math.log(n)
        whitened = x @ w
        dtype = dataset.dtype
        self.bw_transform = w.to(dtype)
        self.whitened = whitened.to(dtype)
        self.neg_half_sq_norm = (-0.5 * (whitened * whitened).sum(dim=1)).to(dtype)
        self.log_norm = log_norm.to(dtype)
        return self

    def log_density(self, features: Tensor) -> Tensor:
        """Log-density at each row of `features` (B x d), one vectorised pass per chunk.

        With whitened query q and points p_j: -|q - p_j|^2 / 2 = q.p_j - |p_j|^2 / 2 - |q|^2 / 2.
        The last term is the same for every j, so it leaves the logsumexp, and the rest is
        one matrix product with a bias (addmm): no B x N temporaries beyond the logits.
        """
        if not self.fitted:
            raise RuntimeError("KDE is not fitted")
        queries = features.to(self.whitened.dtype) @ self.bw_transform
        neg_half_q_sq = -0.5 * (queries * queries).sum(dim=1)
        n = self.whitened.shape[0]
        chunk = max(1, _BLOCK_ELEMENTS // max(1, queries.shape[0]))
        partial = []
        for start in range(0, n, chunk):
            logits = torch.addmm(
                self.neg_half_sq_norm[start : start + chunk], queries, self.whitened[start : start + chunk].T
            )
            partial.append(_logsumexp_rows(logits))
        log_sum = partial[0] if len(partial) == 1 else _logsumexp_rows(torch.stack(partial, 1))
        return log_sum + neg_half_q_sq + self.log_norm

    def forward(self, features: Tensor) -> Tensor:
        return self.log_density(features)


def _logsumexp_rows(logits: Tensor) -> Tensor:
    """logsumexp over dim 1, without subnormal floats.

    Terms more than 80 below a row's maximum are raised to exp(-80) before summing:
    that changes the sum by at most N * 2e-35 of its value, and keeps exp() out of
    subnormal numbers, which make torch.logsumexp many times slower on CPUs.
    """
    peak = logits.amax(dim=1, keepdim=True)
    total = (logits - peak).clamp_min_(_EXP_FLOOR).exp_().sum(dim=1)
    return peak.squeeze(1) + torch.log(total)
