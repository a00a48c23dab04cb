"""The plugin contract is written once, in inspector/plugin.py: `check_plugin` refuses a class that lacks a
required member or has any member, required or optional, of the wrong kind or parameters, naming the plugin,
the member and what was expected; it accepts one without the optional members, whose features are then
cleanly unavailable."""

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

from inspector import plugin as contract
from inspector.errors import PluginError
from inspector.tools import refit
from inspector_dfkde.plugin import DfkdePlugin
from inspector_null.plugin import NullPlugin, NullSettings

CPU = torch.device("cpu")
REQUIRED = sorted(name for name in vars(contract.Plugin)
                  if not name.startswith("_") and name not in contract.OPTIONAL_MEMBERS
                  and (inspect.isfunction(vars(contract.Plugin)[name])
                       or isinstance(vars(contract.Plugin)[name], (classmethod, property))))
ABILITY_OF = {member: ability for ability in contract.ABILITIES
              for member in vars(ability) if not member.startswith("_")}


def without(*members: str) -> type:
    """DfkdePlugin's own class body less `members`: a class the contract is checked on, never instantiated."""
    body = {k: v for k, v in vars(DfkdePlugin).items() if k not in {*members, "__dict__", "__weakref__"}}
    return type("Partial", (), body)


def with_member(name: str, value) -> type:
    """DfkdePlugin's class body with `name` replaced."""
    return type("Partial", (), {k: v for k, v in vars(DfkdePlugin).items()
                                if k not in {"__dict__", "__weakref__"}} | {name: value})


def test_the_protocol_names_what_the_worker_and_tools_call():
    assert {"create", "load", "min_images", "describe", "prepare", "fit", "score", "calibrate", "save"} <= set(REQUIRED)
    assert "decode_size" in vars(contract.Plugin) and "decode_size" not in REQUIRED
    assert "explain" in vars(contract.Plugin) and "explain" not in REQUIRED
    assert set(ABILITY_OF) == {"embed", "fit_embeddings", "score_embeddings", "components", "fix_components"}


def test_the_shipped_plugins_pass_and_dfkde_has_every_optional_member():
    assert contract.check_plugin("dfkde", DfkdePlugin) is DfkdePlugin
    assert contract.check_plugin("null", NullPlugin) is NullPlugin
    assert all(hasattr(DfkdePlugin, m) for m in (*contract.OPTIONAL_MEMBERS, *ABILITY_OF))
    assert not any(hasattr(NullPlugin, m) for m in (*contract.OPTIONAL_MEMBERS, *ABILITY_OF))


@pytest.mark.parametrize("member", REQUIRED)
def test_a_plugin_missing_a_member_of_the_protocol_is_refused_by_name(member):
    with pytest.raises(PluginError, match=f"plugin 'dfkde': missing `{member}` of the inspector plugin contract"):
        contract.check_plugin("dfkde", without(member))


def test_a_classmethod_of_the_protocol_must_stay_a_classmethod():
    broken = with_member("load", lambda self, folder, device, settings=None: None)
    with pytest.raises(PluginError, match=r"plugin 'dfkde': `load` \(required\) must be a classmethod "
                                          r"`load\(cls, folder, device, settings=\.\.\.\)`; Partial has a method"):
        contract.check_plugin("dfkde", broken)


def _calibrate(self, held_out, threshold):  # the target left out
    ...


@classmethod
def _load_without_settings(cls, folder, device):  # callers pass settings=
    ...


@pytest.mark.parametrize(("member", "wrong", "expected"), [
    ("calibrate", _calibrate, "a method `calibrate(self, held_out, threshold, target_false_reject)`"),
    ("load", _load_without_settings, "a classmethod `load(cls, folder, device, settings=...)`"),
    ("min_images", 8, "a property `min_images`"),
    ("score", lambda self, images: None, "a method `score(self, batch)`"),
])
def test_a_required_member_of_the_wrong_signature_is_refused_naming_what_was_expected(member, wrong, expected):
    with pytest.raises(PluginError) as refused:
        contract.check_plugin("dfkde", with_member(member, wrong))
    assert f"plugin 'dfkde': `{member}` (required) must be {expected}" in str(refused.value)


# One wrong implementation per optional member, each with what the contract expects, written out here rather
# than read from the contract; a member added to the contract without a row here fails the completeness test.
def _explain_of_images(self, images): ...
def _calibration_images_of_nothing(self): ...
def _pooled_with_a_size(self, embeddings, size): ...
def _fold_without_every(self, embeddings): ...
def _embed_of_images(self, images): ...
def _fit_embeddings_with_a_seed(self, embeddings, seed): ...
def _score_embeddings_of_nothing(self): ...
def _fix_components_of_a_count(self, count): ...


