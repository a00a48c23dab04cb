"""decode_capture: every capture form gives the right pixels, every bad one its FrameError code.

Images are made here with PIL and checked against independent references: the array
itself for lossless formats, PIL's own decode of the same bytes for JPEG.
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from inspector.config import WorkerSettings
from inspector.errors import FrameError
from inspector.worker.decode import (
    JSON_MAX_STRUCTURE,
    JSON_TEXT_MAX_BYTES,
    URI_PATH_MAX_BYTES,
    DecodeLimits,
    decode_capture,
)

LIMITS = DecodeLimits(max_image_bytes=1_000_000, max_image_pixels=1_000_000)
PIXELS = np.random.default_rng(0).integers(0, 256, size=(12, 16, 3), dtype=np.uint8)


def encode(image: Image.Image | np.ndarray, fmt: str, **options) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def pil_rgb(data: bytes) -> np.ndarray:
    """PIL's own RGB decode of `data`: the reference for lossy formats and mode conversions."""
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB"))


def check(result: np.ndarray, expected: np.ndarray) -> None:
    assert result.dtype == np.uint8 and result.ndim == 3 and result.shape[2] == 3
    assert result.flags.c_contiguous and result.flags.writeable and result.flags.owndata
    np.testing.assert_array_equal(result, expected)


def refused(code: str, body: bytes, content_type: str | None, headers=None, limits=LIMITS) -> str:
    """Decode expecting FrameError `code`; its message."""
    with pytest.raises(FrameError) as caught:
        decode_capture(body, content_type, headers, limits)
    assert caught.value.code == code, str(caught.value)
    return str(caught.value)


def as_json(**fields) -> bytes:
    return json.dumps(fields).encode()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height RGB pixels and whose IDAT holds almost nothing."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


# -- encoded images --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "fmt", "options"),
    [
        ("image/png", "PNG", {}),
        ("image/bmp", "BMP", {}),
        ("image/tiff", "TIFF", {}),
        ("image/tiff", "TIFF", {"compression": "tiff_lzw"}),
        ("image/webp", "WEBP", {"lossless": True}),
        ("image/jpeg", "JPEG", {"quality": 90}),
        ("image/jpg", "JPEG", {}),
    ],
)
def test_encoded_types_give_their_pixels(content_type, fmt, options):
    data = encode(PIXELS, fmt, **options)
    expected = pil_rgb(data) if fmt == "JPEG" else PIXELS
    check(decode_capture(data, content_type, None, LIMITS), expected)


@pytest.mark.parametrize(
    "content_type", [None, "", "application/octet-stream", "IMAGE/PNG; charset=binary", " image/png ;x=1", "image/png"]
)
def test_content_type_sniffed_normalised_or_mismatched(content_type):
    # The last case says PNG while the bytes are a JPEG: decoded by what the bytes are.
    data = encode(PIXELS, "JPEG") if content_type == "image/png" else encode(PIXELS, "PNG")
    check(decode_capture(data, content_type, {}, LIMITS), pil_rgb(data) if content_type == "image/png" else PIXELS)


SIXTEEN_BIT = np.array([[0x0000, 0x00FF, 0x0100, 0x1234], [0x7FFF, 0x8000, 0xFF00, 0xFFFF]], dtype=np.uint16)


@pytest.mark.parametrize(
    ("array", "fmt"),
    [
        (SIXTEEN_BIT, "PNG"),  # opens as I;16
        (SIXTEEN_BIT, "TIFF"),  # I;16
        (SIXTEEN_BIT.astype(">u2"), "TIFF"),  # I;16B
        (SIXTEEN_BIT.astype(np.int32), "TIFF"),  # I, values of a 16-bit camera
    ],
)
def test_sixteen_bit_grey_is_scaled_not_clipped(array, fmt):
    data = encode(array, fmt)
    expected = np.repeat((SIXTEEN_BIT >> 8).astype(np.uint8)[:, :, None], 3, axis=2)
    assert expected[0, 3, 0] == 0x12
    check(decode_capture(data, "image/" + fmt.lower(), None, LIMITS), expected)


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("RGBA", "PNG"), ("P", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("1", "PNG"), ("CMYK", "TIFF"), ("CMYK", "JPEG")],
)
def test_other_modes_convert_to_rgb(mode, fmt):
    image = Image.fromarray(PIXELS).convert(mode)
    data = encode(image, fmt)
    with Image.open(io.BytesIO(data)) as reopened:
        assert reopened.mode == mode
    check(decode_capture(data, None, None, LIMITS), pil_rgb(data))


