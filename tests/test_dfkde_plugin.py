"""The DFKDE plugin behind inspector's contract: registry, fit from images, save/load, ranking."""

from importlib.metadata import EntryPoint

import numpy as np
import pytest
import scipy.stats
import torch

from inspector import plugin as registry_module
from inspector.errors import FitError, PluginError, StateError
from inspector.plugin import get_plugin
from inspector.tools import samples
from inspector_dfkde.maps import SAMPLED_LOCATIONS
from inspector_dfkde.plugin import DfkdePlugin, DfkdeSettings

CPU = torch.device("cpu")

TOO_FEW_FOR_FOUR_COMPONENTS = (
    r"needs at least 8 images to fit \(2 per component, at least 4 components; plugins\.dfkde\.n_comps is \d+\), got 5")


def _plugin(**overrides):
    """A random-weight ResNet-18 at 256 px: the conditions the sample line's defects were tuned to be found in."""
    settings = DfkdeSettings(**({"backbone": "resnet18", "layers": ["layer4"], "weights": "none", "precision": "fp32",
                                 "input_size": 256} | overrides))
    return DfkdePlugin.create(settings, CPU)


def _batches(plugin, images, size=16):
    prepared = [plugin.prepare(image) for image in images]
    for start in range(0, len(prepared), size):
        yield torch.stack(prepared[start : start + size])


def _score(plugin, images):
    return np.concatenate([plugin.score(batch).probability for batch in _batches(plugin, images)])


def auroc(negatives, positives):
    """Area under the ROC curve from scipy's Mann-Whitney U (positives should score higher)."""
    u = scipy.stats.mannwhitneyu(positives, negatives, alternative="greater").statistic
    return u / (len(positives) * len(negatives))


@pytest.fixture(scope="module")
def fitted():
    plugin = _plugin(n_comps=16)
    report = plugin.fit(_batches(plugin, samples.make_images(120, seed=1)))
    return plugin, report


def test_registered_through_the_entry_point():
    assert get_plugin("dfkde") is DfkdePlugin
    with pytest.raises(PluginError, match="unknown plugin 'nope'; installed plugins: dfkde"):
        get_plugin("nope")


def test_defects_score_above_held_out_good_parts(fitted):
    plugin, report = fitted
    assert (report.images, report.embeddings) == (120, 120)
    good = _score(plugin, samples.make_images(40, seed=2))
    defective = _score(plugin, samples.make_images(40, defective=True, seed=3))
    assert auroc(good, defective) >= 0.9


def test_save_then_load_gives_identical_scores(fitted, tmp_path):
    plugin, _ = fitted
    files = plugin.save(tmp_path)
    assert sorted(files) == ["patchmap.safetensors", "settings.json", "state.safetensors"]  # with its localisation map
    loaded = DfkdePlugin.load(tmp_path, CPU)
    batch = next(_batches(plugin, samples.make_images(8, defective=True, seed=4)))
    before, after = plugin.score(batch), loaded.score(batch)
    np.testing.assert_array_equal(before.probability, after.probability)
    np.testing.assert_array_equal(before.raw, after.raw)
    assert loaded.describe() == plugin.describe()


