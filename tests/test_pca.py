"""PCA against numpy's SVD, the independent reference."""

import numpy as np
import pytest
import torch

from inspector_dfkde.pca import PCA


def test_matches_numpy_svd_up_to_sign():
    rng = np.random.default_rng(1)
    data = rng.normal(size=(400, 40)) @ rng.normal(size=(40, 40)) + 3.0
    centred = data - data.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)

    pca = PCA(8).fit(torch.tensor(data))
    ours = pca.components.numpy()  # D x k
    reference = vt[:8].T
    signs = np.sign(np.sum(ours * reference, axis=0))
    np.testing.assert_allclose(ours, reference * signs, atol=1e-8)
    np.testing.assert_allclose(pca.explained_variance.numpy(), singular[:8] ** 2 / 399, rtol=1e-8)
    np.testing.assert_allclose(pca.transform(torch.tensor(data)).numpy(), (centred @ reference) * signs, atol=1e-7)


def test_float32_input_is_fitted_accurately():
    rng = np.random.default_rng(2)
    data = rng.normal(size=(1000, 64)).astype(np.float32) * np.linspace(5, 0.1, 64, dtype=np.float32)
    reference = PCA(16).fit(torch.tensor(data, dtype=torch.float64)).components.numpy()
    got = PCA(16).fit(torch.tensor(data)).components
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), reference, atol=1e-5)


def test_never_builds_an_n_by_n_matrix(monkeypatch):
    """40,000 points of 512 features: the work is on a 512 x 512 covariance."""
    seen = []
    original = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: seen.append(tuple(m.shape)) or original(m))
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: pytest.fail("full SVD used"))
    PCA(16).fit(torch.randn(40000, 512))
    assert seen == [(512, 512)]


def test_too_many_components_is_an_error():
    with pytest.raises(ValueError, match="PCA to 16 components"):
        PCA(16).fit(torch.randn(10, 32))