WRONG = {
    "decode_size": (lambda self: (128, 128), "a property `decode_size`"),
    "explain": (_explain_of_images, "a method `explain(self, batch)`"),
    "draws_maps": (True, "a property `draws_maps`"),
    "region_level": (staticmethod(lambda: 0.5), "a property `region_level`"),
    "calibration_images": (_calibration_images_of_nothing, "a method `calibration_images(self, target_false_reject)`"),
    "min_images_reason": (lambda self: "why", "a property `min_images_reason`"),
    "pooled": (_pooled_with_a_size, "a method `pooled(self, embeddings)`"),
    "fit_fold_embeddings": (_fold_without_every, "a method `fit_fold_embeddings(self, embeddings, every)`"),
    "embed": (_embed_of_images, "a method `embed(self, batch)`"),
    "fit_embeddings": (_fit_embeddings_with_a_seed, "a method `fit_embeddings(self, embeddings)`"),
    "score_embeddings": (_score_embeddings_of_nothing, "a method `score_embeddings(self, embeddings)`"),
    "components": (lambda self: None, "a property `components`"),
    "fix_components": (_fix_components_of_a_count, "a method `fix_components(self, images)`"),
}


def test_every_optional_member_has_a_wrong_signature_to_test():
    assert set(WRONG) == set(contract.OPTIONAL_MEMBERS) | set(ABILITY_OF)


@pytest.mark.parametrize("member", sorted(WRONG))
def test_an_optional_member_of_the_wrong_signature_is_refused_naming_plugin_member_and_expected(member):
    wrong, expected = WRONG[member]
    with pytest.raises(PluginError) as refused:
        contract.check_plugin("dfkde", with_member(member, wrong))
    message = str(refused.value)
    assert message.startswith(f"plugin 'dfkde': `{member}` (")
    assert f"must be {expected}; Partial has " in message
    if member in ABILITY_OF:
        assert f"of the optional ability {ABILITY_OF[member].__name__}" in message


@pytest.mark.parametrize("member", sorted(WRONG))
def test_a_plugin_without_an_optional_member_is_accepted(member):
    ability = ABILITY_OF.get(member)
    gone = [m for m, a in ABILITY_OF.items() if a is ability] if ability else [member]
    assert contract.check_plugin("dfkde", without(*gone)).__name__ == "Partial"


@pytest.mark.parametrize("member", sorted(ABILITY_OF))
def test_part_of_an_ability_is_refused_naming_what_it_lacks(member):
    ability = ABILITY_OF[member]
    with pytest.raises(PluginError, match=rf"plugin 'dfkde': has .* of the optional ability {ability.__name__}, "
                                          rf"which needs all of .*; missing `{member}`"):
        contract.check_plugin("dfkde", without(member))


# -- without them, each feature is cleanly unavailable ---------------------------------------------------------


@pytest.fixture
def null():
    return NullPlugin.create(NullSettings(probability=0.25), CPU)


def test_without_decode_size_images_decode_at_full_size(null):
    assert contract.decode_size(null) is None


def test_without_explain_there_are_no_maps_and_asking_for_them_says_so(null):
    assert not contract.can_explain(null)
    with pytest.raises(PluginError, match="'null' draws no anomaly maps"):
        contract.anomaly_maps(null, torch.zeros(1, 1), [(8, 8)])


def test_without_draws_maps_a_plugin_with_explain_always_draws_them():
    class Flat:
        def explain(self, batch): ...

    class Undrawn(Flat):
        draws_maps = False  # an instance's say (DFKDE: a version saved before maps existed)

    assert contract.can_explain(Flat()) and not contract.can_explain(Undrawn())


def test_without_region_level_there_are_no_regions(null):
    assert contract.region_level(null) is None


def test_without_calibration_images_refit_asks_only_for_its_own_minimum(null):
    assert contract.calibration_images(null, 0.005) is None
    options = refit.RefitOptions(Path("good"), "default", target_false_reject=0.005, calibration="cross-fit")
    assert refit.images_needed(options, null.min_images, 0.1, reuses_embeddings=False) == refit.MIN_HELD_OUT


def test_without_min_images_reason_refit_gives_none(null):
    assert contract.min_images_reason(null) == ""


def test_without_components_a_cross_fit_fixes_none(null):
    assert not isinstance(null, contract.ChoosesComponents)
    assert refit._fix_components(null, 40) is None


def test_a_calibrate_that_returns_no_calibration_is_refused_naming_the_plugin(null):
    class Untyped(NullPlugin):
        def calibrate(self, held_out, threshold, target_false_reject):
            return {"threshold": threshold}

    plugin = Untyped(NullSettings())
    held_out = contract.Scores(probability=np.zeros(20), raw=np.zeros(20))
    with pytest.raises(PluginError, match="plugin 'null': `calibrate` must return an inspector.plugin.Calibration, "
                                          "got dict"):
        contract.calibrate(plugin, held_out, 0.5, 0.01)
    assert contract.calibrate(null, held_out, 0.5, 0.01).threshold == 0.5


