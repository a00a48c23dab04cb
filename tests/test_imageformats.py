"""The one table of image formats (inspector/imageformats.py) against every place that offers or takes a
format: each list is the table's, each format the table names works everywhere, and every one of them goes
from `inspector publish` through a real worker on the real RabbitMQ into the evidence archive."""

from __future__ import annotations

import argparse
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features

from inspector import cli, config, imageformats
from inspector.imageformats import ENCODED, FORMATS, RAW
from inspector.imagefiles import is_image_file
from inspector.stores import ModelStore
from inspector.tools import publish, samples
from inspector.tools.bench.options import ENCODER_OPTIONS, ENCODINGS, BenchOptions
from inspector.worker import decode, evidence
from inspector.worker.decode import DecodeLimits, decode_capture
from inspector_dfkde.plugin import DfkdePlugin
from tests.workerkit import SIZE, worker_config

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = ROOT / "docs" / "contract.md"
LIMITS = DecodeLimits(max_image_bytes=2**24, max_image_pixels=2**22)
PIXELS = samples.make_images(1, seed=3, size=48)[0]


def _option(command: str, flag: str) -> argparse.Action:
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return next(a for a in commands.choices[command]._actions if flag in a.option_strings)


# -- every list is the table's -----------------------------------------------------------------------------


def test_the_table_is_well_formed():
    assert len({f.name for f in FORMATS}) == len(FORMATS)
    assert set(ENCODED) | set(RAW) == set(FORMATS) and not set(ENCODED) & set(RAW)
    suffixes = [s for f in ENCODED for s in f.suffixes]
    assert len(set(suffixes)) == len(suffixes) and all(s == s.lower() and s.startswith(".") for s in suffixes)
    assert all(f.content_type == imageformats.RAW_CONTENT_TYPE and f.channels in (1, 3) for f in RAW)
    Image.init()  # every plugin registered, not only those used so far
    for f in ENCODED:  # this Pillow encodes and decodes every encoded format
        assert f.pil_format in Image.SAVE and f.pil_format in Image.OPEN, f.name
    assert features.check("webp")


def test_every_offered_list_is_the_one_the_table_derives():
    assert tuple(_option("samples", "--format").choices) == tuple(f.suffix.lstrip(".") for f in ENCODED)
    assert tuple(_option("publish", "--pixel-format").choices) == tuple(f.name for f in RAW)
    assert list(ENCODINGS) == [f.name for f in FORMATS]  # `inspector bench --encoding`
    assert set(ENCODER_OPTIONS) <= {f.name for f in ENCODED}
    bench_help = _option("bench", "--encoding").help
    assert all(re.search(rf"\b{f.name}\b", bench_help) for f in FORMATS), bench_help
    assert publish.PIXEL_FORMATS == tuple(decode.RAW_CHANNELS) == tuple(f.name for f in RAW)
    assert publish.CONTENT_TYPES == {s: f.content_type for f in ENCODED for s in f.suffixes}
    assert decode.ENCODED_TYPES == {t for f in ENCODED for t in (f.content_type, *f.aliases)}
    assert decode.PIL_FORMATS == tuple(f.pil_format for f in ENCODED)
    assert evidence.EXTENSIONS == {**{t: f.suffix[1:] for f in FORMATS for t in (f.content_type, *f.aliases)},
                                   "application/json": "capture.json"}


def test_the_contract_lists_the_formats_of_the_table():
    text = CONTRACT.read_text()
    offered = re.search(r"`\[--format ([a-z|\\]+)\]`", text).group(1).replace("\\", "").split("|")
    assert sorted(offered) == sorted(imageformats.SAMPLE_FORMATS)
    row = next(line for line in text.splitlines() if line.startswith("| `image/jpeg`"))
    assert set(re.findall(r"`(image/[a-z-]+)`", row.split("|")[1])) == decode.ENCODED_TYPES
    raw = re.search(r"`pixel_format` is (.*) \(3\)", text).group(1)
    assert re.findall(r"`([a-z0-9]+)`", raw) == [f.name for f in RAW]
    kept = re.search(r"- `<ext>` follows the content type: (.*?)else `bin`", text, re.S).group(1)
    assert set(re.findall(r"`([a-z.]+)`\s*(?:\(|,)", kept)) >= {f.suffix[1:] for f in FORMATS}


