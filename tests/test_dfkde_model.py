"""DfkdeModel: the seed's math checked against independent references (numpy, scipy)."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from inspector.errors import FitError
from inspector_dfkde.model import DfkdeModel


@pytest.fixture(scope="module")
def random_resnet():
    return DfkdeModel("resnet18", weights="none", layers=("layer4",))


def _embeddings(n=600, d=64, seed=0):
    rng = np.random.default_rng(seed)
    return torch.tensor(rng.normal(size=(n, d)) @ rng.normal(size=(d, d)), dtype=torch.float32)


def _reference_log_density(train, queries, n_comps, pre_processing):
    """numpy PCA (SVD) + scaling + scipy's gaussian_kde: the model written independently."""
    train = train.numpy().astype(np.float64)
    queries = queries.numpy().astype(np.float64)
    mean = train.mean(axis=0)
    _, _, vt = np.linalg.svd(train - mean, full_matrices=False)
    project = lambda x: (x - mean) @ vt[:n_comps].T  # noqa: E731 - sign does not change a KDE
    t, q = project(train), project(queries)
    if pre_processing == "scale":
        length = np.linalg.norm(t, axis=1).max()
        t, q = t / length, q / length
    else:
        t = t / np.linalg.norm(t, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    return scipy.stats.gaussian_kde(t.T).logpdf(q.T)


@pytest.mark.parametrize("pre_processing", ["scale", "norm"])
def test_log_densities_match_numpy_pca_and_scipy_kde(random_resnet, pre_processing):
    model = DfkdeModel(random_resnet.backbone, n_comps=16, pre_processing=pre_processing)
    train = _embeddings()
    queries = torch.cat([train[:20] * 1.01, _embeddings(n=20, seed=1), _embeddings(n=5, seed=2) * 40])
    model.fit(train)
    got = model.evaluate(queries, as_log_likelihood=True).double().numpy()
    reference = _reference_log_density(train, queries, 16, pre_processing)
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-3)
    assert np.all(np.isfinite(got))


def test_far_points_stay_finite_and_ranked_where_float32_density_is_zero(random_resnet):
    model = DfkdeModel(random_resnet.backbone)
    train = _embeddings()
    model.fit(train)
    direction = train[0] - train.mean(0)
    far = torch.stack([train.mean(0) + k * direction for k in (5.0, 10.0, 20.0, 40.0)])
    log_density = model.evaluate(far, as_log_likelihood=True)
    assert torch.all(model.evaluate(far) == 0)  # the plain density underflows
    assert torch.all(torch.isfinite(log_density))
    assert torch.all(torch.diff(log_density) < 0)  # further out, less likely
    probability = model.predict(far)
    assert torch.all(torch.diff(probability) >= 0)


def test_probability_formula(random_resnet):
    model = DfkdeModel(random_resnet.backbone, threshold_steepness=0.05, threshold_offset=12.0)
    log_density = torch.tensor([-5000.0, -100.0, 0.0, 12.0, 30.0, 900.0], dtype=torch.float64)
    expected = 1.0 / (1.0 + np.exp(np.clip(0.05 * (log_density.numpy() - 12.0), -700, 700)))
    np.testing.assert_allclose(model.to_probability(log_density).numpy(), expected, rtol=1e-12)
    assert model.to_probability(torch.tensor([12.0])).item() == pytest.approx(0.5)