class _Rows:
    """A plugin that ReusesEmbeddings: an image's row is its pixels' mean; the model is the mean of the rows it
    was fitted on, and a score is the distance to it. Counts its fits."""

    name = "rows"

    def __init__(self):
        self.fits, self.fold_fits, self.centre = 0, 0, 0.0

    def embed(self, batch):
        return batch.float().mean(dim=(1, 2, 3))[:, None]

    def fit_embeddings(self, embeddings):
        self.fits += 1
        self.centre = float(embeddings.mean())
        return contract.FitReport(images=len(embeddings), embeddings=len(embeddings))

    def score_embeddings(self, embeddings):
        raw = (embeddings[:, 0] - self.centre).abs().double().numpy()
        return contract.Scores(probability=raw / (1 + raw), raw=raw)


class _Folding(_Rows):
    def fit_fold_embeddings(self, embeddings, every):
        self.fold_fits += 1
        return self.fit_embeddings(embeddings)


class _Stream:
    """ImageStream's indexed batches of 24 one-pixel images of values 0..23."""

    used, skipped = 24, []

    def indexed_batches(self, paths, size):
        for start in range(0, len(paths), size):
            indices = list(range(start, min(start + size, len(paths))))
            yield indices, torch.tensor(indices, dtype=torch.uint8)[:, None, None, None].expand(-1, 3, 1, 1)


@pytest.mark.parametrize("plugin_class", [_Rows, _Folding])
def test_without_fit_fold_embeddings_or_pooled_a_cross_fit_fits_each_fold_with_fit_embeddings(plugin_class):
    plugin = plugin_class()
    assert isinstance(plugin, contract.ReusesEmbeddings)
    paths = [Path(f"{i}.png") for i in range(24)]
    folds = [np.arange(j, 24, 4) for j in range(4)]
    crossed = refit.cross_fit(plugin, plugin_class, paths, folds, _Stream, batch_size=5)
    folding = plugin_class is _Folding
    assert (plugin.fits, plugin.fold_fits) == (5, 4 if folding else 0)  # four folds and the final fit
    assert crossed.reused_embeddings and plugin.centre == pytest.approx(11.5)
    # each image scored by the mean of the other folds: fold j holds j, j+4, ...; the rest average to
    # (276 - sum of fold j) / 18
    for j, fold in enumerate(folds):
        centre = (276 - fold.sum()) / 18
        np.testing.assert_allclose(crossed.scores.raw[np.isin(crossed.positions, fold)], np.abs(fold - centre),
                                   rtol=1e-6)  # float32 means
    planned = refit.cross_fit(plugin_class(), plugin_class, paths, refit.FoldPlan({}, 4, 0, measure=True),
                              _Stream, batch_size=5)  # twins measured on the whole rows: none here
    assert len(planned.folds) == 4 and planned.grouping.groups == 24


def test_maps_from_a_plugin_without_explain_are_a_clear_error():
    class Blind:
        name = "blind"

    with pytest.raises(PluginError, match="'blind' draws no anomaly maps"):
        contract.anomaly_maps(Blind(), torch.zeros(1, 3, 8, 8), [(8, 8)])


def test_maps_come_one_per_image_at_the_asked_sizes():
    class Flat:
        """Scores each image by its mean; its map is the image's first channel, resized by repetition."""

        def explain(self, batch):
            raw = batch.float().mean(dim=(1, 2, 3)).numpy()
            scores = contract.Scores(probability=raw / 255.0, raw=raw)

            def map_of(index, size):
                width, height = size
                return np.full((height, width), raw[index] / 255.0, np.float32)

            return contract.Explained(scores, map_of)

    batch = torch.stack([torch.full((3, 4, 4), 51, dtype=torch.uint8), torch.full((3, 4, 4), 204, dtype=torch.uint8)])
    scores, maps = contract.anomaly_maps(Flat(), batch, [(5, 3), (2, 7)])
    np.testing.assert_allclose(scores.raw, [51.0, 204.0])
    assert [m.shape for m in maps] == [(3, 5), (7, 2)]
    np.testing.assert_allclose([m.max() for m in maps], [0.2, 0.8], rtol=1e-6)
    with pytest.raises(ValueError, match="1 sizes for a batch of 2"):
        contract.anomaly_maps(Flat(), batch, [(5, 3)])


def test_a_calibration_s_manifest_record_keeps_the_names_it_always_had():
    promise = contract.FalseRejectPromise(n=40, k=2, expected=2 / 41, low=0.01, high=0.12, distribution="Beta(2, 39)")
    calibrated = contract.Calibration(threshold=0.5, target_false_reject=0.05, held_out_false_reject=0.05,
                                      boundary=-3.0, score_name="log-density", promise=promise,
                                      figures={"boundary_log_density": -3.0})
    assert calibrated.manifest() == {
        "n": 40, "k": 2, "expected_false_reject": 2 / 41,
        "false_reject_interval": {"low_quantile": 0.05, "high_quantile": 0.95, "low": 0.01, "high": 0.12,
                                  "distribution": "Beta(2, 39)"},
        "target_false_reject": 0.05, "threshold": 0.5, "held_out_false_reject": 0.05, "boundary_log_density": -3.0,
    }
    clash = contract.Calibration(threshold=0.5, target_false_reject=0.05, held_out_false_reject=0.0,
                                 figures={"threshold": 0.4})
    with pytest.raises(PluginError, match="repeat the typed fields threshold"):
        clash.manifest()
