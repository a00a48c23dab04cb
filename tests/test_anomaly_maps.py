"""DFKDE's anomaly maps: the same scores as `score`, maps of the asked size on one fixed scale, where the defect
is, thread safe, and states saved before maps existed still load (and draw none)."""

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from inspector.errors import PluginError, StateError
from inspector.plugin import anomaly_maps, can_explain
from inspector.tools import samples
from inspector_dfkde.maps import (GOOD_LEVEL, SAMPLED_LOCATIONS, SCALE, VARIANCE_FLOOR_SHARE, LocalStats,
                                 LocalSums, draw)
from inspector_dfkde.plugin import DfkdePlugin, DfkdeSettings

CPU = torch.device("cpu")
SIZE = 128  # frames
# The public Magnetic Tile Defect set in MVTec AD's layout, where $MAGNETIC_TILE says (bench/datasets.py)
MAGNETIC_TILE = Path(os.environ.get("MAGNETIC_TILE") or "magnetic-tile")


def _plugin():
    """A small random-weight ResNet-18 with two layers of different grids (8 x 8 and 4 x 4 at 64 px), drawing the
    scoring pass's maps (plugins/dfkde/maps.py; the localisation map's own tests are tests/test_patchmap.py)."""
    settings = DfkdeSettings(backbone="resnet18", layers=["layer2", "layer3"], weights="none", precision="fp32",
                             input_size=64, n_comps=8, localisation_maps=False)
    return DfkdePlugin.create(settings, CPU)


def _batch(plugin, images):
    return torch.stack([plugin.prepare(image) for image in images])


@pytest.fixture(scope="module")
def fitted():
    plugin = _plugin()
    images = samples.make_images(40, seed=11, size=SIZE)
    plugin.fit(_batch(plugin, images[i : i + 8]) for i in range(0, 40, 8))
    return plugin, images


def _squares(count, seed):
    """Held-out good frames with a bright square pasted away from the centre; the squares' masks."""
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for image in samples.make_images(count, seed=seed, size=SIZE):
        side = 24
        top, left = (int(v) for v in rng.choice([8, SIZE - side - 8], size=2))
        image = image.copy()
        image[top : top + side, left : left + side] = 255
        mask = np.zeros((SIZE, SIZE), dtype=bool)
        mask[top : top + side, left : left + side] = True
        images.append(image)
        masks.append(mask)
    return images, masks


def test_explain_gives_exactly_the_scores_of_score(fitted):
    plugin, _ = fitted
    batch = _batch(plugin, samples.make_images(6, defective=True, seed=12, size=SIZE))
    scored, explained = plugin.score(batch), plugin.explain(batch)
    np.testing.assert_array_equal(explained.scores.raw, scored.raw)
    np.testing.assert_array_equal(explained.scores.probability, scored.probability)
    assert can_explain(plugin)


@pytest.mark.parametrize("size", [(SIZE, SIZE), (37, 91), (300, 120), (1, 1)])
def test_maps_have_the_asked_size_type_and_range(fitted, size):
    plugin, _ = fitted
    images, _ = _squares(3, seed=13)
    scores, maps = anomaly_maps(plugin, _batch(plugin, images), [size] * 3)
    assert len(maps) == 3 and len(scores.raw) == 3
    for m in maps:
        assert m.shape == (size[1], size[0]) and m.dtype == np.float32
        assert np.all(np.isfinite(m)) and m.min() >= 0.0 and m.max() <= 1.0


def test_bad_index_or_size_is_a_clear_error(fitted):
    plugin, _ = fitted
    explained = plugin.explain(_batch(plugin, samples.make_images(2, seed=14, size=SIZE)))
    with pytest.raises(PluginError, match="image 2 asked of a batch of 2"):
        explained.map_of(2, (10, 10))
    with pytest.raises(PluginError, match="size 0x10"):
        explained.map_of(0, (0, 10))