def test_multi_frame_tiff_gives_the_first_frame():
    data = encode(Image.fromarray(PIXELS), "TIFF", save_all=True, append_images=[Image.fromarray(255 - PIXELS)])
    check(decode_capture(data, "image/tiff", None, LIMITS), PIXELS)


def test_float_image_is_refused():
    data = encode(PIXELS[:, :, 0].astype(np.float32), "TIFF")
    assert "mode F" in refused("image_undecodable", data, "image/tiff")


# -- raw pixels ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [int, str, lambda v: str(v).encode()])
@pytest.mark.parametrize("pixel_format", ["mono8", "rgb8", "bgr8"])
def test_raw_pixels(pixel_format, kind):
    height, width = PIXELS.shape[:2]
    if pixel_format == "mono8":
        body, expected = PIXELS[:, :, 0].tobytes(), np.repeat(PIXELS[:, :, :1], 3, axis=2)
    elif pixel_format == "rgb8":
        body, expected = PIXELS.tobytes(), PIXELS
    else:
        body, expected = PIXELS[:, :, ::-1].tobytes(), PIXELS  # blue first on the wire
    fmt = pixel_format.encode() if kind is not int and kind is not str else pixel_format
    headers = {"width": kind(width), "height": kind(height), "pixel_format": fmt}
    check(decode_capture(body, "image/x-raw", headers, LIMITS), expected)


def test_raw_channel_order():
    body = bytes([10, 20, 30])  # one pixel
    for pixel_format, rgb in [("rgb8", [10, 20, 30]), ("bgr8", [30, 20, 10]), ("mono8", None)]:
        headers = {"width": 1, "height": 1 if pixel_format != "mono8" else 3, "pixel_format": pixel_format}
        result = decode_capture(body, "image/x-raw", headers, LIMITS)
        if rgb is None:
            assert result.tolist() == [[[10, 10, 10]], [[20, 20, 20]], [[30, 30, 30]]]
        else:
            assert result.tolist() == [[rgb]]


@pytest.mark.parametrize(
    ("headers", "missing"),
    [
        (None, "width, height, pixel_format"),
        ({"width": 2, "pixel_format": "rgb8"}, "height"),
        ({"width": 2, "height": 2, "pixel_format": None}, "pixel_format"),
    ],
)
def test_raw_headers_missing(headers, missing):
    message = refused("raw_headers_missing", b"\0" * 12, "image/x-raw", headers)
    assert f"missing: {missing}" in message and "mono8, rgb8, bgr8" in message


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("width", 0), ("width", -1), ("height", "abc"), ("height", True), ("width", 2.0), ("width", "-2"),
        ("width", "²"), ("height", b"\xff"), ("width", "9" * 5000), ("pixel_format", "rgba8"), ("pixel_format", 3),
    ],
)
def test_raw_headers_invalid(name, value):
    headers = {"width": 2, "height": 2, "pixel_format": "rgb8", name: value}
    assert name in refused("raw_headers_invalid", b"\0" * 12, "image/x-raw", headers)


def test_raw_too_many_pixels_refused_before_the_size_check():
    headers = {"width": "100000", "height": b"100000", "pixel_format": "rgb8"}
    message = refused("image_too_many_pixels", b"\0" * 12, "image/x-raw", headers)
    assert "100000x100000" in message and str(LIMITS.max_image_pixels) in message


def test_raw_size_mismatch():
    headers = {"width": 2, "height": 2, "pixel_format": "rgb8"}
    message = refused("raw_size_mismatch", b"\0" * 11, "image/x-raw", headers)
    assert "12" in message and "11" in message


