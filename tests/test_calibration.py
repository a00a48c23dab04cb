"""Cross-fitted calibration: folds, out-of-fold scores, the threshold rule, and the automatic choice.

Every figure is checked against a computation of its own: folds against scikit-learn's KFold (when
installed) and a plain numpy reference, out-of-fold scores against models fitted from the images
without each fold through the plugin's ordinary `fit`, the threshold against the k-th lowest of those
scores (the rule itself: tests/test_conformal.py).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from PIL import Image

from inspector import cli, config
from inspector.imagefiles import find_images, read_image
from inspector.stores import ModelStore
from inspector.tools import samples
from inspector.tools.imagestream import ImageStream
from inspector.tools.progress import Progress
from inspector.tools.refit import (
    AUTO,
    CROSS_FIT,
    CROSS_FIT_BELOW,
    HELD_OUT,
    RefitOptions,
    choose_calibration,
    cross_fit,
    kfold,
    run_refit,
)
from inspector_dfkde.plugin import DfkdePlugin, DfkdeSettings

CPU = torch.device("cpu")
SIZE = 64  # images and model input: small, so the fits take well under a second
ARCHIVE = 40


def reference_folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    """KFold(shuffle=True) written out: shuffle 0..n-1 with RandomState(seed), deal runs of n // k, the first
    n % k runs one longer."""
    indices = np.arange(n)
    np.random.RandomState(seed).shuffle(indices)
    folds, start = [], 0
    for j in range(k):
        size = n // k + (1 if j < n % k else 0)
        folds.append(sorted(indices[start : start + size].tolist()))
        start += size
    return folds


@pytest.mark.parametrize(("n", "k", "seed"), [(40, 5, 0), (41, 5, 0), (23, 4, 7), (652, 5, 3), (5, 5, 1)])
def test_folds_are_kfolds_shuffled_split(n, k, seed):
    folds = kfold(n, k, seed)
    assert [f.tolist() for f in folds] == reference_folds(n, k, seed)
    assert sorted(np.concatenate(folds).tolist()) == list(range(n))
    assert max(map(len, folds)) - min(map(len, folds)) <= 1


@pytest.mark.parametrize(("n", "k", "seed"), [(40, 5, 0), (43, 5, 11), (652, 5, 3)])
def test_folds_are_scikit_learns(n, k, seed):
    model_selection = pytest.importorskip("sklearn.model_selection")
    expected = [np.sort(test) for _, test in model_selection.KFold(k, shuffle=True, random_state=seed).split(
        np.zeros(n))]
    assert [f.tolist() for f in kfold(n, k, seed)] == [f.tolist() for f in expected]


def test_folds_follow_the_seed_and_refuse_impossible_counts():
    assert [f.tolist() for f in kfold(40, 5, 0)] == [f.tolist() for f in kfold(40, 5, 0)]
    assert [f.tolist() for f in kfold(40, 5, 0)] != [f.tolist() for f in kfold(40, 5, 1)]
    for n, k in ((4, 5), (10, 1)):
        with pytest.raises(ValueError, match="folds"):
            kfold(n, k, 0)


def _options(**kwargs) -> RefitOptions:
    return RefitOptions(data=Path("."), model="default", **kwargs)


def test_a_plugin_that_reuses_embeddings_cross_fits_at_any_archive_size():
    # no size switches methods: 1995 images cross-fit as 1994 do (they used to switch to a 200-image hold-out)
    for found in (40, 652, 1994, 1995, 5000, 100_000):
        choice = choose_calibration(_options(), found, 0.1, reuses_embeddings=True)
        assert (choice.method, choice.share, choice.automatic) == (CROSS_FIT, 0.1, True), found
    assert choose_calibration(_options(calibration=AUTO, held_out_share=0.5), 600, 0.1,
                              reuses_embeddings=True) == (CROSS_FIT, 0.5, True)


def test_any_other_plugin_cross_fits_below_200_held_out_images():
    # round(share x found) >= 200 holds out; with 10% that is from 1995 images on
    assert CROSS_FIT_BELOW == 200
    for found, method in ((40, CROSS_FIT), (652, CROSS_FIT), (1994, CROSS_FIT), (1995, HELD_OUT), (5000, HELD_OUT)):
        choice = choose_calibration(_options(), found, 0.1, reuses_embeddings=False)
        assert (choice.method, choice.share, choice.automatic) == (method, 0.1, True), found
    assert choose_calibration(_options(), 800, 0.25, reuses_embeddings=False).method == HELD_OUT
    assert choose_calibration(_options(), 100_000, 0.0, reuses_embeddings=False).method == CROSS_FIT


@pytest.mark.parametrize("reuses", [True, False])
def test_a_given_share_or_method_is_used_as_asked(reuses):
    def choose(found, **kwargs):
        return choose_calibration(_options(**kwargs), found, 0.1, reuses_embeddings=reuses)

    assert choose(40, held_out_share=0.3) == (HELD_OUT, 0.3, False)
    assert choose(5000, held_out_share=0.25) == (HELD_OUT, 0.25, False)
    assert choose(5000, calibration=CROSS_FIT) == (CROSS_FIT, 0.1, False)
    assert choose(40, calibration=HELD_OUT) == (HELD_OUT, 0.1, False)
    assert choose(600, calibration=AUTO, held_out_share=0.5) == (CROSS_FIT if reuses else HELD_OUT, 0.5, True)
    assert choose(600, calibration=AUTO, held_out_share=0.2) == (CROSS_FIT, 0.2, True)


# --- out-of-fold scores -----------------------------------------------------------------------


def _settings(**overrides) -> DfkdeSettings:
    # no localisation maps: their own backbone pass would double each fit, and nothing here is about them
    # (a refit that draws them: tests/test_worker_regions.py)
    base = {"backbone": "resnet18", "layers": ["layer4"], "weights": "none", "precision": "fp32",
            "input_size": SIZE, "n_comps": 4, "localisation_maps": False}
    return DfkdeSettings(**(base | overrides))


def _write(root: Path, n: int, seed: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(samples.make_images(n, seed=seed, size=SIZE)):
        Image.fromarray(image).save(root / f"{i:03d}.png")
    return find_images(root)


def _batches(plugin, paths, size=8):
    prepared = [plugin.prepare(read_image(path, 10**8)) for path in paths]
    for start in range(0, len(prepared), size):
        yield torch.stack(prepared[start : start + size])


class ContractOnly:
    """A DFKDE plugin seen only through the plugin contract: no embeddings to reuse."""

    def __init__(self, inner: DfkdePlugin) -> None:
        self.inner = inner
        self.prepare, self.fit, self.score = inner.prepare, inner.fit, inner.score
        self.min_images = inner.min_images


def _cross_fit(plugin, create, paths, folds):
    with Progress(len(paths) * (len(folds) + 1), "test", interval_s=1e9) as progress:
        return cross_fit(plugin, create, paths, folds, lambda: ImageStream(plugin.prepare, 2, 10**8, progress), 8)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> list[Path]:
    return _write(tmp_path_factory.mktemp("crossfit") / "good", 30, seed=21)


def out_of_fold(plugin, paths: list[Path], folds, final_scale: bool = False) -> np.ndarray:
    """Each fold scored by `plugin` fitted, through its ordinary `fit` (which replaces what it held), on the
    images of the other folds. `final_scale`: moved to the scale of the model fitted on every image, as the
    served model's scores are: + n_comps x log(that scale / the fold's own)."""
    raw = np.empty(len(paths))
    if final_scale:
        plugin.fit(_batches(plugin, paths))
        largest = float(plugin.model.max_length)
    for fold in folds:
        plugin.fit(_batches(plugin, [p for i, p in enumerate(paths) if i not in set(fold)]))
        raw[list(fold)] = np.concatenate([plugin.score(b).raw for b in _batches(plugin, [paths[i] for i in fold])])
        if final_scale:
            raw[list(fold)] += plugin.model.n_components * math.log(largest / float(plugin.model.max_length))
    return raw


@pytest.fixture(scope="module")
def reference(archive):
    folds = kfold(len(archive), 5, 0)
    return folds, out_of_fold(DfkdePlugin.create(_settings(), CPU), archive, [f.tolist() for f in folds])


@pytest.fixture(scope="module")
def reference_at_final_scale(archive, reference):
    folds, _ = reference
    return out_of_fold(DfkdePlugin.create(_settings(), CPU), archive, [f.tolist() for f in folds], final_scale=True)


def test_out_of_fold_scores_are_those_of_models_fitted_without_the_fold(archive, reference, reference_at_final_scale):
    folds, expected = reference[0], reference_at_final_scale
    plugin = DfkdePlugin.create(_settings(), CPU)
    crossed = _cross_fit(plugin, lambda: DfkdePlugin.create(_settings(), CPU), archive, folds)
    assert crossed.reused_embeddings and crossed.used == len(archive)
    assert crossed.positions.tolist() == list(range(len(archive)))
    np.testing.assert_allclose(crossed.scores.raw, expected, rtol=1e-5, atol=1e-4)
    # the model kept is the one `fit` gives from every image
    whole = DfkdePlugin.create(_settings(), CPU)
    whole.fit(_batches(whole, archive))
    torch.testing.assert_close(plugin.model.kde_model.whitened, whole.model.kde_model.whitened)
    assert crossed.report.images == len(archive)


def test_a_plugin_without_embeddings_is_fitted_afresh_per_fold_to_the_same_scores(archive, reference):
    folds, expected = reference
    plugin = ContractOnly(DfkdePlugin.create(_settings(), CPU))
    crossed = _cross_fit(plugin, lambda: ContractOnly(DfkdePlugin.create(_settings(), CPU)), archive, folds)
    assert not crossed.reused_embeddings
    np.testing.assert_allclose(crossed.scores.raw, expected, rtol=1e-5, atol=1e-4)


def test_unreadable_files_drop_out_of_their_folds(tmp_path):
    paths = _write(tmp_path / "good", 24, seed=5)
    (tmp_path / "good" / "010.png").write_bytes(b"broken")
    plugin = DfkdePlugin.create(_settings(), CPU)
    folds = kfold(len(paths), 4, 0)
    crossed = _cross_fit(plugin, lambda: DfkdePlugin.create(_settings(), CPU), paths, folds)
    assert crossed.used == 23 and [p.name for p, _ in crossed.skipped] == ["010.png"]
    assert 10 not in crossed.positions.tolist() and len(crossed.scores.raw) == 23


# --- refit with cross-fitted calibration --------------------------------------------------------


def _config(root: Path, **dfkde) -> Path:
    lines = ['device = "cpu"', "[store]", f'path = "{root / "models"}"', "[refit]", "batch_size = 16",
             "[plugins.dfkde]", f"input_size = {SIZE}", "localisation_maps = false",  # as in _settings
             *(f"{k} = {v!r}".replace("'", '"') for k, v in dfkde.items())]
    path = root / "inspector.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def small_refit(tmp_path_factory):
    """The shipped backbone, refitted from 40 good images: too few to hold out 20."""
    root = tmp_path_factory.mktemp("small")
    paths = _write(root / "good", ARCHIVE, seed=31)
    settings = config.load(_config(root))
    result = run_refit(settings, RefitOptions(data=root / "good", model="default", target_false_reject=0.05,
                                              announce=False))
    return root, paths, settings, result


def test_refit_on_40_images_cross_fits_and_says_how(small_refit):
    root, _, _, result = small_refit
    manifest = ModelStore(root / "models").info("default").manifest
    calibration = manifest["calibration"]
    assert calibration["method"] == "cross-fit" and calibration["automatic"] is True
    assert calibration["folds"] == 20 and calibration["fold_seed"] == 0 and calibration["reused_embeddings"]
    assert calibration["fold_order"] == "random"
    assert calibration["held_out"] == ARCHIVE and calibration["false_reject_resolution"] == pytest.approx(1 / 40)
    assert calibration["fold_seconds"] >= 0
    assert manifest["images"] == {"found": ARCHIVE, "used": ARCHIVE, "embeddings": ARCHIVE, "held_out": 0,
                                  "skipped": 0, "skipped_reasons": {},
                                  "groups": {"groups": ARCHIVE, "images": ARCHIVE, "images_with_twin": 0,
                                             "largest_group": 1, "merged_by": {"embeddings": 0}},
                                  "decoded": {"jpeg": 0, "full": ARCHIVE},  # PNG files: decoded in full
                                  "components": {"configured": 24, "used": 19, "images_per_fit": 38,
                                                 "images_per_component": 2}}
    assert result.used == ARCHIVE and result.held_out == 0


def test_the_threshold_is_the_kth_lowest_out_of_fold_score_and_the_version_keeps_them(small_refit):
    """Which scores are out of fold is test_out_of_fold_scores_are_those_of_models_fitted_without_the_fold's
    concern; here, what calibration makes of them."""
    root, paths, _, _ = small_refit
    calibration = ModelStore(root / "models").info("default").manifest["calibration"]
    k = math.floor(0.05 * (ARCHIVE + 1))  # split-conformal: 2 of 40 for 5%, an expected 2/41 = 4.9%
    assert (calibration["n"], calibration["k"]) == (ARCHIVE, k) == (40, 2)
    assert calibration["expected_false_reject"] == pytest.approx(2 / 41)
    assert calibration["held_out_false_reject"] == pytest.approx(2 / 40)
    # the stored model keeps the 40 out-of-fold scores, sorted, and puts probability 0.5 on the 2nd lowest
    stored = DfkdePlugin.load(ModelStore(root / "models").load_path("default").path, CPU)
    scores = stored.model.calibration.scores
    assert scores.dtype == np.float64 and len(scores) == 40 and (np.diff(scores) >= 0).all()
    assert calibration["boundary_log_density"] == scores[k - 1]
    quantiles = calibration["held_out_log_density_quantiles"]
    assert quantiles["0.5"] == pytest.approx(np.quantile(scores, 0.5))
    steepness = calibration["threshold_steepness"]
    assert calibration["threshold_offset"] == pytest.approx(scores[k - 1] + math.log(0.5 / 0.5) / steepness)
    at = float(calibration["boundary_log_density"])
    assert stored.model.to_probability(torch.tensor([at], dtype=torch.float64)).item() == 0.5
    assert stored.model.to_probability(torch.tensor([np.nextafter(at, np.inf)], dtype=torch.float64)).item() < 0.5
    scored = stored.score(next(_batches(stored, paths)))
    np.testing.assert_array_equal(scored.probability >= 0.5, scored.raw <= at)


@pytest.fixture
def inspector(monkeypatch, capsys):
    """`inspector ARGS` in this process (a subprocess would import torch again): (exit status, stdout, stderr)."""
    for name in [k for k in os.environ if k.startswith("INSPECTOR_")]:
        monkeypatch.delenv(name)

    def run(*args, cwd):
        monkeypatch.chdir(cwd)
        status = cli.main(list(args))
        out, err = capsys.readouterr()
        return status, out, err

    return run


def test_the_command_reports_the_method_and_what_the_threshold_promises(small_refit, inspector):
    root, _, _, _ = small_refit
    status, out, err = inspector("refit", "--data", "good", "--target-false-reject", "0.05", "--no-announce",
                                 cwd=root)
    assert status == 0, err
    assert "cross-fit (automatic choice): " in out and " folds over 40 images" in out
    assert ("expected false-reject rate on fresh good parts: 4.88% (the 2nd lowest of 40 scores, "
            "k = floor(0.05 x 41) = 2; k/(n+1), at most the target)") in out
    low, high = (scipy.stats.beta.ppf(p, 2, 39) for p in (0.05, 0.95))
    assert f"this threshold's own rate: {low:.2%} to {high:.2%} (5%-95% of Beta(2, 39))" in out
    # the default 0.5% cannot be promised from 40 images: refused, with the number needed, nothing stored
    before = [v.version for v in ModelStore(root / "models").versions("default")]
    status, _, err = inspector("refit", "--data", "good", "--no-announce", cwd=root)
    # said before anything is fitted, with the target the 40 images can promise (k = floor(0.0244 x 41) = 1)
    assert status == 1 and "a false-reject rate of 0.005 needs at least 199 calibration images" in err, err
    assert "found 40 image files" in err and "--target-false-reject 0.0244" in err and "Traceback" not in err
    assert [v.version for v in ModelStore(root / "models").versions("default")] == before
    status, _, err = inspector("refit", "--data", "good", "--calibration", "held-out", "--no-announce", cwd=root)
    assert status == 1 and "a hold-out of 10% needs at least 1986 readable images" in err
    assert "--calibration cross-fit --target-false-reject 0.0244" in err
    status, _, err = inspector("refit", "--data", "good", "--calibration", "cross-fit", "--held-out", "0.2",
                               cwd=root)
    assert status == 2 and "give one of them" in err
    status, _, err = inspector("refit", "--data", "good", "--folds", "1", cwd=root)
    assert status == 2 and "--folds 1" in err


def test_too_few_images_for_a_fold_fit_is_a_clear_error(tmp_path, inspector):
    _write(tmp_path / "good", 24, seed=3)
    _config(tmp_path, n_comps=16)
    # the automatic 20 folds leave 22 images per fold's fit: they carry 11 of the 16 components, and refit says so
    status, out, err = inspector("refit", "--data", "good", "--target-false-reject", "0.05", "--no-announce",
                                 cwd=tmp_path)
    assert status == 0, err
    assert "components: 11 of the 16 configured: 22 images per fit carry 11 at 2 images per component" in out
    components = ModelStore(tmp_path / "models").info("default").manifest["images"]["components"]
    assert components == {"configured": 16, "used": 11, "images_per_fit": 22, "images_per_component": 2}
    stored = DfkdePlugin.load(ModelStore(tmp_path / "models").load_path("default").path, CPU)
    assert stored.model.n_components == 11  # a version of fewer components loads, its shapes checked against 11
