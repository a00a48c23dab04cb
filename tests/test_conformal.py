"""The split-conformal threshold and the anomaly probability it gives (plugins/dfkde/conformal.py).

The rule is checked against a numpy reference written from its definition, its promise by simulating
thousands of archives (numpy only, seeded), the Beta interval against scipy, and the probability's
properties with hypothesis over any calibration and any raw score.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from inspector.errors import FitError
from inspector.plugin import Scores
from inspector_dfkde.conformal import ConformalScale, beta_quantile, boundary_rank, images_needed
from inspector_dfkde.plugin import DfkdePlugin, DfkdeSettings

SIZES = (19, 20, 39, 40, 99, 199)
TARGETS = (0.01, 0.05, 0.1)


def reference_rank(n: int, q: float) -> int:
    """The largest k whose expected false-reject rate k / (n + 1) is at most q (0: none is)."""
    k = np.arange(n + 1)
    return int(k[k / (n + 1) <= q + 1e-12].max())


@pytest.fixture(scope="module")
def plugin() -> DfkdePlugin:
    """An unfitted DFKDE plugin: calibrate needs only the scores it is given."""
    return DfkdePlugin.create(DfkdeSettings(backbone="resnet18", layers=["layer4"], weights="none",
                                            precision="fp32", input_size=64, n_comps=4), torch.device("cpu"))


def _good_scores(rng: np.random.Generator, shape) -> np.ndarray:
    """Log-density-like scores of good parts: -chi2(24) / 2, skewed like a KDE's."""
    return -0.5 * rng.chisquare(24, size=shape)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("q", TARGETS)
def test_the_boundary_is_the_kth_smallest_score_with_k_floor_q_n_plus_1(plugin, n, q):
    raw = _good_scores(np.random.default_rng(n), n)
    k = reference_rank(n, q)
    assert boundary_rank(n, q) == k
    if k == 0:
        with pytest.raises(FitError, match=f"needs at least {math.ceil(1 / q) - 1} calibration images"):
            plugin.calibrate(Scores(probability=np.zeros(n), raw=raw), 0.5, q)
        return
    calibrated = plugin.calibrate(Scores(probability=np.zeros(n), raw=raw), 0.5, q)
    promise = calibrated.promise
    assert calibrated.boundary == np.sort(raw)[k - 1]
    assert (promise.n, promise.k) == (n, k)
    assert promise.expected == pytest.approx(k / (n + 1)) and k / (n + 1) <= q
    assert calibrated.held_out_false_reject == pytest.approx(k / n)
    assert promise.low == pytest.approx(scipy.stats.beta.ppf(0.05, k, n + 1 - k), rel=1e-9)
    assert promise.high == pytest.approx(scipy.stats.beta.ppf(0.95, k, n + 1 - k), rel=1e-9)
    figures = calibrated.manifest()  # the manifest's record keeps its names
    assert figures["boundary_log_density"] == calibrated.boundary and (figures["n"], figures["k"]) == (n, k)
    assert figures["false_reject_interval"]["low"] == promise.low
    # every calibration score: fails iff at or below the boundary
    probability = plugin.model.to_probability(torch.from_numpy(raw)).numpy()
    assert probability.dtype == np.float64
    np.testing.assert_array_equal(probability >= 0.5, raw <= np.sort(raw)[k - 1])


def test_k_is_taken_from_the_target_as_written():
    # 0.29 x 100 is 28.999... in binary; the rule means 29
    assert boundary_rank(99, 0.29) == 29 and boundary_rank(99, 0.07) == 7 and boundary_rank(199, 0.005) == 1
    for q in (0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.29, 0.5):
        n = images_needed(q)
        assert boundary_rank(n, q) == 1 and boundary_rank(n - 1, q) == 0, q


def test_too_few_images_for_the_target_is_refused_with_the_number_needed(plugin):
    raw = _good_scores(np.random.default_rng(1), 150)
    with pytest.raises(FitError, match=r"0.005 needs at least 199 calibration images .*got 150.*at least 0.00662"):
        plugin.calibrate(Scores(probability=np.zeros(150), raw=raw), 0.5, 0.005)
    assert plugin.calibrate(Scores(probability=np.zeros(199), raw=np.resize(raw, 199)), 0.5, 0.005).promise.k == 1


# --- the promise, over many archives --------------------------------------------------------------

REPETITIONS = 4000
FRESH = 200


def _simulate(n: int, boundary_of, seed: int) -> tuple[float, float]:
    """Mean false-reject rate of fresh good parts over REPETITIONS archives of n good parts (rejecting at or
    below each archive's boundary), and its standard error."""
    rng = np.random.default_rng(seed)
    archives = np.sort(_good_scores(rng, (REPETITIONS, n)), axis=1)
    fresh = _good_scores(rng, (REPETITIONS, FRESH))
    rates = (fresh <= boundary_of(archives)[:, None]).mean(axis=1)
    return float(rates.mean()), float(rates.std(ddof=1) / math.sqrt(REPETITIONS))


