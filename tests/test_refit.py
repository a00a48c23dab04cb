"""`inspector refit` and `inspector models` end to end: real files, the real store, the real broker."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pika
import pytest
import torch
from PIL import Image

from inspector.stores import ModelStore
from inspector.tools import samples
from inspector_dfkde.plugin import DfkdePlugin

ROOT = Path(__file__).resolve().parents[1]
GOOD = 150


def inspector(*args, cwd, env=None, timeout=300):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTOR_")}
    environ.update({"INSPECTOR_DEVICE": "cpu", "INSPECTOR_REFIT__BATCH_SIZE": "16"}, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "inspector.cli", *args], cwd=cwd, env=environ, capture_output=True, text=True,
        timeout=timeout,
    )


FORMATS = [(".png", "PNG"), (".JPG", "JPEG"), (".bmp", "BMP"), (".webp", "WEBP")]
# What these refits are checked for (the archive's walk, the manifest, the calibration, the store, the
# announcement) does not need the localisation maps' own backbone pass, the larger part of a fit's time here;
# refit with the maps is checked by tests/test_worker_regions.py and tests/test_explain.py (conftest's store).
NO_MAPS = "[plugins.dfkde]\nlocalisation_maps = false\n"


def _as_camera_saw_it(images):
    """The same encode/decode cycle as the archive's (JPEG and WebP are lossy), for fresh test images."""
    out = []
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format=FORMATS[i % 4][1])
        out.append(np.array(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
    return out


def _archive(root: Path, n: int, seed: int) -> Path:
    """Good parts in nested folders, mixed formats and suffix cases, plus corrupt and non-image files."""
    images = samples.make_images(n, seed=seed)
    for i, image in enumerate(images):
        folder = root / f"day{i % 3}" / ("cam1" if i % 2 else "cam2")
        folder.mkdir(parents=True, exist_ok=True)
        suffix, fmt = FORMATS[i % 4]
        Image.fromarray(image).save(folder / f"part{i:04d}{suffix}", format=fmt)
    (root / "day0" / "cam1" / "notes.txt").write_text("not an image")
    (root / "day0" / "cam1" / "empty.png").write_bytes(b"")
    (root / "day1" / "cam2" / "garbage.jpg").write_bytes(os.urandom(2000))
    whole = (root / "day0" / "cam2" / "part0000.png").read_bytes()
    (root / "day2" / "cam1" / "truncated.png").write_bytes(whole[: len(whole) // 3])
    return root


@pytest.fixture(scope="module")
def refitted(tmp_path_factory):
    work = tmp_path_factory.mktemp("refit")
    (work / "inspector.toml").write_text(NO_MAPS)  # read from the folder refit runs in, as an operator's is
    _archive(work / "archive", GOOD, seed=11)
    result = inspector("refit", "--data", "archive", "--held-out", "0.3", "--target-false-reject", "0.1",
                       "--no-announce", cwd=work)
    return work, result


def test_refit_summary_and_manifest(refitted):
    work, result = refitted
    assert result.returncode == 0, result.stderr
    for name in ("empty.png", "garbage.jpg", "truncated.png"):
        assert "skipping archive/" in result.stderr and name in result.stderr
    assert "notes.txt" not in result.stderr
    found, corrupt = GOOD + 3, 3
    held_out = round(found * 0.3)
    assert f"{found} found" in result.stdout and f"{corrupt} skipped" in result.stdout

    store = ModelStore(work / "models")
    info = store.info("default")
    manifest = info.manifest
    assert manifest["plugin"] == "dfkde"
    images = manifest["images"]
    assert images["found"] == found and images["skipped"] == corrupt
    assert images["used"] + images["held_out"] == GOOD
    assert abs(images["held_out"] - held_out) <= corrupt
    assert manifest["source"] == str((work / "archive").resolve())
    calibration = manifest["calibration"]
    assert calibration["target_false_reject"] == 0.1 and calibration["threshold"] == 0.5
    assert calibration["method"] == "held-out" and calibration["automatic"] is False  # --held-out asks for it
    assert calibration["held_out_share"] == 0.3
    assert calibration["false_reject_resolution"] == pytest.approx(1 / images["held_out"])
    assert calibration["held_out"] == images["held_out"]
    # split-conformal: the k-th lowest of the n held-out scores, k = floor(0.1 (n + 1))
    n = images["held_out"]
    k = int(0.1 * (n + 1))
    assert (calibration["n"], calibration["k"]) == (n, k) and k >= 1
    assert calibration["expected_false_reject"] == pytest.approx(k / (n + 1)) and k / (n + 1) <= 0.1
    assert calibration["held_out_false_reject"] == pytest.approx(k / n)
    interval = calibration["false_reject_interval"]
    assert interval["low"] < k / (n + 1) < interval["high"] and interval["distribution"] == f"Beta({k}, {n + 1 - k})"
    quantiles = calibration["held_out_log_density_quantiles"]
    assert quantiles["0.001"] <= calibration["boundary_log_density"] <= quantiles["0.1"]
    assert manifest["settings"]["threshold_offset"] == pytest.approx(calibration["threshold_offset"])
    assert "expected false-reject rate on fresh good parts" in result.stdout
    assert "this threshold's own rate:" in result.stdout


def test_calibrated_threshold_holds_on_fresh_good_images(refitted):
    work, _ = refitted
    info = ModelStore(work / "models").load_path("default")
    plugin = DfkdePlugin.load(info.path, torch.device("cpu"))
    fresh = _as_camera_saw_it(samples.make_images(200, seed=99))
    probabilities = np.concatenate([
        plugin.score(torch.stack([plugin.prepare(im) for im in fresh[i : i + 25]])).probability
        for i in range(0, len(fresh), 25)
    ])
    false_reject = float(np.mean(probabilities >= info.manifest["threshold"]))
    # target 10%; binomial spread on 200 fresh images plus the quantile's own error from ~45 held out
    assert 0.02 <= false_reject <= 0.22, false_reject
    defects = _as_camera_saw_it(samples.make_images(60, defective=True, seed=98))
    caught = np.concatenate([
        plugin.score(torch.stack([plugin.prepare(im) for im in defects[i : i + 20]])).probability
        for i in range(0, 60, 20)
    ])
    assert np.mean(caught >= info.manifest["threshold"]) > false_reject


def test_too_few_images_exits_1_and_writes_nothing(tmp_path):
    (tmp_path / "few").mkdir()  # 5 image files; 4 components x 2 images: 8 are needed
    for i, image in enumerate(samples.make_images(5, seed=3, size=64)):
        Image.fromarray(image).save(tmp_path / "few" / f"part{i}.png")
    result = inspector("refit", "--data", "few", "--no-calibrate", "--no-announce", cwd=tmp_path)
    assert result.returncode == 1
    assert "needs at least 8 images to fit (2 per component" in result.stderr
    assert "found 5 image files under few" in result.stderr
    assert "Traceback" not in result.stderr
    _archive(tmp_path / "unreadable", 6, seed=3)  # 9 files pass the count, 6 decode
    result = inspector("refit", "--data", "unreadable", "--no-calibrate", "--no-announce", cwd=tmp_path)
    assert result.returncode == 1
    assert "needs at least 8 images to fit (2 per component" in result.stderr
    assert "; 6 usable of 9 image files" in result.stderr
    assert "(3 unreadable)" in result.stderr and "Traceback" not in result.stderr
    assert ModelStore(tmp_path / "models").names() == []
    result = inspector("refit", "--data", "few", "--no-announce", cwd=tmp_path)
    assert result.returncode == 1 and "calibrating by cross-fitting needs at least 199 readable" in result.stderr
    result = inspector("refit", "--data", "few", "--held-out", "0.5", "--no-announce", cwd=tmp_path)
    assert result.returncode == 1 and "a hold-out of 50% needs at least 398 readable images" in result.stderr


def test_operator_mistakes_exit_2_without_a_traceback(tmp_path):
    (tmp_path / "bad.toml").write_text("[refit]\nheld_out_share = 1.5\n")
    cases = [
        (["refit", "--data", "nowhere"], "--data nowhere: no such folder"),
        (["refit", "--data", ".", "--config", "bad.toml"], "refit.held_out_share"),
        (["refit", "--data", ".", "--model", "ghost"], "--model 'ghost' is not a configured model"),
        (["refit", "--data", ".", "--target-false-reject", "2"], "--target-false-reject"),
        (["models", "show", "ghost"], "ghost"),
        (["refit", "--data", ".", "--no-calibrate"], "store.path models: not a folder"),
    ]
    (tmp_path / "models").write_text("a file where the store should be")
    for args, message in cases:
        result = inspector(*args, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)


def test_sigkill_mid_refit_keeps_the_previous_version(refitted, tmp_path):
    work, _ = refitted
    store = ModelStore(work / "models")
    before = store.current("default")
    _archive(tmp_path / "bigger", 400, seed=12)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTOR_")}
    environ.update(INSPECTOR_DEVICE="cpu", INSPECTOR_STORE__PATH=str(work / "models"))
    process = subprocess.Popen(
        [sys.executable, "-m", "inspector.cli", "refit", "--data", str(tmp_path / "bigger"), "--no-announce"],
        cwd=tmp_path, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    for line in process.stderr:  # the model is built and the images start to flow
        if "refit 'default' from" in line:
            break
    time.sleep(1)  # part-way through decoding and fitting 400 images
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert store.current("default") == before
    assert [v.version for v in store.versions("default")] == [before]
    plugin = DfkdePlugin.load(store.load_path("default").path, torch.device("cpu"))
    assert plugin.score(torch.stack([plugin.prepare(samples.make_images(1, seed=1)[0])])).probability.shape == (1,)


def test_rollback_switches_current_and_announces_on_the_broker(refitted):
    work, _ = refitted
    store = ModelStore(work / "models")
    first = store.current("default")
    second = inspector("refit", "--data", "archive", "--no-calibrate", "--no-announce", cwd=work)
    assert second.returncode == 0, second.stderr
    newest = store.current("default")
    assert newest != first

    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
    channel = connection.channel()
    channel.exchange_declare("inspection.control", exchange_type="topic", durable=True)
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, "inspection.control", routing_key="model.default")
    try:
        quiet = inspector("models", "rollback", "default", newest, cwd=work)  # no broker.url: nothing is sent
        assert quiet.returncode == 0 and "not announced: no broker.url is configured" in quiet.stdout, quiet.stderr
        assert store.current("default") == newest and channel.basic_get(queue, auto_ack=True)[0] is None
        result = inspector("models", "rollback", "default", first, "--announce", cwd=work)
        assert result.returncode == 0, result.stderr
        assert store.current("default") == first
        body = None
        for _ in range(50):
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method:
                break
            time.sleep(0.1)
        assert method is not None, "no announcement arrived"
        assert method.routing_key == "model.default"
        message = json.loads(body)
        assert message["model"] == "default" and message["version"] == first and message["reason"] == "rollback"
        assert properties.delivery_mode == 2
    finally:
        connection.close()

    listing = inspector("models", "list", cwd=work)
    assert listing.returncode == 0
    current_rows = [row for row in listing.stdout.splitlines() if row.endswith("*")]
    assert len(current_rows) == 1 and first in current_rows[0]
    shown = json.loads(inspector("models", "show", "default", newest, cwd=work).stdout)
    assert shown["version"] == newest and shown["current"] is False and shown["calibration"] is None


def test_unreachable_broker_still_stores_and_exits_0(refitted):
    work, _ = refitted
    result = inspector("refit", "--data", "archive", "--no-calibrate", "--keep", "2", cwd=work,
                       env={"INSPECTOR_BROKER__URL": "amqp://guest@127.0.0.1:1/%2F"})
    assert result.returncode == 0, result.stderr
    assert "not announced" in result.stdout and "pick the version up" in result.stdout
    store = ModelStore(work / "models")
    assert len(store.versions("default")) == 2
    assert store.info("default").version in result.stdout


def test_an_unexpected_error_on_one_file_skips_that_file_only(tmp_path):
    from inspector.tools.imagestream import ImageStream
    from inspector.tools.progress import Progress

    paths = []
    for i, image in enumerate(samples.make_images(5, seed=4, size=64)):
        paths.append(tmp_path / f"p{i}.png")
        Image.fromarray(image).save(paths[-1])

    def prepare(image):
        broken = np.asarray(Image.open(paths[2]))
        if image[0, 0, 0] == broken[0, 0, 0] and image.sum() == broken.sum():
            raise RuntimeError("decoder bug")
        return torch.from_numpy(image).permute(2, 0, 1)

    with Progress(len(paths), "test") as progress:
        stream = ImageStream(prepare, 2, 10**8, progress)
        batches = list(stream.batches(paths, 2))
    assert sum(len(b) for b in batches) == 4 and stream.used == 4
    assert [p.name for p, _ in stream.skipped] == ["p2.png"]
    assert progress.done == 5


def test_a_configured_pixel_limit_above_pils_own_guard_is_honoured(tmp_path):
    """PIL refuses images over 89.5 MP by itself; a limit configured above that must hold instead."""
    from PIL import Image

    from inspector.errors import FrameError
    from inspector.worker.decode import DecodeLimits, read_file

    path = tmp_path / "large.png"
    Image.new("L", (10_000, 9_500)).save(path)  # 95 MP of zeros: a small file
    image = read_file(path, DecodeLimits(1 << 26, 100_000_000), min_size=(64, 64))
    assert image.shape == (9_500, 10_000, 3)
    with pytest.raises(FrameError, match=r"over worker.max_image_pixels \(90000000\)"):
        read_file(path, DecodeLimits(1 << 26, 90_000_000))


def _claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` RGB pixels and whose data holds almost nothing."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))


def test_refit_skips_and_counts_what_a_hostile_archive_holds(tmp_path):
    """Symlink loops, a symlinked folder outside the archive, a format the worker does not decode, an image
    over the pixel limit, a JPEG of 2,000 scans and a FIFO: refit completes, fits only the good images, and
    says how many files it skipped and why."""
    from tests.jpegkit import many_scan_jpeg

    archive, outside = tmp_path / "archive", tmp_path / "elsewhere"
    (archive / "good").mkdir(parents=True)
    outside.mkdir()
    for i, image in enumerate(samples.make_images(40, seed=5, size=64)):
        Image.fromarray(image).save(archive / "good" / f"part{i:03d}.png")
        Image.fromarray(image).save(outside / f"other{i:03d}.png")
    (archive / "loop.png").symlink_to("loop.png")  # ELOOP
    (archive / "x").symlink_to("x")
    (archive / "self").symlink_to(".")  # an endless walk if followed
    (archive / "up").symlink_to("..")
    (archive / "pulled").symlink_to(outside)  # pulls a folder from anywhere in
    (archive / "good" / "linked.png").symlink_to(archive / "good" / "part000.png")  # a file link is read
    Image.fromarray(samples.make_images(1, seed=9, size=64)[0]).save(archive / "polyglot.png", format="GIF")
    (archive / "huge.png").write_bytes(_claiming(11_000, 11_000))  # 121 Mpx, over refit.max_image_pixels
    (archive / "scans.jpg").write_bytes(many_scan_jpeg(512, 512, 2000))
    os.mkfifo(archive / "fifo.png")  # opening it for reading would block
    (tmp_path / "inspector.toml").write_text(NO_MAPS)

    result = inspector("refit", "--data", "archive", "--no-calibrate", "--no-announce", cwd=tmp_path, timeout=240,
                       env={"INSPECTOR_PLUGINS__DFKDE__INPUT_SIZE": "64"})
    assert result.returncode == 0, result.stderr
    manifest = ModelStore(tmp_path / "models").info("default").manifest
    images = manifest["images"]
    assert images["used"] == 41  # 40 good ones and the linked file; nothing from outside
    assert images["skipped_reasons"] == {"symlinked_folder": 3, "file_not_found": 2, "image_undecodable": 1,
                                         "image_too_many_pixels": 1, "image_too_complex": 1}
    assert images["skipped"] == 8
    assert "8 files under archive skipped" in result.stderr and "image_too_complex" in result.stderr
    assert "skipped: 3 symlinked_folder, 2 file_not_found" in result.stdout


def _twin_config(root: Path, **refit) -> Path:
    lines = ['device = "cpu"', "[store]", f'path = "{root / "models"}"', "[refit]", "batch_size = 16",
             *(f"{k} = {v!r}".replace("'", '"').replace("True", "true").replace("False", "false")
               for k, v in refit.items()), NO_MAPS.strip(), "input_size = 64"]
    root.mkdir(parents=True, exist_ok=True)
    path = root / "inspector.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _calibrated(root: Path, data: Path, **refit) -> tuple[dict, object]:
    from inspector import config
    from inspector.tools.refit import RefitOptions, run_refit

    settings = config.load(_twin_config(root, **refit))
    result = run_refit(settings, RefitOptions(data=data, model="default", target_false_reject=0.05, announce=False))
    return ModelStore(root / "models").info("default").manifest, result


def test_a_twin_archive_calibrates_as_the_single_archive_does(tmp_path):
    """Each good part captured twice (a PNG and a JPEG of it): its frames are one part, never in two folds, so
    the boundary is the single archive's; grouped by nothing, the twins lift each other's out-of-fold
    scores and the boundary moves up."""
    images = samples.make_images(40, seed=41, size=64)
    single, twice = tmp_path / "single", tmp_path / "twice"
    single.mkdir()
    twice.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(single / f"p{i:03d}_a.png")
        Image.fromarray(image).save(twice / f"p{i:03d}_a.png")
        Image.fromarray(image).save(twice / f"p{i:03d}_b.jpg", quality=95)
    alone, _ = _calibrated(tmp_path / "one", single)
    grouped, result = _calibrated(tmp_path / "two", twice, group_pattern=r"(?P<part>p\d+)_")
    leaked, _ = _calibrated(tmp_path / "three", twice, group_twins=False)
    assert result.groups["groups"] == 40 and result.groups["images_with_twin"] == 80
    assert grouped["images"]["groups"]["merged_by"]["pattern"] == 40
    preparing = DfkdePlugin.create(config_dfkde(), torch.device("cpu"))  # one for all: each builds a backbone
    fresh = [torch.stack([preparing.prepare(image) for image in samples.make_images(200, seed=43, size=64)])]
    rates = []
    for root in ("one", "two", "three"):
        stored = DfkdePlugin.load(ModelStore(tmp_path / root / "models").load_path("default").path,
                                  torch.device("cpu"))
        calibration = ModelStore(tmp_path / root / "models").info("default").manifest["calibration"]
        raw = np.concatenate([stored.score(batch).raw for batch in fresh])
        rates.append(float(np.mean(raw <= calibration["boundary_log_density"])))
    print(f"fresh good parts rejected for a 5% target: single {rates[0]:.1%}, twins grouped {rates[1]:.1%}, "
          f"twins not grouped {rates[2]:.1%}")
    assert abs(rates[1] - rates[0]) <= 0.05  # 10 of 200 fresh parts: the band the Beta spread of k/(n+1) allows
    assert rates[2] > rates[1]


def config_dfkde():
    from inspector_dfkde.plugin import DfkdeSettings

    return DfkdeSettings(input_size=64)