def test_a_pasted_square_is_where_the_map_peaks_and_the_centre_prior_is_not(fitted):
    plugin, _ = fitted
    images, masks = _squares(12, seed=15)
    _, maps = anomaly_maps(plugin, _batch(plugin, images), [(SIZE, SIZE)] * len(images))
    near = [np.zeros_like(mask) for mask in masks]
    for grown, mask in zip(near, masks):  # the square and a margin of 8 px (the maps are smoothed)
        ys, xs = np.nonzero(mask)
        grown[max(ys.min() - 8, 0) : ys.max() + 9, max(xs.min() - 8, 0) : xs.max() + 9] = True
    peaks = [np.unravel_index(np.argmax(m), m.shape) for m in maps]
    hits = np.mean([grown[peak] for grown, peak in zip(near, peaks)])
    centre = (SIZE // 2, SIZE // 2)  # the centre prior's peak
    prior_hits = np.mean([grown[centre] for grown in near])
    assert hits >= 0.75 > prior_hits
    # and pixel by pixel the map ranks the square's pixels above the rest, unlike the prior
    inside = np.mean([m[mask].mean() for m, mask in zip(maps, masks)])
    outside = np.mean([m[~grown].mean() for m, grown in zip(maps, near)])
    assert inside > 2 * outside


def test_good_parts_maps_are_darker_than_defective_ones(fitted):
    plugin, _ = fitted
    good = samples.make_images(12, seed=16, size=SIZE)
    defective, _ = _squares(12, seed=17)
    _, good_maps = anomaly_maps(plugin, _batch(plugin, good), [(SIZE, SIZE)] * 12)
    _, bad_maps = anomaly_maps(plugin, _batch(plugin, defective), [(SIZE, SIZE)] * 12)
    good_peaks = np.array([m.max() for m in good_maps])
    bad_peaks = np.array([m.max() for m in bad_maps])
    assert np.median(good_peaks) < np.median(bad_peaks)
    assert np.mean([m.mean() for m in good_maps]) < 0.5 * np.mean([m.mean() for m in bad_maps])


def test_map_of_from_two_threads_gives_the_same_maps(fitted):
    plugin, _ = fitted
    images, _ = _squares(4, seed=18)
    explained = plugin.explain(_batch(plugin, images))
    asks = [(i, size) for size in [(SIZE, SIZE), (97, 53)] for i in range(4)] * 3
    alone = [explained.map_of(i, size) for i, size in asks]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda ask: explained.map_of(*ask), asks))
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)


def test_local_statistics_match_numpy_over_every_location(fitted):
    """Each channel's mean and variance over every location of every training image, and the distance of a
    location, computed independently with numpy from the backbone's feature maps."""
    plugin, images = fitted
    maps = plugin.model.get_feature_maps(_batch(plugin, images))
    per_layer = [m.permute(0, 2, 3, 1).reshape(-1, m.shape[1]).double().numpy() for m in maps]
    mean = np.concatenate([x.mean(0) for x in per_layer])
    variance = np.concatenate([x.var(0) for x in per_layer])
    stats = plugin.model.local_stats
    np.testing.assert_allclose(stats.mean.numpy(), mean, rtol=1e-4, atol=1e-6)
    floors, offset = [], 0  # each layer's channels floored at a share of that layer's median variance
    for x in per_layer:
        layer = variance[offset : offset + x.shape[1]]
        floors.append(np.full(x.shape[1], VARIANCE_FLOOR_SHARE * np.median(layer)))
        offset += x.shape[1]
    np.testing.assert_allclose(stats.variance.numpy(), np.maximum(variance, np.concatenate(floors)), rtol=1e-3)
    # the finest grid's location (2, 5) of image 0: layer2 there, layer3 bilinearly brought to that grid
    distance = stats.distance([m[:1] for m in maps])[0].numpy()
    c2 = maps[0].shape[1]
    fine = ((maps[0][0, :, 2, 5].double().numpy() - mean[:c2]) ** 2 / stats.variance[:c2].double().numpy()).sum()
    coarse_grid = ((maps[1][0].double().numpy() - mean[c2:, None, None]) ** 2
                   / stats.variance[c2:].double().numpy()[:, None, None]).sum(0)
    # align_corners=False, 4 -> 8: row 2 sits at 0.75 of coarse row 0 to row 1 (0.25, 0.75), column 5 at 2.25
    rows, cols = np.array([0.25, 0.75]), np.array([0.75, 0.25])
    coarse = rows @ coarse_grid[0:2, 2:4] @ cols
    np.testing.assert_allclose(distance[2, 5], (fine / c2 + coarse / maps[1].shape[1]) / 2, rtol=1e-4)