# -- errors of any body ----------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["image/png", "image/x-raw", "application/json", "text/plain", None])
def test_empty_body(content_type):
    refused("empty_body", b"", content_type, {"width": 1, "height": 1, "pixel_format": "mono8"})


def test_unsupported_content_type():
    message = refused("unsupported_content_type", encode(PIXELS, "PNG"), "text/plain; charset=utf-8")
    assert "text/plain" in message and "image/png" in message and "image/x-raw" in message


def test_body_too_large():
    data = encode(PIXELS, "PNG")
    message = refused("image_too_large", data, "image/png", limits=DecodeLimits(len(data) - 1, 1_000_000))
    assert str(len(data)) in message and str(len(data) - 1) in message and "max_image_bytes" in message


def truncated(fmt: str) -> bytes:
    noise = np.random.default_rng(1).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    data = encode(noise, fmt)
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "data",
    [
        np.random.default_rng(2).bytes(2000),
        truncated("JPEG"),
        truncated("PNG"),
        encode(PIXELS, "GIF"),  # PIL decodes GIF, but only the five formats are reachable
        encode(PIXELS, "PPM"),
        encode(PIXELS, "PNG")[:40],  # cut inside the header
    ],
    ids=["random", "truncated-jpeg", "truncated-png", "gif", "ppm", "header-only"],
)
def test_undecodable(data):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # else PIL would pad truncated images with grey
    assert "the body" in refused("image_undecodable", data, "image/jpeg")


def test_too_many_pixels_from_the_header_before_decoding():
    message = refused("image_too_many_pixels", png_claiming(2000, 2000), "image/png")
    assert "2000x2000" in message and str(LIMITS.max_image_pixels) in message


@pytest.mark.parametrize("side", [30000, 10000])  # 2.7 GB and 300 MB of RGB
def test_decompression_bomb_refused_quickly(side):
    data = png_claiming(side, side)
    assert len(data) < 100
    started = time.perf_counter()
    limit = 1_000_000
    message = refused("image_too_many_pixels", data, None, limits=DecodeLimits(1_000_000, limit))
    assert time.perf_counter() - started < 1.0
    assert str(side * side) in message and str(limit) in message


def test_a_configured_pixel_limit_above_pils_own_guard_is_the_one_that_holds():
    """PIL refuses over 89.5 MP by itself; worker.max_image_pixels set above it must decide instead: a
    100 MP claim under a 200 MP limit is read (and found truncated), not refused for its size."""
    data = png_claiming(10000, 10000)
    started = time.perf_counter()
    refused("image_undecodable", data, None, limits=DecodeLimits(1_000_000, 200_000_000))
    assert time.perf_counter() - started < 1.0


def tiled_tiff(pixels: np.ndarray, tile: tuple[int, int], tiles: list[bytes] | None = None) -> bytes:
    """A deflate-compressed, tiled, 8-bit grey TIFF written IFD by IFD (PIL writes no tiles): `tile`
    is (width, length); `tiles` (compressed) replaces the tiles cut from `pixels`."""
    height, width = pixels.shape
    tile_w, tile_h = tile
    if tiles is None:
        tiles = []
        for y in range(0, height, tile_h):
            for x in range(0, width, tile_w):
                block = np.zeros((tile_h, tile_w), np.uint8)
                part = pixels[y:y + tile_h, x:x + tile_w]
                block[:part.shape[0], :part.shape[1]] = part
                tiles.append(zlib.compress(block.tobytes()))
    entries = [(256, 4, [width]), (257, 4, [height]), (258, 3, [8]), (259, 3, [8]), (262, 3, [1]), (277, 3, [1]),
               (322, 4, [tile_w]), (323, 4, [tile_h]), (324, 4, [0] * len(tiles)), (325, 4, [len(t) for t in tiles])]
    ifd_size = 2 + 12 * len(entries) + 4
    arrays_at = 8 + ifd_size
    data_at = arrays_at + sum(4 * len(values) for _, _, values in entries if len(values) > 1)
    offsets = []
    for data in tiles:
        offsets.append(data_at)
        data_at += len(data)
    entries[8] = (324, 4, offsets)
    ifd, arrays = struct.pack("<H", len(entries)), b""
    for tag, kind, values in entries:
        if len(values) > 1:
            field = struct.pack("<I", arrays_at + len(arrays))
            arrays += struct.pack(f"<{len(values)}I", *values)
        else:
            field = struct.pack("<HH", values[0], 0) if kind == 3 else struct.pack("<I", values[0])
        ifd += struct.pack("<HHI", tag, kind, len(values)) + field
    return b"II*\0" + struct.pack("<I", 8) + ifd + b"\0\0\0\0" + arrays + b"".join(tiles)