def test_two_layer_features_are_pooled_layers_concatenated_along_channels():
    import timm

    model = DfkdeModel("resnet18", weights="none", layers=("layer3", "layer4"), seed=3)
    images = torch.rand(2, 3, 256, 256)
    features = model.get_features(images)
    assert features.shape == (2, 256 + 512)
    assert model.feature_dim == 768
    # Independently: the same weights in a plain timm extractor, pooled with numpy.
    plain = timm.create_model("resnet18", features_only=True, out_indices=(3, 4)).eval()
    plain.load_state_dict(model.feature_extractor.body.state_dict())
    normalised = (images - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        maps = plain(normalised)
    expected = np.concatenate([m.numpy().mean(axis=(2, 3)) for m in maps], axis=1)
    np.testing.assert_allclose(features.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_input_is_resized_and_uint8_is_scaled(random_resnet):
    images = torch.randint(0, 256, (2, 3, 300, 200), dtype=torch.uint8)
    as_float = images.float() / 255.0
    np.testing.assert_allclose(
        random_resnet.get_features(images).numpy(), random_resnet.get_features(as_float).numpy(), rtol=1e-5, atol=1e-6
    )
    normalised = random_resnet.normalise_input(images)
    assert normalised.shape == (2, 3, 256, 256)


def test_too_few_embeddings_is_a_clear_error_and_leaves_the_model_unfitted(random_resnet):
    model = DfkdeModel(random_resnet.backbone, n_comps=16)
    with pytest.raises(FitError, match="needs at least 18 embeddings .images., got 17"):
        model.fit([_embeddings(n=10), _embeddings(n=7, seed=1)])
    assert not model.fitted
    with pytest.raises(RuntimeError, match="not fitted"):
        model.evaluate(_embeddings(n=2))
    model.fit(_embeddings(n=18))
    assert model.fitted


def test_identical_embeddings_are_refused(random_resnet):
    model = DfkdeModel(random_resnet.backbone, n_comps=4)
    with pytest.raises(FitError, match="singular|identical"):
        model.fit(torch.ones(50, 64))
    assert not model.fitted


def test_no_in_place_changes_to_the_callers_tensors(random_resnet):
    model = DfkdeModel(random_resnet.backbone)
    train, queries = _embeddings(d=512), _embeddings(n=10, d=512, seed=5)
    images = torch.rand(2, 3, 256, 256)
    copies = [t.clone() for t in (train, queries, images)]
    model.fit(train)
    model.evaluate(queries)
    model.preprocess(queries)
    model.forward(images)
    for original, copy in zip((train, queries, images), copies):
        assert torch.equal(original, copy)


def test_subsample_is_seeded_and_bounded(random_resnet):
    train = _embeddings(n=500)
    a = DfkdeModel(random_resnet.backbone, filter_count=100, seed=7)
    b = DfkdeModel(random_resnet.backbone, filter_count=100, seed=7)
    c = DfkdeModel(random_resnet.backbone, filter_count=100, seed=8)
    for m in (a, b, c):
        m.fit(train)
    assert a.kde_model.whitened.shape[0] == 100
    assert torch.equal(a.kde_model.whitened, b.kde_model.whitened)
    assert not torch.equal(a.kde_model.whitened, c.kde_model.whitened)


def test_a_fold_fitted_with_the_final_scale_scores_as_the_final_model_does(random_resnet):
    """A fold missing the largest-norm image had a scale of its own, which shifts every log-density by
    n_comps x log(ratio of scales); fitted with the final model's scale (scale_of every row), it does not."""
    rows = _embeddings(n=300, d=64, seed=3)
    rows[0] *= 4.0  # one image far out: the largest norm, in one fold only
    queries = _embeddings(n=50, d=64, seed=4)
    final = DfkdeModel(random_resnet.backbone, n_comps=8)
    final.fit(rows)
    own, fixed = (DfkdeModel(random_resnet.backbone, n_comps=8) for _ in range(2))
    own.fit(rows[1:])
    fixed.fit(rows[1:], max_length=fixed.scale_of(rows))
    shift = 8 * torch.log(fixed.max_length / own.max_length)
    torch.testing.assert_close(fixed.evaluate(queries, True), own.evaluate(queries, True) + shift, rtol=0, atol=1e-3)
    assert float(shift) > 5  # without the fix the fold's scores sat this far below the final model's scale
    assert float(fixed.max_length) == pytest.approx(float(final.max_length), rel=1e-5)
    assert math.log(float(final.max_length) / float(own.max_length)) > 0.5


def test_use_components_changes_the_count_fitted(random_resnet):
    model = DfkdeModel(random_resnet.backbone, n_comps=16)
    model.use_components(6)
    model.fit(_embeddings(n=40))
    assert model.pca_model.components.shape == (64, 6) and model.kde_model.whitened.shape == (40, 6)
    with pytest.raises(ValueError, match="at least 1"):
        model.use_components(0)
