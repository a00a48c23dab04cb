"""Regions of an anomaly map: components against scipy's, boxes in the image's own pixels, largest first, and
the calibrated level against a numpy reference of the split-conformal rank."""

import math

import numpy as np
import pytest
import scipy.ndimage

from inspector.regions import GRID, Region, find_regions, grid_size, label, regions_of
from inspector_dfkde.patchmap import images_for_regions, region_rank

EIGHT = np.ones((3, 3), dtype=bool)


@pytest.mark.parametrize("seed", range(6))
def test_components_are_scipys_8_connected_ones(seed):
    rng = np.random.default_rng(seed)
    mask = scipy.ndimage.binary_opening(rng.random((40, 57)) < 0.45) if seed % 2 else rng.random((31, 23)) < 0.3
    ours, n = label(mask)
    theirs, m = scipy.ndimage.label(mask, structure=EIGHT)
    assert n == m
    # the same partition: a one-to-one map between the two labellings
    pairs = set(zip(ours[mask].tolist(), theirs[mask].tolist()))
    assert len(pairs) == n == len({a for a, _ in pairs}) == len({b for _, b in pairs})
    assert np.array_equal(ours == 0, ~mask)


def test_diagonal_cells_are_one_region_and_apart_cells_two():
    mask = np.zeros((5, 5), dtype=bool)
    mask[0, 0] = mask[1, 1] = True
    mask[4, 4] = True
    assert label(mask)[1] == 2


def _reference_regions(values, level, size):
    """Boxes from scipy's labels and find_objects, scaled to the image's pixels."""
    width, height = size
    gh, gw = values.shape
    labels, n = scipy.ndimage.label(values >= level, structure=EIGHT)
    out = []
    for r, (ys, xs) in enumerate(scipy.ndimage.find_objects(labels), start=1):
        x0, y0 = math.floor(xs.start * width / gw), math.floor(ys.start * height / gh)
        x1, y1 = min(width, math.ceil(xs.stop * width / gw)), min(height, math.ceil(ys.stop * height / gh))
        cells = int((labels == r).sum())
        out.append((x0, y0, x1 - x0, y1 - y0, float(values[labels == r].max()),
                    round(cells * width / gw * height / gh)))
    return sorted(out, key=lambda t: (-t[5], -t[4], t[1], t[0]))


@pytest.mark.parametrize("size", [(96, 96), (300, 120), (37, 91)])
def test_regions_match_a_scipy_reference_in_the_images_pixels(size):
    rng = np.random.default_rng(3)
    values = scipy.ndimage.gaussian_filter(rng.random((48, 64)), 2.0).astype(np.float32)
    level = float(np.quantile(values, 0.9))
    found = regions_of(values, level, size, limit=100)
    expected = _reference_regions(values, level, size)
    assert [(r.x, r.y, r.width, r.height, r.area) for r in found] == [(e[0], e[1], e[2], e[3], e[5]) for e in expected]
    np.testing.assert_allclose([r.peak for r in found], [e[4] for e in expected], rtol=0, atol=1e-7)
    assert all(0 <= r.x < size[0] and 0 <= r.y < size[1] and r.x + r.width <= size[0]
               and r.y + r.height <= size[1] for r in found)


def test_largest_first_at_most_the_limit_and_none_below_the_level():
    values = np.zeros((20, 20), dtype=np.float32)
    values[2:4, 2:4] = 0.9  # 4 cells, the highest
    values[10:16, 10:16] = 0.6  # 36 cells
    values[0, 18] = 0.7  # 1 cell
    found = regions_of(values, 0.5, (200, 100), limit=2)
    assert [r.area for r in found] == [36 * 50, 4 * 50]
    assert found[0] == Region(x=100, y=50, width=60, height=30, peak=pytest.approx(0.6), area=1800)
    assert regions_of(values, 0.95, (200, 100)) == []
    assert found[0].as_json() == {"box": [100, 50, 60, 30], "peak": 0.6, "area": 1800}


def test_the_grid_keeps_small_images_and_shrinks_large_ones():
    assert grid_size((40, 30)) == (40, 30)
    assert grid_size((960, 480)) == (GRID, GRID // 2)
    asked = []
    find_regions(lambda s: asked.append(s) or np.zeros((s[1], s[0]), np.float32), (1920, 1080), 0.5)
    assert asked == [grid_size((1920, 1080))]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "0.5"])
def test_a_bad_level_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="region level"):
        regions_of(np.zeros((4, 4)), bad, (4, 4))


@pytest.mark.parametrize("n", [1, 18, 19, 20, 39, 100, 257])
@pytest.mark.parametrize("rate", [0.05, 0.1, 0.2])
def test_the_level_rank_is_the_split_conformal_quantile(n, rate):
    """The k-th smallest of n held-out peaks, k = ceil((1 - rate)(n + 1)): numpy's 'higher' quantile of the
    peaks with a +inf appended, the textbook form of the split-conformal bound."""
    peaks = np.random.default_rng(n).random(n)
    k = region_rank(n, rate)
    reference = np.quantile(np.append(peaks, np.inf), 1 - rate, method="inverted_cdf")
    if not np.isfinite(reference):
        assert k is None and n < images_for_regions(rate)
    else:
        assert k is not None and np.sort(peaks)[k - 1] == reference
        assert n >= images_for_regions(rate)


def test_the_level_holds_its_rate_on_fresh_good_peaks():
    """Exchangeable peaks: a fresh one is over the calibrated level at most `rate` of the time (averaged over
    many calibrations), and not far under it."""
    rng = np.random.default_rng(0)
    rate, n, trials = 0.05, 59, 4000
    k = region_rank(n, rate)
    over = 0
    for _ in range(trials):
        peaks = rng.gamma(2.0, size=n + 1)
        over += peaks[-1] >= np.sort(peaks[:-1])[k - 1]
    assert 0.03 < over / trials <= rate + 3 * math.sqrt(rate * (1 - rate) / trials)


def test_a_jpeg_decoded_at_reduced_scale_is_measured_in_its_own_pixels():
    import io

    from PIL import Image

    from inspector.worker.locate import own_size

    def body(fmt, size=(401, 299)):
        buffer = io.BytesIO()
        Image.new("RGB", size, (90, 90, 90)).save(buffer, fmt)
        return buffer.getvalue()

    jpeg = body("JPEG")
    assert own_size(jpeg, (101, 75)) == (401, 299)  # 1/4 scale, rounded up as libjpeg does
    assert own_size(jpeg, (401, 299)) == (401, 299)
    assert own_size(jpeg, (64, 64)) == (64, 64)  # not this header's scale: the decoded size stands
    assert own_size(body("PNG"), (401, 299)) == (401, 299)
    assert own_size(b"\xff\xd8 not a jpeg", (10, 10)) == (10, 10)


def test_watch_prints_the_count_and_the_largest_box():
    from inspector.tools.watch import format_line

    body = {"verdict": "fail", "anomaly_probability": 0.9, "line_id": "l1", "camera_id": "c1", "frame_id": "f1",
            "regions": [{"box": [100, 50, 60, 30], "peak": 0.9, "area": 1500},
                        {"box": [1, 2, 3, 4], "peak": 0.8, "area": 10}]}
    assert format_line(body).endswith("f1 2 regions, largest 60x30 at 100,50")
    assert format_line(body | {"regions": []}).endswith("f1 0 regions")
    assert format_line(body | {"regions": [{"box": ["\x1b[2J", 0, 0, 0]}]}).endswith("f1 1 region")
    assert format_line({k: v for k, v in body.items() if k != "regions"}).endswith("f1")
