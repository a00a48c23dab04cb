"""Principal component analysis without an N x N matrix.

anomalib's PCA takes a full SVD of the N x D embedding matrix, which at 40,000
points needs gigabytes. The principal axes are the eigenvectors of the D x D
covariance, so we form that (in float64, for accuracy) and decompose it instead:
memory is O(D^2), whatever N is.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PCA(nn.Module):
    """Centred PCA to `n_components` axes, fitted in float64, applied in the input dtype."""

    def __init__(self, n_components: int) -> None:
        super().__init__()
        self.n_components = n_components
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("components", torch.empty(0))  # D x n_components, columns are axes
        self.register_buffer("explained_variance", torch.empty(0))

    @property
    def fitted(self) -> bool:
        return self.components.numel() > 0

    def fit(self, dataset: Tensor) -> "PCA":
        """Find the axes of `dataset` (N x D); the caller's tensor is not modified."""
        n, d = dataset.shape
        if self.n_components > min(n, d):
            raise ValueError(
                f"PCA to {self.n_components} components needs at least {self.n_components} "
                f"samples of at least {self.n_components} features, got {n} x {d}"
            )
        x = dataset.to(torch.float64)
        mean = x.mean(dim=0)
        centred = x - mean
        cov = centred.T @ centred / max(n - 1, 1)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
        order = torch.argsort(eigenvalues, descending=True)[: self.n_components]
        axes = eigenvectors[:, order]
        # Deterministic signs (as sklearn's svd_flip): the largest loading of each axis is positive.
        pivot = axes.abs().argmax(dim=0)
        signs = torch.sign(axes[pivot, torch.arange(axes.shape[1], device=axes.device)])
        signs[signs == 0] = 1
        self.mean = mean.to(dataset.dtype)
        self.components = (axes * signs).to(dataset.dtype)
        self.explained_variance = eigenvalues[order].clamp_min(0).to(dataset.dtype)
        return self

    def transform(self, features: Tensor) -> Tensor:
        """Project `features` (N x D) onto the fitted axes: N x n_components."""
        if not self.fitted:
            raise RuntimeError("PCA is not fitted")
        return (features - self.mean) @ self.components

    def fit_transform(self, dataset: Tensor) -> Tensor:
        return self.fit(dataset).transform(dataset)

    def forward(self, features: Tensor) -> Tensor:
        return self.transform(features)