def test_cross_fitting_rows_give_the_maps_that_fit_gives(fitted):
    plugin, images = fitted
    reused = _plugin()
    rows = torch.cat([reused.embed(_batch(reused, images[i : i + 16])) for i in range(0, 40, 16)])
    assert rows.shape == (40, (2 + SAMPLED_LOCATIONS) * plugin.model.feature_dim)
    reused.fit_embeddings(rows)
    torch.testing.assert_close(reused.model.local_stats.mean, plugin.model.local_stats.mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(reused.model.local_stats.variance, plugin.model.local_stats.variance,
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(reused.model.local_stats.scale, plugin.model.local_stats.scale, rtol=1e-5, atol=0)
    batch = _batch(plugin, _squares(2, seed=19)[0])
    np.testing.assert_allclose(reused.explain(batch).map_of(1, (50, 40)), plugin.explain(batch).map_of(1, (50, 40)),
                               atol=1e-5)
    with pytest.raises(ValueError, match="rows of `embed`"):
        reused.fit_embeddings(rows[:, : plugin.model.feature_dim])


def test_saved_maps_load_and_a_state_from_before_maps_loads_without_them(fitted, tmp_path):
    plugin, _ = fitted
    batch = _batch(plugin, _squares(3, seed=20)[0])
    plugin.save(tmp_path)
    loaded = DfkdePlugin.load(tmp_path, CPU)
    np.testing.assert_array_equal(loaded.explain(batch).map_of(0, (70, 60)), plugin.explain(batch).map_of(0, (70, 60)))

    state = tmp_path / "state.safetensors"
    tensors = load_file(str(state))
    save_file({k: v for k, v in tensors.items() if not k.startswith("local.")}, str(state))  # as saved before
    old = DfkdePlugin.load(tmp_path, CPU)
    np.testing.assert_array_equal(old.score(batch).raw, plugin.score(batch).raw)
    assert not can_explain(old)
    with pytest.raises(PluginError, match="draws no anomaly maps"):
        anomaly_maps(old, batch, [(64, 64)] * 3)

    save_file({k: v for k, v in tensors.items() if k != "local.variance"}, str(state))
    with pytest.raises(StateError, match="anomaly maps' tensors but not all"):
        DfkdePlugin.load(tmp_path, CPU)


def test_local_stats_refuse_features_constant_on_every_image():
    sums = LocalSums()
    sums.add(torch.full((3, (2 + SAMPLED_LOCATIONS) * 4), 2.0).index_fill_(1, torch.arange(4, 8), 4.0))
    with pytest.raises(ValueError, match="constant"):
        LocalStats().fit(sums, [4])  # value 2 at every location of each of 3 images


@pytest.mark.slow
@pytest.mark.skipif(not (MAGNETIC_TILE / "ground_truth").is_dir(), reason="$MAGNETIC_TILE names no data set")
def test_maps_of_real_defects_beat_the_centre_prior_and_the_mean_good_image():
    """The shipped defaults fitted on magnetic-tile's good parts: pixel AUROC (scikit-learn) of the maps over a
    seeded sample of every test image's pixels, against a Gaussian blob at the centre and |image - mean good|."""
    import torch.nn.functional as F
    from sklearn.metrics import roc_auc_score

    from inspector.imagefiles import find_images, read_image

    plugin = DfkdePlugin.create(DfkdeSettings(localisation_maps=False), CPU)

    def grey(image):
        x = torch.from_numpy(image).permute(2, 0, 1).float().mean(0)[None, None]
        return F.interpolate(x, size=(256, 256), mode="bilinear", antialias=True)[0, 0]

    def back(grid, shape):
        return F.interpolate(grid[None, None], size=shape, mode="bilinear")[0, 0].numpy()

    train = find_images(MAGNETIC_TILE / "train" / "good")
    prepared = [plugin.prepare(read_image(p, 10**8, plugin.decode_size)) for p in train]
    plugin.fit(torch.stack(prepared[i : i + 32]) for i in range(0, len(prepared), 32))
    mean_good = torch.stack([grey(read_image(p, 10**8)) for p in train]).mean(0)
    rng = np.random.default_rng(0)
    labels, ours, prior, difference = [], [], [], []
    for path in find_images(MAGNETIC_TILE / "test"):
        image = read_image(path, 10**8)
        h, w = image.shape[:2]
        kind = path.parent.name
        mask_path = MAGNETIC_TILE / "ground_truth" / kind / f"{path.stem}.png"
        mask = np.zeros((h, w), bool) if kind == "good" else read_image(mask_path, 10**8)[:, :, 0] > 127
        _, (drawn,) = anomaly_maps(plugin, plugin.prepare(read_image(path, 10**8, plugin.decode_size))[None], [(w, h)])
        y, x = np.mgrid[0:h, 0:w]
        blob = np.exp(-0.5 * (((y - h / 2) / (h / 4)) ** 2 + ((x - w / 2) / (w / 4)) ** 2))
        chosen = rng.random(h * w) < 0.05
        labels.append(mask.ravel()[chosen])
        ours.append(drawn.ravel()[chosen])
        prior.append(blob.ravel()[chosen])
        difference.append(back((grey(image) - mean_good).abs(), (h, w)).ravel()[chosen])
    labels = np.concatenate(labels)
    auroc = {name: roc_auc_score(labels, np.concatenate(values))
             for name, values in [("maps", ours), ("centre", prior), ("mean good", difference)]}
    assert auroc["maps"] > max(auroc["centre"], auroc["mean good"]), auroc


def _maps(plugin, images):
    return anomaly_maps(plugin, _batch(plugin, images), [(SIZE, SIZE)] * len(images))[1]


def test_a_nearly_dead_channel_cannot_saturate_the_maps_of_good_parts(fitted):
    """One channel made nearly constant in the good parts' rows (as a channel that barely moves on a line's
    parts is): good frames, where that channel moves as it really does, must still draw as good parts."""
    plugin, images = fitted
    fresh = samples.make_images(8, seed=21, size=SIZE)
    honest = np.array([np.quantile(m, 0.99) for m in _maps(plugin, fresh)])
    dead = _plugin()
    rows = dead.embed(_batch(dead, images))
    d = dead.model.feature_dim
    channel = 3  # of the first layer
    level = rows[:, channel].mean()
    rows[:, channel] = level  # pooled: the same on every image
    rows[:, d + channel] = level**2 * (1 + 1e-6)  # a mean square a hair over the square: variance ~1e-6 level^2
    rows[:, 2 * d + channel :: d] = level  # every carried location of the row, where there are any
    dead.fit_embeddings(rows)
    drawn = np.array([np.quantile(m, 0.99) for m in _maps(dead, fresh)])
    assert np.median(drawn) < max(2 * np.median(honest), GOOD_LEVEL), (drawn, honest)


def test_good_parts_look_the_same_on_models_whose_good_locations_spread_differently():
    """The map's scale is each model's own, so fresh good frames' 99th-percentile pixel sits near GOOD_LEVEL
    (smoothing lowers it) whatever the model's layers. One fixed scale put it at 0.07 to 0.25 on these four
    models (a ratio of 3.6 between them); each model's own scale puts it at 0.08 to 0.15."""
    levels = {}
    for layers in (["layer1", "layer2"], ["layer2", "layer3"], ["layer3"], ["layer1"]):
        settings = DfkdeSettings(backbone="resnet18", layers=layers, weights="none", precision="fp32",
                                 input_size=64, n_comps=8, localisation_maps=False)
        plugin = DfkdePlugin.create(settings, CPU)
        images = samples.make_images(40, seed=11, size=SIZE)
        plugin.fit(_batch(plugin, images[i : i + 8]) for i in range(0, 40, 8))
        good = np.concatenate([m.ravel() for m in _maps(plugin, samples.make_images(12, seed=22, size=SIZE))])
        levels["+".join(layers)] = float(np.quantile(good, 0.99))
    assert all(GOOD_LEVEL / 4 < level < 1.5 * GOOD_LEVEL for level in levels.values()), levels
    assert max(levels.values()) < 2.5 * min(levels.values()), levels


def test_a_version_saved_before_the_maps_scale_draws_with_the_fixed_scale(fitted, tmp_path):
    plugin, _ = fitted
    batch = _batch(plugin, _squares(2, seed=23)[0])
    plugin.save(tmp_path)
    state = tmp_path / "state.safetensors"
    tensors = load_file(str(state))
    assert tensors["local.scale"].shape == (1,) and float(tensors["local.scale"][0]) > 0
    save_file({k: v for k, v in tensors.items() if k != "local.scale"}, str(state))  # as saved before
    old = DfkdePlugin.load(tmp_path, CPU)
    np.testing.assert_array_equal(old.score(batch).raw, plugin.score(batch).raw)
    distance = old.model.local_stats.distance(old.model.get_feature_maps(batch))[1]
    np.testing.assert_array_equal(old.explain(batch).map_of(1, (50, 40)), draw(distance, (50, 40), 64, SCALE))

    for bad in (torch.tensor([0.0]), torch.tensor([float("nan")]), torch.tensor([1.0, 2.0])):
        save_file(tensors | {"local.scale": bad}, str(state))
        with pytest.raises(StateError, match="local.scale"):
            DfkdePlugin.load(tmp_path, CPU)