def zero_tile(side: int) -> bytes:
    """A deflate stream of side x side zero bytes, made without holding them (~1 KB per MB)."""
    stream, chunk = zlib.compressobj(9), bytes(1 << 20)
    whole, rest = divmod(side * side, len(chunk))
    return b"".join([*(stream.compress(chunk) for _ in range(whole)), stream.compress(chunk[:rest]), stream.flush()])


@pytest.mark.parametrize(("size", "tile"), [((20, 12), (16, 16)), ((16, 16), (16, 16)), ((12, 16), (256, 256)),
                                            ((16, 16), (1024, 1024)), ((40, 24), (32, 16))])
def test_tiled_tiff(size, tile):
    grey = np.random.default_rng(1).integers(0, 256, size=(size[1], size[0]), dtype=np.uint8)
    check(decode_capture(tiled_tiff(grey, tile), "image/tiff", None, LIMITS), np.repeat(grey[:, :, None], 3, axis=2))


def test_tiff_tile_larger_than_its_image_is_refused_unread():
    """One 16384 x 16384 tile for a 16 x 16 image: 261 KB on the wire, 256 MiB that libtiff would allocate
    and fill before the 16 x 16 pixels are copied out."""
    bomb = tiled_tiff(np.zeros((16, 16), np.uint8), (16384, 16384), [zero_tile(16384)])
    assert len(bomb) < 300_000
    started = time.perf_counter()
    message = refused("image_undecodable", bomb, "image/tiff")
    assert time.perf_counter() - started < 0.5  # 0.7 to 1.2 s when libtiff fills the tile
    assert "16384x16384" in message and "16x16" in message
    over = tiled_tiff(np.zeros((16, 16), np.uint8), (1040, 1024), [zero_tile(1040)])
    refused("image_undecodable", over, None)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_tiff_tile_bomb_allocates_nothing(tmp_path):
    """In a fresh process, whose peak resident memory (VmHWM) is its own: ru_maxrss survives exec."""
    bomb = tmp_path / "bomb.tif"
    bomb.write_bytes(tiled_tiff(np.zeros((16, 16), np.uint8), (16384, 16384), [zero_tile(16384)]))
    script = (
        "import re, sys\n"
        "from inspector.errors import FrameError\n"
        "from inspector.worker.decode import DecodeLimits, decode_capture\n"
        "def peak():\n"
        "    return int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "before = peak()\n"
        "try:\n"
        "    decode_capture(data, 'image/tiff', None, DecodeLimits(10**6, 10**6))\n"
        "except FrameError:\n"
        "    pass\n"
        "print((peak() - before) // 1024)\n"
    )
    grown = subprocess.run([sys.executable, "-c", script, str(bomb)], capture_output=True, text=True, check=True,
                           cwd=Path(__file__).parents[1])
    assert int(grown.stdout) < 32, f"decoding the TIFF grew the process by {grown.stdout.strip()} MiB"


# -- application/json ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "fact"),
    [
        (b"not json", "not UTF-8 JSON"),
        (b"[1, 2]", "JSON list"),
        (b'"image_b64"', "JSON str"),
        (b"{}", "neither"),
        (as_json(image_uri="file:///a.png", image_b64="AAAA"), "image_uri and image_b64"),
        (as_json(image_b64=5), "image_b64 is a JSON int"),
        (as_json(image_uri=None), "image_uri is a JSON NoneType"),
        (b'{"image_b64": "\xff\xfe"}', "not UTF-8"),
        (b"[" * 100_000, "refused unparsed"),
        (b'{"a":' * 100_000, "refused unparsed"),
    ],
)
def test_json_malformed(body, fact):
    assert fact in refused("json_malformed", body, "application/json; charset=utf-8")