@pytest.mark.parametrize("fmt", ENCODED, ids=lambda f: f.name)
def test_each_encoded_format_is_written_found_sent_decoded_and_kept(tmp_path, fmt):
    """samples writes it under each of its suffixes, the archive finds it, publish names its content type,
    the worker decodes it to the pixels Pillow reads, and the evidence archive keeps it under its suffix."""
    for suffix in fmt.suffixes:
        folder = tmp_path / suffix.lstrip(".")
        samples.write_folder(folder, 1, size=48, fmt=suffix.lstrip("."))
        (path,) = (folder / "good").iterdir()
        assert path.suffix == suffix and is_image_file(path) and is_image_file(path.with_suffix(suffix.upper()))
        with Image.open(path) as image:
            assert image.format == fmt.pil_format
            pillow = np.asarray(image.convert("RGB"))
        body, content_type, headers = publish.frame_body(publish.Source(path, path.name), "encoded", "rgb8", 10**6)
        assert (body, content_type, headers) == (path.read_bytes(), fmt.content_type, {})
        for named in (content_type, *fmt.aliases, None):
            np.testing.assert_array_equal(decode_capture(body, named, None, LIMITS), pillow)
    assert evidence.extension(fmt.content_type) == fmt.suffix[1:]
    assert evidence.names_for("2026-12-01", "l", "c", "f", fmt.content_type).image == f"f{fmt.suffix}"


@pytest.mark.parametrize("fmt", RAW, ids=lambda f: f.name)
def test_each_raw_format_is_sent_and_decoded_back(tmp_path, fmt):
    path = tmp_path / "frame.png"
    Image.fromarray(PIXELS).save(path)
    body, content_type, headers = publish.frame_body(publish.Source(path, path.name), "raw", fmt.name, 10**6)
    assert content_type == fmt.content_type and headers == {"width": 48, "height": 48, "pixel_format": fmt.name}
    assert len(body) == 48 * 48 * fmt.channels
    grey = np.asarray(Image.fromarray(PIXELS).convert("L"))
    expected = np.repeat(grey[:, :, None], 3, axis=2) if fmt.channels == 1 else PIXELS
    np.testing.assert_array_equal(decode_capture(body, content_type, headers, LIMITS), expected)
    assert evidence.extension(content_type) == "raw"


def test_the_bench_makes_frames_of_every_format_that_decode_to_its_pixels():
    from inspector.tools.bench.frames import make_frames

    options = BenchOptions(resolution=48, encodings=[f.name for f in FORMATS])
    options.check()
    made = {frames.encoding: frames for frames in make_frames(options, LIMITS.max_image_bytes)}
    assert list(made) == [f.name for f in FORMATS]
    with Image.open(io.BytesIO(made["png"].body(0))) as image:
        generated = np.asarray(image)  # the frame the bench generated, losslessly
    for fmt in FORMATS:
        frames = made[fmt.name]
        assert frames.content_type == fmt.content_type
        pixels = decode_capture(frames.body(0), frames.content_type, frames.headers, LIMITS)
        assert pixels.shape == (48, 48, 3), fmt.name
        if fmt.name in ("bmp", "tiff", "rgb8", "bgr8"):  # lossless and in colour: the same pixels
            np.testing.assert_array_equal(pixels, generated, err_msg=fmt.name)