def test_load_refuses_a_corrupt_state_or_other_backbone_weights(fitted, tmp_path):
    plugin, _ = fitted
    plugin.save(tmp_path)
    settings = (tmp_path / "settings.json").read_text()
    (tmp_path / "settings.json").write_text(settings.replace('"seed": 0', '"seed": 1'))
    with pytest.raises(StateError, match="backbone weights .* differ"):
        DfkdePlugin.load(tmp_path, CPU)
    (tmp_path / "settings.json").write_text(settings)
    (tmp_path / "state.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(StateError, match="state.safetensors: cannot read"):
        DfkdePlugin.load(tmp_path, CPU)


def test_fit_streams_into_a_bounded_seeded_reservoir():
    plugin = _plugin(n_comps=4, filter_count=30)
    images = samples.make_images(50, seed=5)
    report = plugin.fit(_batches(plugin, images, size=7))
    assert (report.images, report.embeddings) == (50, 30)
    assert plugin.model.kde_model.whitened.shape[0] == 30
    again = _plugin(n_comps=4, filter_count=30)
    again.fit(_batches(again, images, size=7))
    assert torch.equal(plugin.model.kde_model.whitened, again.model.kde_model.whitened)


def test_too_few_images_says_how_many_are_needed():
    plugin = _plugin(n_comps=16)
    with pytest.raises(FitError, match=TOO_FEW_FOR_FOUR_COMPONENTS):
        plugin.fit(_batches(plugin, samples.make_images(5, seed=6)))


def test_embeddings_fit_and_score_as_the_images_do():
    """Cross-fitting embeds once and refits PCA and the KDE per fold: that must be the model `fit` gives."""
    images = samples.make_images(45, seed=8)
    streamed = _plugin(n_comps=4, filter_count=30)
    report = streamed.fit(_batches(streamed, images, size=7))
    reused = _plugin(n_comps=4, filter_count=30)
    embeddings = torch.cat([reused.embed(batch) for batch in _batches(reused, images, size=16)])
    # pooled, then mean squares, then the features at the maps' sampled locations (plugins/dfkde/maps.py)
    assert embeddings.shape == (45, (2 + SAMPLED_LOCATIONS) * 512) and embeddings.dtype == torch.float32
    assert reused.fit_embeddings(embeddings) == report
    assert torch.equal(reused.model.kde_model.whitened, streamed.model.kde_model.whitened)
    batch = next(_batches(streamed, samples.make_images(6, defective=True, seed=9)))
    direct, via = streamed.score(batch), reused.score_embeddings(reused.embed(batch))
    np.testing.assert_allclose(via.raw, direct.raw, rtol=1e-6)
    np.testing.assert_allclose(via.probability, direct.probability, rtol=1e-6)
    with pytest.raises(FitError, match=TOO_FEW_FOR_FOUR_COMPONENTS):
        reused.fit_embeddings(embeddings[:5])


def test_a_stored_version_keeps_its_settings_whatever_the_defaults_become(fitted, tmp_path):
    """Loading reads the settings saved with the state and takes nothing from the configuration: a version
    fitted before the defaults changed scores as it did."""
    plugin, _ = fitted
    plugin.save(tmp_path)
    loaded = DfkdePlugin.load(tmp_path, CPU)
    saved = plugin.describe()
    assert loaded.describe() == saved
    defaults = DfkdeSettings()
    assert (saved["layers"], saved["n_comps"], saved["input_size"]) == (["layer4"], 16, 256)
    assert (defaults.layers, defaults.n_comps, defaults.input_size) != (["layer4"], 16, 256)
    assert loaded.model.n_components == 16 and loaded.model.input_size == 256


def test_prepare_resizes_and_accepts_mono():
    plugin = _plugin()
    rgb = plugin.prepare(np.zeros((480, 640, 3), dtype=np.uint8))
    mono = plugin.prepare(np.full((100, 120), 7, dtype=np.uint8))
    assert rgb.shape == mono.shape == (3, 256, 256) and rgb.dtype == torch.uint8
    assert torch.all(mono == 7)
    with pytest.raises(ValueError, match="uint8"):
        plugin.prepare(np.zeros((10, 10, 3), dtype=np.float32))


class _Incomplete:
    name = "broken"
    Settings = DfkdeSettings

    @classmethod
    def create(cls, settings, device): ...

    @classmethod
    def load(cls, folder, device, settings=None): ...


def test_registry_checks_the_contract_and_refuses_duplicates(monkeypatch):
    with pytest.raises(PluginError, match="plugin 'broken': missing `min_images` of the inspector plugin contract, "
                                          "a property `min_images`"):
        registry_module.check_plugin("broken", _Incomplete)
    with pytest.raises(PluginError, match="declares name 'dfkde'"):
        registry_module.check_plugin("other", DfkdePlugin)

    duplicate = [
        EntryPoint("dfkde", "inspector_dfkde.plugin:DfkdePlugin", "inspector.plugins"),
        EntryPoint("dfkde", "somewhere.else:Plugin", "inspector.plugins"),
    ]
    monkeypatch.setattr(registry_module, "entry_points", lambda group: duplicate)
    registry_module.registry.cache_clear()
    try:
        with pytest.raises(PluginError, match="two plugins are registered as 'dfkde'"):
            registry_module.registry()
    finally:
        registry_module.registry.cache_clear()


def _edit_settings(folder, **changes):
    import json

    meta = json.loads((folder / "settings.json").read_text())
    meta["settings"].update(changes)
    (folder / "settings.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("changes, named", [
    ({"input_size": 100_000}, "input_size"),
    ({"n_comps": 1_000_000}, "n_comps"),
    ({"layers": ["layer4"] * 3}, "layers"),
    ({"precision": "fp64"}, "precision"),
    ({"surprise": 1}, "surprise"),
    ({"backbone": "vit_giant_patch14_dinov2"}, "parameters"),
])
def test_a_stored_version_with_absurd_settings_is_refused_before_anything_is_built(fitted, tmp_path, monkeypatch,
                                                                                  changes, named):
    """A version's own settings.json builds the backbone: checked with the plugin's own settings model and
    bounds first, so a hostile or mistaken one costs a refusal, not gigabytes."""
    plugin, _ = fitted
    plugin.save(tmp_path)
    _edit_settings(tmp_path, **changes)
    built = []
    monkeypatch.setattr("inspector_dfkde.model.create_backbone", lambda *a, **k: built.append(a) or 1 / 0)
    with pytest.raises(StateError, match=named) as refused:
        DfkdePlugin.load(tmp_path, CPU)
    assert "settings.json" in str(refused.value) and not built