def test_json_structure_is_bounded_before_parsing():
    """`[[],[],...]` grows ~22x when parsed (63 MB took 1.4 GB and 10 s): refused unparsed, at C speed."""
    body = b"[" + b"[]," * 1_000_000 + b"[]]"
    limits = DecodeLimits(max_image_bytes=4_000_000, max_image_pixels=1_000_000)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        message = refused("json_malformed", body, "application/json", limits=limits)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < len(body) and time.perf_counter() - started < 1.0
    assert str(JSON_MAX_STRUCTURE) in message


def test_json_body_at_the_structure_limit_parses():
    body = json.dumps({"image_uri": "file:///nowhere/" + ",".join("a" * JSON_MAX_STRUCTURE)}).encode()
    assert body.count(b",") + body.count(b"{") + body.count(b"[") == JSON_MAX_STRUCTURE
    refused("uri_not_allowed", body, "application/json")


def test_a_large_json_body_must_be_plain_ascii():
    """A wide character makes Python hold the whole text at 4 bytes a character: only a small body may."""
    wide = json.dumps({"image_b64": "A" * JSON_TEXT_MAX_BYTES + "\U0001F600"}, ensure_ascii=False).encode()
    escaped = as_json(image_b64="A" * JSON_TEXT_MAX_BYTES + "\U0001F600")
    assert not wide.isascii() and escaped.isascii() and b"\\ud83d" in escaped
    for body in (wide, escaped):
        assert "ASCII" in refused("json_malformed", body, "application/json")
    small = json.dumps({"image_b64": "AAAA\u00e9"}, ensure_ascii=False).encode()
    refused("base64_invalid", small, "application/json")


def test_image_b64():
    data = encode(PIXELS, "PNG")
    text = base64.b64encode(data).decode()
    check(decode_capture(as_json(image_b64=f"\n {text}\n"), "application/json", None, LIMITS), PIXELS)


@pytest.mark.parametrize("text", ["abc$", "abc", "data:image/png;base64,AAAA", "AA AA", "é", ""])
def test_base64_invalid(text):
    assert "image_b64" in refused("base64_invalid", as_json(image_b64=text), "application/json")


def test_image_b64_too_large():
    body = as_json(image_b64=base64.b64encode(encode(PIXELS, "PNG")).decode())
    refused("image_too_large", body, "application/json", limits=DecodeLimits(len(body) - 1, 1_000_000))


def test_image_b64_undecodable():
    body = as_json(image_b64=base64.b64encode(b"not an image").decode())
    assert "image_b64" in refused("image_undecodable", body, "application/json")


# -- image_uri -------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """root/ with an image, a spaced name, a folder, a FIFO and symlinks; siblings outside it."""
    root, sibling = tmp_path / "good", tmp_path / "good2"
    (root / "sub").mkdir(parents=True)
    sibling.mkdir()
    png = encode(PIXELS, "PNG")
    for path in (root / "a.png", root / "my image.png", sibling / "b.png", tmp_path / "secret.png"):
        path.write_bytes(png)
    (root / "junk.png").write_bytes(b"not an image")
    (root / "inside.png").symlink_to(root / "a.png")
    (root / "escape.png").symlink_to(tmp_path / "secret.png")
    (tmp_path / "root-link").symlink_to(root)
    os.mkfifo(root / "fifo")
    return {"tmp": tmp_path, "root": root, "sibling": sibling}


def limits_for(root: Path, max_image_bytes: int = 1_000_000) -> DecodeLimits:
    return DecodeLimits.from_settings(WorkerSettings(allowed_roots=[root], max_image_bytes=max_image_bytes))


def from_uri(uri: str, limits: DecodeLimits) -> np.ndarray:
    return decode_capture(as_json(image_uri=uri), "application/json", None, limits)