def test_samples_writes_webp_from_the_command_line(tmp_path):
    out = tmp_path / "line"
    done = subprocess.run([sys.executable, "-m", "inspector.cli", "samples", "--out", str(out), "--format", "webp",
                           "--train", "2", "--test", "1", "--defective", "1", "--size", "64"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    written = sorted(p for p in out.rglob("*.*") if "ground_truth" not in p.parts)
    assert len(written) == 2 + 1 + len(samples.DEFECT_KINDS) and all(p.suffix == ".webp" for p in written)
    masks = sorted((out / "ground_truth").rglob("*.*"))  # exact, so PNG whatever the images are
    assert len(masks) == len(samples.DEFECT_KINDS) and all(p.suffix == ".png" for p in masks)
    with Image.open(written[0]) as image:
        assert image.format == "WEBP" and image.size == (64, 64)


# -- publish -> worker -> evidence, on the real RabbitMQ ----------------------------------------------------


def _expected_pixels(path: Path, fmt: imageformats.ImageFormat) -> np.ndarray:
    """What the worker must see of a file sent in `fmt`, read by Pillow alone."""
    with Image.open(path) as image:
        if fmt.channels == 1:
            return np.repeat(np.asarray(image.convert("L"))[:, :, None], 3, axis=2)
        return np.asarray(image.convert("RGB"))


def _expected_body(path: Path, fmt: imageformats.ImageFormat) -> bytes:
    """The bytes the camera sent, as the archive must keep them."""
    if not fmt.raw:
        return path.read_bytes()
    with Image.open(path) as image:
        if fmt.name == "mono8":
            return image.convert("L").tobytes()
        rgb = np.asarray(image.convert("RGB"))
        return (rgb[:, :, ::-1] if fmt.name == "bgr8" else rgb).copy().tobytes()


def test_every_format_goes_from_publish_through_a_worker_into_the_archive(fitted, line, start, tmp_path, prefix):
    kept = tmp_path / "evidence"
    start(fitted, f'[evidence]\nenabled = true\npath = "{kept}"\nkeep = ["pass", "fail", "error"]\nmaps = false\n')
    settings = config.load(worker_config(tmp_path, fitted, prefix))
    files: dict[tuple[str, str], tuple[Path, imageformats.ImageFormat]] = {}  # (camera, source) -> file, format
    for fmt in FORMATS:
        written = "png" if fmt.raw else fmt.suffix.lstrip(".")  # raw frames: a camera's pixels of a PNG
        folder = tmp_path / "lines" / written
        if not folder.exists():
            samples.write_folder(folder, 1, 1, seed=4, size=SIZE, fmt=written)
        pattern = str(folder / "*" / f"000.{written}")
        options = publish.PublishOptions([pattern], camera=fmt.name, mode="raw" if fmt.raw else "encoded",
                                         pixel_format=fmt.name if fmt.raw else "rgb8")
        assert publish.publish(settings, options).sent == 1 + len(samples.DEFECT_KINDS)
        for source in publish.find_sources([pattern]):
            files[(fmt.name, source.name)] = (source.path, fmt)

    results = {(body["camera_id"], body["meta"]["source"]): body for _, _, body in line.collect(len(files))}
    assert sorted(results) == sorted(files)
    plugin = DfkdePlugin.load(ModelStore(fitted).load_path("default").path, torch.device("cpu"))
    pixels = [_expected_pixels(path, fmt) for path, fmt in files.values()]
    expected = plugin.score(torch.stack([plugin.prepare(p) for p in pixels])).probability
    for (key, (path, fmt)), probability in zip(files.items(), expected):
        body = results[key]
        assert body["error"] is None, (key, body["error"])
        assert body["anomaly_probability"] == pytest.approx(float(probability), abs=1e-4), key
        assert body["verdict"] == ("fail" if body["anomaly_probability"] >= body["threshold"] else "pass"), key
        image = Path(body["evidence"]["image"])
        assert image.suffix == fmt.suffix == f".{imageformats.ARCHIVE_SUFFIXES[fmt.content_type]}", image
        assert image.is_relative_to(kept / body["inspected_at"][:10] / "line1" / fmt.name), image
        assert image.read_bytes() == _expected_body(path, fmt), key
    # a sensible verdict, not only a consistent one: the good part passes and the scratched one fails in every
    # lossless format (JPEG's and WebP's artefacts and a mono camera are other pictures)
    for fmt in FORMATS:
        if fmt.name in ("jpeg", "webp", "mono8"):
            continue
        written = "png" if fmt.raw else fmt.suffix.lstrip(".")
        assert results[(fmt.name, f"good/000.{written}")]["verdict"] == "pass", fmt.name
        assert results[(fmt.name, f"scratch/000.{written}")]["verdict"] == "fail", fmt.name