def test_a_state_whose_tensors_do_not_fit_its_settings_is_refused_before_they_are_read(fitted, tmp_path, monkeypatch):
    """The safetensors header is checked against the settings (shapes, dtypes, at most filter_count rows)
    before a tensor is allocated."""
    plugin, _ = fitted
    plugin.save(tmp_path)
    _edit_settings(tmp_path, filter_count=10)  # the state holds 120 rows
    monkeypatch.setattr("inspector_dfkde.state.load_file", lambda *a, **k: 1 / 0)
    with pytest.raises(StateError, match=r"kde.whitened .* over filter_count 10"):
        DfkdePlugin.load(tmp_path, CPU)


# -- the conformal calibration in a stored version ----------------------------------------------------

CALIBRATION_TENSORS = {"calibration.scores", "calibration.k", "calibration.threshold"}


def _header(folder):
    from safetensors import safe_open

    with safe_open(str(folder / "state.safetensors"), "pt") as handle:
        return set(handle.keys())


def _calibrated(fitted, folder, target=0.05):
    """A copy of the fitted plugin calibrated on 40 fresh good parts (the module's own stays uncalibrated)."""
    folder.mkdir()
    fitted[0].save(folder)
    plugin = DfkdePlugin.load(folder, CPU)
    good = np.concatenate([plugin.score(b).raw for b in _batches(plugin, samples.make_images(40, seed=12))])
    from inspector.plugin import Scores

    return plugin, plugin.calibrate(Scores(probability=np.zeros(40), raw=good), 0.5, target)


def test_a_version_saved_before_calibration_scores_were_kept_loads_and_scores_as_before(fitted, tmp_path):
    """Its state has the tensors it always had and nothing else; its probability stays the logistic of its
    stored offset, to the bit."""
    plugin, _ = fitted
    assert plugin.model.calibration is None
    plugin.save(tmp_path)
    assert "kde.whitened" in _header(tmp_path) and not _header(tmp_path) & CALIBRATION_TENSORS
    loaded = DfkdePlugin.load(tmp_path, CPU)
    assert loaded.model.calibration is None
    batch = next(_batches(plugin, samples.make_images(8, defective=True, seed=13)))
    scores = loaded.score(batch)
    s, offset = loaded.model.threshold_steepness, loaded.model.threshold_offset
    logistic = torch.sigmoid(-s * (torch.from_numpy(scores.raw).float() - offset)).double().numpy()
    np.testing.assert_array_equal(scores.probability, logistic)
    np.testing.assert_array_equal(scores.probability, plugin.score(batch).probability)