@pytest.mark.parametrize(
    "uri",
    ["{root}/a.png", "{root}/my%20image.png", "{root}/inside.png", "{root}/sub/../a.png", "localhost{root}/a.png"],
)
def test_image_uri(files, uri):
    check(from_uri("file://" + uri.format(root=files["root"]), limits_for(files["root"])), PIXELS)


def test_allowed_root_through_a_symlink_is_resolved(files):
    limits = limits_for(files["tmp"] / "root-link")
    assert limits.allowed_roots == (files["root"].resolve(),)
    check(from_uri((files["tmp"] / "root-link" / "a.png").as_uri(), limits), PIXELS)
    check(from_uri((files["root"] / "a.png").as_uri(), limits), PIXELS)


def test_image_uri_without_allowed_roots(files):
    uri = (files["root"] / "a.png").as_uri()
    message = refused("uri_not_allowed", as_json(image_uri=uri), "application/json")
    assert "worker.allowed_roots" in message and uri in message


@pytest.mark.parametrize(
    "uri",
    [
        "http://example.com/a.png",
        "https://{root}/a.png",
        "{tmp}/secret.png",  # outside
        "{root}/../secret.png",  # .. escape
        "{root}/escape.png",  # symlink inside pointing outside
        "{sibling}/b.png",  # shares the root's prefix: /good2 is not inside /good
        "otherhost{root}/a.png",
        "file:a.png",
        "{root}/a.png?x=1",
        "{root}/a%00.png",
        "file://[::1/a.png",
        "{root}/\udc80.png",
    ],
)
def test_uri_not_allowed(files, uri):
    if "://" not in uri and not uri.startswith("file:"):
        uri = "file://" + uri
    uri = uri.format(**files)
    message = refused("uri_not_allowed", as_json(image_uri=uri), "application/json", limits=limits_for(files["root"]))
    assert repr(uri)[1:-1] in message  # quoted, a lone surrogate escaped


def test_uri_outside_names_the_roots(files):
    uri = f"file://{files['root']}/../secret.png"
    message = refused("uri_not_allowed", as_json(image_uri=uri), "application/json", limits=limits_for(files["root"]))
    assert str(files["root"]) in message and "worker.allowed_roots" in message


@pytest.mark.parametrize("name", ["missing.png", "sub", "fifo"])
def test_file_not_found(files, name):
    uri = (files["root"] / name).as_uri()
    started = time.perf_counter()
    message = refused("file_not_found", as_json(image_uri=uri), "application/json", limits=limits_for(files["root"]))
    assert uri in message and time.perf_counter() - started < 1.0  # a FIFO must not block


def test_image_uri_file_too_large(files):
    size = (files["root"] / "a.png").stat().st_size
    uri = (files["root"] / "a.png").as_uri()
    limits = limits_for(files["root"], max_image_bytes=size - 1)
    message = refused("image_too_large", as_json(image_uri=uri), "application/json", limits=limits)
    assert uri in message and str(size) in message


def test_image_uri_longer_than_path_max_is_refused_fast(files):
    """realpath walks a path component by component, quadratically: 160,000 took 3 s, 32 million hours."""
    uri = (files["root"] / "a").as_uri() + "/a" * 200_000
    started = time.perf_counter()
    message = refused("uri_not_allowed", as_json(image_uri=uri), "application/json", limits=limits_for(files["root"]))
    assert time.perf_counter() - started < 0.5 and str(URI_PATH_MAX_BYTES) in message


def test_image_uri_undecodable(files):
    uri = (files["root"] / "junk.png").as_uri()
    message = refused("image_undecodable", as_json(image_uri=uri), "application/json", limits=limits_for(files["root"]))
    assert uri in message


def test_messages_quote_capture_values_at_a_bounded_length(files):
    uri = "file:///" + "x" * 100_000
    message = refused("uri_not_allowed", as_json(image_uri=uri), "application/json", limits=limits_for(files["root"]))
    assert len(message) < 1000
    headers = {"width": "9" * 100_000, "height": 1, "pixel_format": "rgb8"}
    assert len(refused("raw_headers_invalid", b"\0" * 3, "image/x-raw", headers)) < 1000


