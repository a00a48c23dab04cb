"""GaussianKDE against scipy.stats.gaussian_kde, the independent reference."""

import numpy as np
import pytest
import scipy.stats
import torch

from inspector_dfkde.kde import GaussianKDE


def _data(n=3000, d=16, seed=0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d))
    return rng.normal(size=(n, d)) @ mixing * 0.1, rng


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_density_matches_scipy_near_and_far(dtype):
    points, rng = _data()
    near = points[:40] + rng.normal(size=(40, 16)) * 0.05
    mid = rng.normal(size=(20, 16)) * 2.0
    far = rng.normal(size=(10, 16)) * 60.0  # far enough that a float32 density is 0
    queries = np.concatenate([near, mid, far])
    reference = scipy.stats.gaussian_kde(points.T).logpdf(queries.T)

    kde = GaussianKDE().fit(torch.tensor(points, dtype=dtype))
    got = kde.log_density(torch.tensor(queries, dtype=dtype)).double().numpy()

    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-4)
    # The density of the far points underflows in float32, yet the log-densities stay finite and ranked.
    assert np.all(np.exp(reference[-10:].astype(np.float32)) == 0)
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(np.argsort(got[-10:]), np.argsort(reference[-10:]))


def test_chunking_gives_the_same_answer(monkeypatch):
    points, rng = _data(n=2000, d=4)
    queries = torch.tensor(rng.normal(size=(37, 4)) * 0.3)
    kde = GaussianKDE().fit(torch.tensor(points))
    whole = kde.log_density(queries)
    monkeypatch.setattr("inspector_dfkde.kde._BLOCK_ELEMENTS", 37 * 128)  # 16 chunks of 128 points
    np.testing.assert_allclose(kde.log_density(queries).numpy(), whole.numpy(), rtol=1e-12)


def test_scott_factor_and_kernel_covariance_match_scipy():
    points, _ = _data(n=500, d=5)
    reference = scipy.stats.gaussian_kde(points.T)
    kde = GaussianKDE().fit(torch.tensor(points))
    assert GaussianKDE.scott_factor(500, 5) == pytest.approx(reference.factor)
    w = kde.bw_transform.numpy()
    np.testing.assert_allclose(np.linalg.inv(w @ w.T), reference.covariance, rtol=1e-10)


def test_does_not_modify_the_callers_tensors():
    points, rng = _data(n=200, d=3)
    data = torch.tensor(points)
    queries = torch.tensor(rng.normal(size=(5, 3)))
    before_data, before_queries = data.clone(), queries.clone()
    kde = GaussianKDE().fit(data)
    kde.log_density(queries)
    assert torch.equal(data, before_data) and torch.equal(queries, before_queries)


def test_too_few_points_and_singular_covariance_are_clear_errors():
    with pytest.raises(ValueError, match="needs at least 18 points, got 10"):
        GaussianKDE().fit(torch.randn(10, 16))
    flat = torch.randn(50, 3)
    flat[:, 2] = flat[:, 0] + flat[:, 1]  # rank 2 in 3 dimensions
    with pytest.raises(ValueError, match="singular"):
        GaussianKDE().fit(flat.double())