def test_a_calibrated_version_keeps_its_scale_and_scores_the_same_after_loading(fitted, tmp_path):
    plugin, calibrated = _calibrated(fitted, tmp_path / "a")
    assert (calibrated.promise.n, calibrated.promise.k) == (40, 2)
    (tmp_path / "b").mkdir()
    plugin.save(tmp_path / "b")
    assert _header(tmp_path / "b") == _header(tmp_path / "a") | CALIBRATION_TENSORS
    loaded = DfkdePlugin.load(tmp_path / "b", CPU)
    np.testing.assert_array_equal(loaded.model.calibration.scores, plugin.model.calibration.scores)
    batch = next(_batches(plugin, samples.make_images(8, defective=True, seed=14)))
    before, after = plugin.score(batch), loaded.score(batch)
    np.testing.assert_array_equal(after.probability, before.probability)
    assert after.probability.dtype == np.float64
    np.testing.assert_array_equal(after.probability >= 0.5, after.raw <= calibrated.boundary)


def test_extreme_defects_keep_their_order_instead_of_tying_at_one(fitted, tmp_path):
    """The logistic in float32 gave exactly 1.0 to every log-density some hundreds of nats below the boundary."""
    plugin, calibrated = _calibrated(fitted, tmp_path / "a")
    far = calibrated.boundary - torch.tensor([50.0, 500.0, 5e3, 5e4, 5e5], dtype=torch.float32)
    probability = plugin.model.to_probability(far).numpy()
    assert (np.diff(probability) > 0).all() and (probability < 1).all() and (probability >= 0.5).all()


def test_a_stored_calibration_of_the_wrong_kind_is_refused(fitted, tmp_path):
    from safetensors.torch import load_file, save_file

    plugin, _ = _calibrated(fitted, tmp_path / "a")
    (tmp_path / "b").mkdir()
    plugin.save(tmp_path / "b")
    path = tmp_path / "b" / "state.safetensors"
    tensors = load_file(str(path))
    save_file(tensors | {"calibration.scores": tensors["calibration.scores"].float()}, str(path))
    with pytest.raises(StateError, match=r"calibration.scores is \('F32'.*expected F64"):
        DfkdePlugin.load(tmp_path / "b", CPU)
    save_file({k: v for k, v in tensors.items() if k != "calibration.k"}, str(path))
    with pytest.raises(StateError, match="calibration's tensors but not all"):
        DfkdePlugin.load(tmp_path / "b", CPU)
    save_file(tensors | {"calibration.scores": tensors["calibration.scores"].flip(0)}, str(path))
    with pytest.raises(StateError, match="sorted"):
        DfkdePlugin.load(tmp_path / "b", CPU)


@pytest.mark.parametrize("n_comps", [3, 16, 24, 48])
def test_components_follow_the_images_of_a_fit_up_to_n_comps(n_comps):
    """One component per 2 images of a fit, at most n_comps; a fit of fewer than 4 components' worth is refused
    (or n_comps' worth, when that is fewer), naming the setting."""
    plugin = _plugin(n_comps=n_comps)
    for images in (8, 9, 38, 47, 48, 49, 95, 96, 97, 400):
        assert plugin.components_for(images) == min(n_comps, images // 2), images
    assert plugin.min_images == 2 * min(4, n_comps)
    fixed = plugin.fix_components(38)
    assert (fixed.used, fixed.configured, fixed.images_per_fit, fixed.images_per_component) == (
        min(n_comps, 19), n_comps, 38, 2)
    if n_comps >= 4:
        with pytest.raises(FitError, match=TOO_FEW_FOR_FOUR_COMPONENTS):
            plugin.fix_components(5)