@pytest.mark.parametrize("image, fmt", [(SIXTEEN_BIT, "PNG"), (SIXTEEN_BIT.astype(np.int32), "TIFF")])
def test_refit_reads_archive_files_as_the_worker_decodes_frames(tmp_path, image, fmt):
    """A model must be served the pixels it was fitted on: the archive reader and the frame decoder agree."""
    from inspector.worker.decode import read_file

    path = tmp_path / f"frame.{fmt.lower()}"
    Image.fromarray(image).save(path, format=fmt)
    served = decode_capture(path.read_bytes(), None, None, LIMITS)
    np.testing.assert_array_equal(read_file(path, LIMITS), served)


def test_a_folder_swapped_for_a_symlink_after_resolution_is_not_followed(tmp_path):
    """The window between realpath and open: opening walks the resolved path with O_NOFOLLOW per component."""
    import errno

    from inspector.worker.decode import _open_beneath

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "frames").mkdir(parents=True)
    outside.mkdir()
    (root / "frames" / "a.png").write_bytes(b"inside")
    (outside / "a.png").write_bytes(b"secret")
    fd = _open_beneath(root, root / "frames" / "a.png")
    assert os.read(fd, 100) == b"inside"
    os.close(fd)
    (root / "frames").rename(root / "old")  # what an attacker does right after the worker's realpath
    (root / "frames").symlink_to(outside)
    with pytest.raises(OSError) as swapped:
        _open_beneath(root, root / "frames" / "a.png")
    assert swapped.value.errno in (errno.ELOOP, errno.ENOTDIR)
    (root / "old" / "b.png").symlink_to(outside / "a.png")
    with pytest.raises(OSError):
        _open_beneath(root, root / "old" / "b.png")


# -- progressive JPEGs of many scans ------------------------------------------------------------


def test_a_jpeg_of_thousands_of_scans_is_refused_before_any_is_decoded():
    """libjpeg decodes every scan over the whole image: 1,000 scans of end-of-band runs cost a 4000 x 4000
    image over a second unbounded. They are counted first and refused in milliseconds."""
    from tests.jpegkit import many_scan_jpeg

    data = many_scan_jpeg(4000, 4000, 1000)
    limits = DecodeLimits(max_image_bytes=1 << 20, max_image_pixels=50_000_000)
    started = time.perf_counter()
    message = refused("image_too_complex", data, "image/jpeg", limits=limits)
    assert time.perf_counter() - started < 0.1
    assert "1000 scans" in message and "worker.max_jpeg_scans (100)" in message


@pytest.mark.parametrize("scans, code", [(100, None), (101, "image_too_complex")])
def test_the_scan_limit_is_exact_and_configured(scans, code):
    from tests.jpegkit import many_scan_jpeg

    data = many_scan_jpeg(64, 48, scans)
    limits = DecodeLimits.from_settings(WorkerSettings(max_jpeg_scans=100, max_image_pixels=10**6))
    assert limits.max_jpeg_scans == 100
    if code is None:
        check(decode_capture(data, None, None, limits), np.full((48, 64, 3), 128, np.uint8))
    else:
        refused(code, data, None, limits=limits)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_ordinary_progressive_jpegs_still_decode(mode):
    """libjpeg's own progression: 10 scans in colour, 6 in grey, 18 in CMYK."""
    image = Image.fromarray(PIXELS).convert(mode)
    data = encode(image, "JPEG", progressive=True, quality=90)
    assert 6 <= data.count(b"\xff\xda") <= 18
    check(decode_capture(data, "image/jpeg", None, LIMITS), pil_rgb(data))


def test_the_batched_jpeg_decoder_counts_scans_too():
    from bench.jpeg_batch import decode_jpegs
    from tests.jpegkit import many_scan_jpeg

    good = encode(PIXELS, "JPEG", progressive=True)
    out = decode_jpegs([many_scan_jpeg(2000, 2000, 500), good], LIMITS)
    assert isinstance(out[0], FrameError) and out[0].code == "image_too_complex"
    assert tuple(out[1].shape) == (3, 12, 16)
