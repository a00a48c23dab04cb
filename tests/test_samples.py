"""The synthetic line: deterministic, well-formed, defects local, goods varied.

Other tests lean on these images (a DFKDE AUROC test, the demo), so what is
checked here is what they assume: a seed fixes every pixel, defects are local
and visible, and good frames carry real nuisance rather than being copies.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from inspector.tools import samples
from inspector.tools.samples import (
    DEFECT_KINDS,
    defective_part,
    defective_part_and_mask,
    good_part,
    make_images,
    write_folder,
)


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def changed(a: np.ndarray, b: np.ndarray, threshold: int = 3) -> np.ndarray:
    """Pixels where two frames differ by more than `threshold` grey levels in any channel."""
    return (np.abs(a.astype(np.int16) - b.astype(np.int16)) > threshold).any(axis=-1)


# -- determinism -----------------------------------------------------------------------


def test_same_seed_same_pixels():
    assert np.array_equal(good_part(rng(7)), good_part(rng(7)))
    for kind in (None, *DEFECT_KINDS):
        assert np.array_equal(defective_part(rng(7), kind=kind), defective_part(rng(7), kind=kind))
    for defective in (False, True):
        first = make_images(4, defective=defective, seed=3, size=64)
        again = make_images(4, defective=defective, seed=3, size=64)
        assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))


def test_different_seed_different_pixels():
    assert not np.array_equal(good_part(rng(1)), good_part(rng(2)))
    assert not np.array_equal(make_images(1, seed=1)[0], make_images(1, seed=2)[0])
    bad_1, bad_2 = make_images(1, defective=True, seed=1)[0], make_images(1, defective=True, seed=2)[0]
    assert not np.array_equal(bad_1, bad_2)


def test_good_and_defective_streams_are_independent():
    # A defective frame that were a training frame plus a mark would make detectors look
    # better or worse than they are; make_images keeps the two streams apart.
    good = make_images(3, seed=0, size=128)
    bad = make_images(3, defective=True, seed=0, size=128)
    for g, b in zip(good, bad, strict=True):
        assert changed(g, b).mean() > 0.3


# -- form ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64, 100, 256])
def test_shape_dtype_range(size):
    for image in (good_part(rng(0), size), defective_part(rng(0), size)):
        assert image.shape == (size, size, 3)
        assert image.dtype == np.uint8
        assert image.flags.c_contiguous
        # a part on a darker belt: both ends of the range are used, neither is flooded
        assert image.min() < 60 and image.max() > 120
        assert (image == 255).mean() < 0.01 and (image == 0).mean() < 0.01


def test_default_size_is_256():
    assert good_part(rng(0)).shape == (256, 256, 3)
    assert make_images(1)[0].shape == (256, 256, 3)


@pytest.mark.parametrize("size", [0, 31, 64.0, True, "256"])
def test_bad_size_is_refused(size):
    with pytest.raises(ValueError, match="size"):
        good_part(rng(0), size)


def test_make_images_counts():
    assert make_images(0) == []
    assert len(make_images(7, defective=True, size=32)) == 7
    with pytest.raises(ValueError, match="n must be"):
        make_images(-1)


# -- defects ---------------------------------------------------------------------------


def test_defect_kinds_are_distinct_and_enough():
    assert len(DEFECT_KINDS) >= 4
    assert len(set(DEFECT_KINDS)) == len(DEFECT_KINDS)


@pytest.mark.parametrize("kind", DEFECT_KINDS)
@pytest.mark.parametrize("size", [64, 256])
def test_defect_is_local_and_visible(kind, size):
    # Same generator state: the same part under the same light, so only the defect differs.
    for seed in range(12):
        good = good_part(rng(seed), size)
        bad = defective_part(rng(seed), size, kind)
        mask = changed(good, bad)
        assert 0.001 <= mask.mean() <= 0.15, (kind, seed, mask.mean())
        rows, cols = np.nonzero(mask)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert box <= 0.25 * size * size, (kind, seed, box)  # one region, not scattered all over
        assert changed(good, bad, 0).mean() <= 0.15  # faint anti-aliasing included


def test_random_kind_is_a_defect():
    for seed in range(10):
        assert changed(good_part(rng(seed)), defective_part(rng(seed))).mean() >= 0.001


def test_unknown_kind_names_the_kinds():
    with pytest.raises(ValueError) as caught:
        defective_part(rng(0), kind="dent")
    message = str(caught.value)
    assert "dent" in message
    assert all(kind in message for kind in DEFECT_KINDS)


# -- nuisance --------------------------------------------------------------------------


def test_good_parts_vary():
    images = make_images(6, seed=4, size=128)
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert changed(images[i], images[j]).mean() > 0.05
    # pose: the part's centre of brightness moves by some pixels, not by tens
    centres = []
    for image in images:
        bright = image.mean(axis=-1) > 80
        rows, cols = np.nonzero(bright)
        centres.append((rows.mean(), cols.mean()))
    spread = np.ptp(np.array(centres), axis=0)
    assert (spread > 0.3).all() and (spread < 10).all(), spread
    # light: the mean level moves by a few percent
    means = np.array([image.mean() for image in images])
    assert 0.005 < np.ptp(means) / means.mean() < 0.2


def test_generation_is_fast():
    # a guard against an order-of-magnitude slowdown, not a benchmark: about 3 ms is usual
    make_images(2)  # warm caches
    start = time.perf_counter()
    make_images(20, defective=True)
    assert (time.perf_counter() - start) / 20 < 0.03


# -- separability without a CNN --------------------------------------------------------


def local_deviation(image: np.ndarray) -> float:
    """The largest local departure from a median-filtered image: a crude spot detector."""
    grey = ndimage.gaussian_filter(image.astype(np.float32).mean(axis=-1), 1.0)
    return float(np.abs(grey - ndimage.median_filter(grey, size=5)).max())


def test_defects_stand_out_locally():
    good = np.array([local_deviation(x) for x in make_images(25, seed=5, size=128)])
    bad = np.array([local_deviation(x) for x in make_images(25, defective=True, seed=5, size=128)])
    assert bad.mean() > 1.25 * good.mean(), (good.mean(), bad.mean())


# -- folders ---------------------------------------------------------------------------


def test_write_folder(tmp_path):
    counts = write_folder(tmp_path / "line", 3, 2, seed=1, size=64)
    assert counts == {"good": 3, **{kind: 2 for kind in DEFECT_KINDS}}
    for folder, n in counts.items():
        files = sorted((tmp_path / "line" / folder).iterdir())
        assert len(files) == n
        for path in files:
            assert path.suffix == ".png"
            with Image.open(path) as image:
                assert image.size == (64, 64) and image.mode == "RGB"
    # png is lossless: the good folder holds exactly make_images' frames
    stored = np.asarray(Image.open(tmp_path / "line" / "good" / "000.png"))
    assert np.array_equal(stored, make_images(1, seed=1, size=64)[0])


def test_write_folder_good_only_and_other_format(tmp_path):
    assert write_folder(tmp_path, 2, size=48, fmt="jpg") == {"good": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good"]
    with Image.open(tmp_path / "good" / "001.jpg") as image:
        assert image.format == "JPEG" and image.size == (48, 48)


def test_write_folder_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="format"):
        write_folder(tmp_path, 1, fmt="gif")
    with pytest.raises(ValueError, match="counts"):
        write_folder(tmp_path, -1)


def test_kinds_have_their_own_stream(tmp_path):
    # asking for more of every kind leaves the first frames of each as they were
    write_folder(tmp_path / "a", 0, 1, seed=2, size=48)
    write_folder(tmp_path / "b", 0, 2, seed=2, size=48)
    for kind in DEFECT_KINDS:
        a = np.asarray(Image.open(tmp_path / "a" / kind / "000.png"))
        b = np.asarray(Image.open(tmp_path / "b" / kind / "000.png"))
        assert np.array_equal(a, b)


def test_module_needs_no_torch(tmp_path):
    # the line must run where torch is not installed (benchmarks, camera simulator)
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy\n"
        "from inspector.tools import samples\n"
        "samples.write_folder(__import__('pathlib').Path(sys.argv[1]), 1, 1, size=48)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=60)


def test_a_sample_line_is_mvtec_shaped_deterministic_and_keeps_test_frames_out_of_training(tmp_path):
    first = samples.write_line(tmp_path / "a", train=6, test=3, defective_per_kind=2, seed=4, size=64)
    samples.write_line(tmp_path / "b", train=6, test=3, defective_per_kind=2, seed=4, size=64)
    assert first == {"train": {"good": 6},
                     "test": {"good": 3, **{kind: 2 for kind in samples.DEFECT_KINDS}},
                     "ground_truth": {kind: 2 for kind in samples.DEFECT_KINDS}}
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 6 + 3 + 2 * len(samples.DEFECT_KINDS) + 2 * len(samples.DEFECT_KINDS)  # masks too
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    train = {(tmp_path / "a" / "train" / "good" / f"{i:03d}.png").read_bytes() for i in range(6)}
    test = {(tmp_path / "a" / "test" / "good" / f"{i:03d}.png").read_bytes() for i in range(3)}
    assert not train & test


# -- ground truth ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DEFECT_KINDS)
@pytest.mark.parametrize("size", [64, 256])
def test_the_mask_is_where_the_defect_changed_the_frame(kind, size):
    # Same generator state: the good twin is the same part under the same light, so the
    # pixels the defect changed are known without asking the drawing code.
    for seed in range(12):
        good = good_part(rng(seed), size)
        bad, mask = defective_part_and_mask(rng(seed), size, kind)
        assert np.array_equal(bad, defective_part(rng(seed), size, kind))  # the same frame, mask or not
        assert mask.shape == (size, size) and mask.dtype == bool and mask.any()
        # Material changes (over 6 grey levels: a crack's shadowed edges and a scuff's dulled
        # rings change less) lie within a few pixels of the mask. Pixels dark in both frames
        # are left out: a missing corner moves the part's shadow on the belt, which is no defect.
        dark = (good.mean(axis=-1) < 70) & (bad.mean(axis=-1) < 70)
        material = changed(good, bad, 6) & ~dark
        near = ndimage.binary_dilation(mask, iterations=3)
        assert (material & ~near).sum() <= 0.01 * material.sum(), (kind, seed)
        # and the mask is not much larger than what changed
        assert (changed(good, bad) & mask).sum() >= 0.5 * mask.sum(), (kind, seed)


def test_a_sample_line_has_a_mask_for_every_defective_image_and_none_for_good_ones(tmp_path):
    samples.write_line(tmp_path / "line", train=2, test=3, defective_per_kind=3, seed=6, size=96, fmt="jpg")
    truth = tmp_path / "line" / "ground_truth"
    assert sorted(p.name for p in truth.iterdir()) == sorted(DEFECT_KINDS)  # no good/ folder
    for kind in DEFECT_KINDS:
        images = sorted((tmp_path / "line" / "test" / kind).iterdir())
        masks = sorted((truth / kind).iterdir())
        # bench/anomaly_maps.py looks for ground_truth/<kind>/<image stem>.png
        assert [p.stem + ".png" for p in images] == [p.name for p in masks]
        for path in masks:
            with Image.open(path) as opened:
                assert opened.format == "PNG" and opened.mode == "L" and opened.size == (96, 96)
                pixels = np.asarray(opened)
            assert set(np.unique(pixels).tolist()) == {0, 255}, path


def test_written_masks_pair_with_their_images(tmp_path):
    # Writing masks leaves every image as it was, and each mask sits on its own image's
    # defect: inside it the image departs from the typical good part far more than elsewhere,
    # and more than inside the mask of another image of the same kind.
    write_folder(tmp_path / "plain", 0, 3, seed=8, size=128)
    write_folder(tmp_path / "masked", 0, 3, seed=8, size=128, masks=tmp_path / "truth")
    typical = np.median(np.stack(make_images(15, seed=9, size=128)).astype(np.float32), axis=0).mean(axis=-1)
    names = ("000.png", "001.png", "002.png")
    for kind in DEFECT_KINDS:
        masks = [np.asarray(Image.open(tmp_path / "truth" / kind / name)) > 127 for name in names]
        for i, name in enumerate(names):
            image = (tmp_path / "masked" / kind / name).read_bytes()
            assert image == (tmp_path / "plain" / kind / name).read_bytes(), (kind, name)
            pixels = np.asarray(Image.open(tmp_path / "masked" / kind / name)).astype(np.float32).mean(axis=-1)
            departure = np.abs(pixels - typical)
            ratios = [departure[m].mean() / departure[~ndimage.binary_dilation(m, iterations=4)].mean()
                      for m in masks]
            assert ratios[i] > 2 and ratios[i] == max(ratios), (kind, name, ratios)