@pytest.mark.parametrize(("n", "q"), [(40, 0.05), (40, 0.1), (99, 0.01), (199, 0.005), (652, 0.01), (652, 0.005),
                                      (1994, 0.005)])
def test_the_expected_false_reject_rate_is_k_over_n_plus_1_at_most_the_target(n, q):
    """Within 4 standard errors of k / (n + 1), which is at most the target; numpy's default quantile (type 7)
    with rejection at or below it gives (1 + (n - 1) q) / (n + 1), over the target, and the simulation shows it."""
    k = boundary_rank(n, q)
    mean, se = _simulate(n, lambda sorted_scores: sorted_scores[:, k - 1], seed=n)
    assert abs(mean - k / (n + 1)) <= 4 * se, (mean, k / (n + 1), se)
    assert mean <= q + 4 * se
    old_mean, old_se = _simulate(n, lambda sorted_scores: np.quantile(sorted_scores, q, axis=1), seed=n)
    old_expected = (1 + (n - 1) * q) / (n + 1)
    assert abs(old_mean - old_expected) <= 4 * old_se, (old_mean, old_expected)
    assert old_mean > q + 4 * old_se, (old_mean, q)


@pytest.mark.parametrize(("p", "a", "b"), [(0.05, 1, 20), (0.95, 1, 20), (0.05, 6, 647), (0.95, 6, 647),
                                           (0.5, 50, 50), (0.05, 3, 759), (0.95, 30, 1965), (0.01, 200, 5)])
def test_beta_quantile_agrees_with_scipy(p, a, b):
    assert beta_quantile(p, a, b) == pytest.approx(scipy.stats.beta.ppf(p, a, b), rel=1e-9, abs=1e-15)


# --- the probability -------------------------------------------------------------------------------

finite = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False)


@st.composite
def calibrations(draw) -> ConformalScale:
    q = draw(st.sampled_from((0.01, 0.05, 0.1, 0.25, 0.5)))
    n = draw(st.integers(images_needed(q), images_needed(q) + 60))
    pool = draw(st.lists(st.floats(-500, 50, allow_nan=False), min_size=1, max_size=n))
    scores = draw(st.lists(st.sampled_from(pool), min_size=n, max_size=n))  # ties included
    threshold = draw(st.floats(0.01, 0.99))
    return ConformalScale.fit(np.array(scores), q, threshold)


@settings(max_examples=300, deadline=None)
@given(calibrations(), st.lists(finite, min_size=1, max_size=40))
def test_the_probability_is_monotone_in_0_1_and_agrees_with_the_verdict(scale, raw):
    raw = np.sort(np.concatenate([raw, scale.scores, [scale.boundary]]))
    probability = scale.probability(raw)
    assert probability.dtype == np.float64 and ((probability >= 0) & (probability <= 1)).all()
    assert (np.diff(probability) <= 0).all()  # lower log-density, more unusual, higher probability
    np.testing.assert_array_equal(probability >= scale.threshold, raw <= scale.boundary)


@settings(max_examples=200, deadline=None)
@given(calibrations())
def test_defects_beyond_every_good_part_do_not_tie(scale):
    beyond = scale.scores[0] - np.array([1e-3, 1e-1, 1, 10, 100, 1e3, 1e4, 1e5, 1e6, 1e7])
    probability = scale.probability(beyond)
    assert (np.diff(probability) > 0).all() and (probability < 1).all()
    assert (probability >= scale.threshold).all()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-500, 50, allow_nan=False), min_size=20, max_size=200, unique=True),
       st.sampled_from((0.01, 0.05, 0.1)))
def test_with_threshold_one_minus_k_over_n_plus_1_it_is_the_conformal_rank(scores, q):
    n = len(scores)
    k = boundary_rank(n, q)
    if k < 1:
        return
    scale = ConformalScale.fit(np.array(scores), q, 1 - k / (n + 1))
    ordered = np.sort(scores)
    # the share of the n + 1 (calibration parts and this frame) that look less unusual than the i-th lowest
    np.testing.assert_allclose(scale.probability(ordered), 1 - np.arange(1, n + 1) / (n + 1), rtol=0, atol=1e-12)


def test_not_a_number_stays_not_a_number_and_infinities_are_the_ends():
    scale = ConformalScale.fit(np.arange(40.0), 0.05, 0.5)
    probability = scale.probability(np.array([np.nan, -np.inf, np.inf]))
    assert np.isnan(probability[0]) and probability[1] == 1.0 and probability[2] == 0.0
